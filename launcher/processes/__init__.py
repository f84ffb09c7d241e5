"""Processes and clusters: where the workers run (spawn.py), each worker's life (worker.py, script.py), how they
stop, hang and leave, and the Slurm batch job that runs them on a cluster (slurm.py)."""
