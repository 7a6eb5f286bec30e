"""nemo_aligner_draft."""
