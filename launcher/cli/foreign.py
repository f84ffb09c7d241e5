"""The flags of torchrun and `accelerate launch`, as a user coming from them types them: torchrun's for what launch
also does are taken as its own flags (`--nproc-per-node 8` is `--gpus 8`, or `--procs 8` with --cpu; `--nnodes 1:4`
is `--nodes 4 --min-nodes 1`); the rest are refused with what to write instead (after a recipe, only where it has no
hyperparameter of that name). Either spelling, dashes or underscores, as both tools take them. A script's own
arguments, after SCRIPT, are never read."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..recipe import contract as recipes

# torchrun's name → launch's: the same meaning, taken as they are
ALIASES = {"nnodes": "--nodes", "node_rank": "--node-rank", "master_addr": "--master-addr",
           "master_port": "--master-port", "max_restarts": "--max-restarts"}
PER_NODE = "nproc_per_node"  # --gpus N, or --procs N with --cpu
INSTEAD = {
    "standalone": "launch needs no --standalone: without --nodes it runs on this node, on a free local port",
    "rdzv_endpoint": "--rdzv-endpoint HOST:PORT is --master-addr HOST --master-port PORT here: node 0's address, the "
                     "same on every node",
    "rdzv_backend": "launch's nodes meet at node 0 (--master-addr, --master-port): there is no rendezvous backend to "
                    "choose",
    "rdzv_id": "launch's nodes meet at node 0 (--master-addr, --master-port): there is no rendezvous id to give",
    "num_machines": "--num-machines is --nodes N here",
    "machine_rank": "--machine-rank is --node-rank R here",
    "main_process_ip": "--main-process-ip is --master-addr HOST here",
    "main_process_port": "--main-process-port is --master-port PORT here",
    "num_processes": "launch counts processes per node: --gpus N (or --cpu --procs N) on each node, N = "
                     "--num-processes / --num-machines",
    "gradient_accumulation_steps": "--gradient-accumulation-steps is --grad-accum K here",
    "mixed_precision": "--mixed-precision is --precision fp32|bf16|fp16 here",
    "multi_gpu": "--multi-gpu is not needed: --gpus N starts N processes",
    "use_fsdp": "--use-fsdp is --engine fsdp here",
    "use_deepspeed": "--use-deepspeed is --engine deepspeed here (--zero 1|2|3)",
    "dynamo_backend": "--dynamo-backend is --compile here (inductor)",
    "config_file": "launch reads no Accelerate config file: give what it holds as flags (--gpus, --nodes, "
                   "--precision, --grad-accum, --engine fsdp|deepspeed); a script's Accelerator() reads them from "
                   "the environment launch gives",
}


def instead(flag: str) -> str | None:
    """What to write instead of an unknown flag of torchrun's or Accelerate's, if it is one."""
    return INSTEAD.get(flag.partition("=")[0][2:].replace("-", "_"))


def nodes(flag: str, value: str) -> list[str]:
    """`--nodes N`, or torchrun's elastic `--nodes MIN:MAX` as `--nodes MAX --min-nodes MIN`."""
    low, colon, high = value.partition(":")
    if not colon:
        return ["--nodes", value]
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise UsageError(f"{flag} {value}: an elastic node count is MIN:MAX, 1 ≤ MIN ≤ MAX, e.g. --nodes 2:4")
    return ["--nodes", high] + (["--min-nodes", low] if int(low) < int(high) else [])


def translate(argv: list[str]) -> list[str]:
    """argv with torchrun's flags as launch's, up to a training script (its own arguments left as they are); one of
    theirs that launch spells otherwise, before the recipe or script, is UsageError saying how."""
    out, rest, before = [], list(argv), True
    while rest:
        token = rest.pop(0)
        if not token.startswith("--"):
            out.append(token)
            if token.endswith(".py"):
                before = False
                if Path(token).is_file() and not recipes.is_recipe(token):
                    return out + rest  # a script: the words after it are its own
            continue
        flag, eq, value = token.partition("=")
        name = flag[2:].replace("-", "_")
        if before and instead(flag):  # its value would pass for the recipe
            raise UsageError(instead(flag))
        if ALIASES.get(name, flag) == "--nodes":
            if not eq:
                value = rest.pop(0) if rest else ""
            out += nodes(flag, value)
        elif name in ALIASES:
            out.append(ALIASES[name] + eq + value)
        elif name == PER_NODE:
            if not eq:
                value = rest.pop(0) if rest else ""
            if not value.isdigit():
                raise UsageError(f"{flag} {value}: launch takes a number of processes on this node here "
                                 "(--gpus N, or --cpu --procs N)")
            out += ["--procs" if "--cpu" in argv else "--gpus", value]
        else:
            out.append(token)
    return out
