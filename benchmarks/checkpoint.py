"""Checkpoints of an FSDP model: sharded (DCP) against the whole-state gather they replaced, side by side in one run.

    python benchmarks/checkpoint.py [--procs 2] [--width 4096] [--layers 6] [--dir DIR] [--repeats 2] [--gpu]

`--procs` CPU processes (gloo) shard a stack of `--layers` Linear(W, W) (W = `--width`; 6 × 4096² ≈ 100.7 M
parameters) with the launcher's FSDP engine, take one AdamW step so that the optimizer state exists (16 bytes per
parameter in all), and save it through the launcher's own Checkpointer, in the run directory's layout:

- gather: what the launcher did before the shards: the whole model and optimizer state gathered into rank 0's CPU
  memory (`full_state_dict=True, cpu_offload=True`) and written by rank 0 alone, through the same atomic save;
- sync: every rank writes its own shard with DCP and waits for it (`--no-async-save`);
- async: the same, written in the background (the default): training stalls only while the shards are copied
  aside (staged), into memory the first save allocates and the later ones reuse: its peak is the first save's.

Peak memory is each process's high-water mark above what it held before the save (VmHWM, reset through
/proc/self/clear_refs; the busiest rank is shown); the stall is how long Checkpointer.save keeps the training loop
waiting; throughput is checkpoint bytes per second of a save until it is complete (published), and of a load of
the sharded checkpoint back into the model through the launcher's verified reader (each file hashed as it is
read), against the disk's own sequential write (the same bytes in 16 MiB writes and an fsync, on the same
filesystem). Each figure is the best of `--repeats` saves. `--gpu`: one GPU per process (NCCL for training, gloo
beside it for the asynchronous saves), where staging is the copy from the device to host memory.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20


def high_water_reset() -> int:
    """Reset this process's peak resident memory to its current one; return the current one (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def high_water() -> int:
    return _status("VmHWM")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def disk_write(folder: Path, size: int) -> float:
    """Bytes per second of a sequential write of `size` bytes with an fsync, as a checkpoint writes them."""
    chunk, path = os.urandom(16 * MB), folder / "sequential.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return max(1, size // len(chunk)) * len(chunk) / elapsed


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from launcher.engines import fsdp
    from launcher.plan import Plan
    from launcher.runs import checkpoint
    from launcher.train.checkpointer import Checkpointer

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.gpu else torch.device("cpu")
    if args.gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if args.gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    module = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers))).to(device)
    params = sum(p.numel() for p in module.parameters())
    run_dir = Path(args.dir) / "run"

    def make_optimizer(m):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-4)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    plan = Plan(recipe="", hparams={}, run_dir=str(run_dir), name="bench", engine="fsdp", keep=0,
                device=device.type)
    engine = fsdp.build(plan, module, make_optimizer)
    module(torch.randn(8, args.width, device=device)).sum().backward()
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    barrier = dist.barrier

    def measured(save) -> dict:
        barrier()
        before = high_water_reset()
        start = time.perf_counter()
        wait = save()
        stall = time.perf_counter() - start
        wait()
        barrier()
        return {"peak": high_water() - before, "stall": stall, "complete": time.perf_counter() - start}

    def gather(step: int):
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {"model": get_model_state_dict(engine.module, options=whole),
                 "optimizer": get_optimizer_state_dict(engine.module, engine.optimizer, options=whole),
                 **engine.state_dict(), "progress": {}}
        checkpoint.save(checkpoint.folder(run_dir) / f"step-{step:08d}", state, {"step": step}, rank, barrier,
                        lambda folder: None)
        return lambda: None

    savers = {"gather": (gather, None), "sync": (None, False), "async": (None, True)}
    results, step = {}, 0
    for name, (by_hand, asynchronous) in savers.items():
        plan.async_save = asynchronous
        saver = Checkpointer(plan, engine, world, rank) if not by_hand else None  # one per run, as in training
        for _ in range(args.repeats):
            step += 1
            if by_hand:
                got = measured(lambda save=by_hand, at=step: save(at))
            else:
                got = measured(lambda saver=saver, at=step: (saver.save(at, {}), saver.wait)[1])
            results.setdefault(name, []).append(got)
            if rank == 0:  # its size, and only the newest kept: a big model's checkpoints fill a disk
                got["bytes"] = sum(p.stat().st_size for p in checkpoint.step_dirs(run_dir)[0].rglob("*") if p.is_file())
                checkpoint.prune(run_dir, 1)
    newest = checkpoint.step_dirs(run_dir)[0]  # async's last: a sharded one
    for _ in range(args.repeats):
        barrier()
        before = high_water_reset()
        start = time.perf_counter()
        Checkpointer(plan, engine, world, rank).load_weights(newest)
        barrier()
        results.setdefault("load", []).append({"peak": high_water() - before, "complete": time.perf_counter() - start})
    out = {"rank": rank, "params": params, "results": results}
    Path(args.dir, f"rank-{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temporary "
                                                    "folder under /tmp); the disk is measured there")
    parser.add_argument("--gpu", action="store_true", help="one GPU per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.procs),
               __file__, "--worker", "--dir", tmp, "--width", str(args.width), "--layers", str(args.layers),
               "--repeats", str(args.repeats), *(["--gpu"] if args.gpu else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if result.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        ranks = [json.loads(Path(tmp, f"rank-{r}.json").read_text()) for r in range(args.procs)]
        size = max(r["bytes"] for r in ranks[0]["results"]["sync"])
        disk = max(disk_write(Path(tmp), size) for _ in range(args.repeats))

    def best(name: str, key: str, worst: bool = False) -> float:  # the busiest rank's figure, best of the repeats
        return (max if worst else min)(max(rank["results"][name][i][key] for rank in ranks)
                                       for i in range(args.repeats))

    # the first asynchronous save allocates the copy its successors reuse (held for the run): its peak counts
    peak = {name: best(name, "peak", worst=name == "async") for name in ("gather", "sync", "async", "load")}
    stall = {name: best(name, "stall") for name in ("gather", "sync", "async")}
    complete = {name: best(name, "complete") for name in ("gather", "sync", "async", "load")}
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} · Python "
          f"{platform.python_version()} · torch {torch.__version__} · {args.procs} "
          f"{torch.cuda.get_device_name() if args.gpu else 'CPU'} processes, FSDP, "
          f"{ranks[0]['params'] / 1e6:.1f} M parameters, AdamW, fp32 · checkpoint {size / MB:,.0f} MB · disk "
          f"{disk / MB:,.0f} MB/s sequential write with fsync · best of {args.repeats}\n")
    print("| save | peak MB, busiest rank | vs gather | training stalls, s | vs sync | complete, s | MB/s | vs disk |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("gather", "sync", "async"):
        rate = size / complete[name]
        print(f"| {name} | {peak[name] / MB:,.0f} | {peak[name] / peak['gather']:.2f} | {stall[name]:.2f} | "
              f"{stall[name] / stall['sync']:.2f} | {complete[name]:.2f} | {rate / MB:,.0f} | {rate / disk:.2f} |")
    rate = size / complete["load"]
    print(f"| load (sharded) | {peak['load'] / MB:,.0f} | | | | {complete['load']:.2f} | {rate / MB:,.0f} | "
          f"{rate / disk:.2f} |")
    print(f"\ncommand: python benchmarks/checkpoint.py --procs {args.procs} --width {args.width} --layers "
          f"{args.layers} --repeats {args.repeats}{' --gpu' if args.gpu else ''}")


if __name__ == "__main__":
    main()
