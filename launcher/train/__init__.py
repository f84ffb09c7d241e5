"""Training: the loop (loop.py) and the parts it delegates to, each deciding when it acts: the run's length,
its progress, the counts' weighting, the guards that name a recipe's mistakes, evaluation, telemetry and
checkpoints."""
