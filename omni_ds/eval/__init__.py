"""Scoring transcripts: text normalisation, WER per test set, and multi-model comparison tables."""
