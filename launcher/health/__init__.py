"""Health: the pre-flight checks before the first step, the checks sampled during training and their verdict,
and --overfit-batches and --find-lr."""
