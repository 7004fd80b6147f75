"""Evaluation of exported models: decoding test sets, WER, comparisons and routing analysis.

| module | holds |
| --- | --- |
| ``normalize`` | the documented English text normaliser applied before WER |
| ``wer`` | corpus-level WER per set (jiwer), the mean over sets, report files |
| ``compare`` | the paper-style table: relative WER reduction of one model against others |
| ``inference`` | ``Transcriber``: batched forward + CTC decoding of an exported model |
| ``analysis`` / ``plots`` | expert usage, entropy, cross-layer NMI, rasters, and their PNGs |
"""
