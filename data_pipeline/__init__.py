"""From raw audio and (pseudo-)transcripts to batches of tensors. Never imports omni_ds."""
