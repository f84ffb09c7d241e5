"""A throw-away Slurm cluster on this machine: munged, slurmctld and one slurmd per virtual node, all on
loopback, from Debian's packages (what ../shared/notes/SLURM.md measured). Each node has two fake GPUs
(character devices listed as GRES), so GPU requests are scheduled and CUDA_VISIBLE_DEVICES is set,
though no CUDA device exists."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
NODES = 3


def unavailable() -> str | None:
    """Why no cluster can run here, or None."""
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/run installs Debian's slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the Slurm daemons run as root here, and this is not root"
    return None


def free_ports(n: int) -> int:
    """The first of n consecutive free ports."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            held = []
            for port in range(base, base + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()


CONF = """\
ClusterName=lab
SlurmctldHost=localhost
SlurmctldPort={port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={lab}/munge/sock,cred_expire=5
StateSaveLocation={lab}/state
SlurmdSpoolDir={lab}/spool/%n
SlurmctldPidFile={lab}/run/slurmctld.pid
SlurmdPidFile={lab}/run/slurmd-%n.pid
SlurmctldLogFile={lab}/log/slurmctld.log
SlurmdLogFile={lab}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
NodeName=node[1-{nodes}] NodeHostname=localhost NodeAddr=127.0.0.1 Port={first}-{last} CPUs=2 RealMemory=1000 \
Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Lab:
    def __init__(self):
        # munged wants every folder above its socket open to all: not pytest's private tmp_path
        self.root = Path(tempfile.mkdtemp(prefix="slurm-lab-"))
        self.root.chmod(0o755)
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> Lab:
        lab = self.root
        for sub in ("munge", "state", "run", "log", "dev", *(f"spool/node{i}" for i in range(1, NODES + 1))):
            (lab / sub).mkdir(parents=True, exist_ok=True)
        (lab / "munge").chmod(0o755)  # munged refuses a socket folder others cannot enter
        key = lab / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for i in range(2):
            os.mknod(lab / "dev" / f"nvidia{i}", 0o666 | 0o020000, os.makedev(195, i))  # fake GPUs
        base = free_ports(NODES + 1)
        (lab / "slurm.conf").write_text(CONF.format(lab=lab, port=base, nodes=NODES, first=base + 1,
                                                    last=base + NODES))
        (lab / "gres.conf").write_text(f"NodeName=node[1-{NODES}] Name=gpu File={lab}/dev/nvidia[0-1]\n")
        self.run("munged", f"--key-file={key}", f"--socket={lab}/munge/sock", f"--pid-file={lab}/munge/pid",
                 f"--log-file={lab}/munge/log", f"--seed-file={lab}/munge/seed")
        self.run("slurmctld", "-i")
        for i in range(1, NODES + 1):
            self.run("slurmd", "-N", f"node{i}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = self.sinfo()
            if states and all(s == "idle" for s in states):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the lab cluster did not come up: {self.sinfo()}\n{self.logs()}")

    def run(self, *cmd: str) -> None:
        subprocess.run(cmd, env=self.env, check=True, timeout=30)

    def sinfo(self) -> list[str]:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.stdout.split()

    def logs(self) -> str:
        return "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def state(self, job: str) -> str:
        """The job's state, '' once Slurm has forgotten it."""
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.stdout.strip()

    def wait(self, job: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state(job):
                return
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {self.state(job)} after {timeout} s\n{self.logs()}")

    def clear(self) -> None:
        """Cancel whatever jobs a test left (a failed one, say), so that they hold no node the next test needs."""
        if self.jobs():
            subprocess.run(["scancel", "--user", getpass.getuser()], env=self.env, check=True)
            deadline = time.monotonic() + 60
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)

    def jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return out.stdout.split()

    def stop(self) -> None:
        for pid_file in sorted((self.root / "run").glob("*.pid")) + [self.root / "munge" / "pid"]:
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)  # the daemons remove their own files on the way out
        shutil.rmtree(self.root, ignore_errors=True)
