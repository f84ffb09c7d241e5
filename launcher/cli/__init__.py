"""The command line: which command `launch ARGV` is (commands.py), a run's flags checked into a plan (run.py), and
the commands on runs: status, logs, cancel and resume (jobs.py), a sweep's search, trials and table."""
