"""Run records and outputs: the run directory and its files, config.json's record, checkpoints and their export,
the pictures."""
