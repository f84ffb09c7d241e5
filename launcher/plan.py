"""The plan: one resolved, serialisable description of a run.

The CLI builds it, validates it and hands it to every worker (through the
environment, so that nothing on disk can go stale and no secret is written).
Workers never parse argv; they only read a plan.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace

from .flags import Flags, option
from .text import count

PLAN_ENV = "LAUNCHER_PLAN"
PARENT_ENV = "LAUNCHER_PID"  # the launcher that started this node's workers
ATTEMPT_ENV = "LAUNCHER_ATTEMPT"  # an elastic job's start, counted the same on every node (processes/elastic.py)
# hyperparameters named like this are never written into a file or a log
SECRET = re.compile(r"key|token|secret|passw|credential", re.IGNORECASE)


@dataclass
class Plan:
    """A field named like a launcher flag holds that flag's value (flags.py says what it means), and its default is
    the flag's; the comments here are on the fields that cli/run.py's make_plan resolves from several flags, the
    recipe and the machine."""

    recipe: str  # absolute path of the recipe file, or of a training script
    hparams: dict  # the recipe's Hparams, resolved, as plain values ({} for a script)
    run_dir: str
    name: str
    device: str = "cpu"  # "cuda" or "cpu"
    nproc: int = 1  # processes on this node
    nnodes: int = 1  # with min_nodes, the most nodes: what the batch split below is planned for
    min_nodes: int | None = None  # an elastic job (--nodes MIN:MAX) trains on with as few as this many nodes
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # where node 0's launcher hosts the rendezvous
    master_port: int = 0  # 0: any free port (one node only)
    placed_by: str | None = None  # the environment the node count and rank came from (processes/cluster.py)
    rendezvous_timeout: int = Flags.rendezvous_timeout
    engine: str = Flags.engine
    sharding: str = "full"  # fsdp: full (free gathered parameters after the forward) | grad-op (keep them)
    zero: int = 0  # deepspeed: the ZeRO stage, 1-3
    offload: str = "none"  # none | optimizer | params | both: what lives on the CPU (fsdp: none | both)
    deepspeed_config: dict | None = None  # deepspeed: what it runs with, the flags and --deepspeed-config merged
    precision: str = Flags.precision
    grad_accum: int = Flags.grad_accum
    clip_grad: float = Flags.clip_grad
    seed: int = Flags.seed
    max_steps: int | None = Flags.max_steps  # caps the run; the LR schedule is planned over the capped length
    eval_every: int = Flags.eval_every  # optimizer steps between evaluations; 0 = at epoch ends only
    eval_epochs: int = Flags.eval_epochs  # evaluate every this many epochs; 0 = never at epoch ends
    eval_limit: int | None = None  # batches per evaluation (debug); None = the whole split
    log_every: int = Flags.log_every  # optimizer steps between metric records
    workers: int = 0  # DataLoader workers per process, for per-sample datasets
    device_data: bool = Flags.device_data
    compile: bool = Flags.compile
    find_unused_parameters: bool = Flags.find_unused_parameters
    health: bool = Flags.health
    overfit_batches: int = Flags.overfit_batches
    find_lr: bool = Flags.find_lr
    save_every: int = Flags.save_every
    keep: int = Flags.keep
    async_save: bool = Flags.async_save
    resume: str | None = None  # a verified checkpoint directory to start from (auto and run directories resolved)
    convert_from: str | None = None  # deepspeed: the checkpoint node 0 makes `resume`, its universal form, from
    max_restarts: int = Flags.max_restarts
    skip_nonfinite: bool = Flags.skip_nonfinite  # on with --find-lr too
    early_stop: int = Flags.early_stop
    test_weights: str = Flags.test_weights
    timeout: float = Flags.timeout
    step_timeout: float = Flags.timeout  # after the first step (resolved from --step-timeout)
    debug: bool = Flags.debug
    wandb: str = "offline"  # online | offline | disabled
    wandb_project: str | None = None  # the recipe's name unless given
    wandb_entity: str | None = Flags.wandb_entity
    wandb_group: str | None = Flags.wandb_group
    wandb_id: str | None = None  # the W&B run: kept across resumes
    tensorboard: bool = Flags.tensorboard
    pictures: bool = Flags.pictures
    script_args: list[str] | None = None  # a training script's own arguments; None for a recipe

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    @property
    def batch_size(self) -> int:
        return self.hparams["batch_size"]

    @property
    def micro_batch(self) -> int:
        """Samples per process per forward pass: the global batch split over processes and accumulation."""
        return self.batch_size // (self.world_size * self.grad_accum)

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None and self.min_nodes < self.nnodes

    def resized(self, world: int) -> Plan:
        """The plan on `world` processes, as an elastic job's start finds them: the same global batch, each process
        taking its share in micro-batches no larger than planned (more accumulation, never more memory): the
        largest that divides the share."""
        if world == self.world_size:
            return self
        share = self.batch_size // world
        micro = max(d for d in range(1, min(self.micro_batch, share) + 1) if share % d == 0)
        return replace(self, nnodes=world // self.nproc, grad_accum=share // micro)

    def split(self) -> str:
        """How the global batch is split: '64 = 4 processes × 2 accumulation × 8 per process'."""
        return (f"{self.batch_size} = {count(self.world_size, 'process')} × {self.grad_accum} accumulation × "
                f"{self.micro_batch} per process")

    def secret_hparams(self) -> set[str]:
        """Hyperparameters named like a key, token, secret or password."""
        return {k for k in self.hparams if SECRET.search(k)}

    def secret_options(self) -> set[str]:
        """The flags of the secret hyperparameters that take a value, as a command line spells them."""
        return {option(k) for k in self.secret_hparams() if not isinstance(self.hparams[k], bool)}

    def public_hparams(self) -> dict:
        """The hyperparameters as files and logs may hold them: values of secret-looking names masked."""
        secret = self.secret_hparams()
        return {k: "<redacted>" if k in secret else v for k, v in self.hparams.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))

    @classmethod
    def from_env(cls) -> Plan:
        text = os.environ.get(PLAN_ENV)
        if not text:
            raise RuntimeError(f"{PLAN_ENV} is not set: workers are started by `launch`, not by hand")
        return cls.from_json(text)


def attempt(environ=os.environ) -> int:
    """Which start of the job this process belongs to, 0 for the first: an elastic job's count, the same on every
    node (a node that joins late starts at the others' count), else torch's restart count."""
    return int(environ.get(ATTEMPT_ENV) or environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
