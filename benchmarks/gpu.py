"""Proof on a GPU: every GPU path of the launcher once, and the figures users pick a launcher by, in one command.

    python benchmarks/gpu.py pack .gpu                  # here: the wheels and data that travel to the GPU machine
    python benchmarks/gpu.py run OUT --carry .gpu       # there: sized for 9 minutes on one H200
    python benchmarks/gpu.py run OUT --smoke            # the same steps on the CPU at tiny sizes (tested in CI)

`run` installs what the machine lacks from the carried wheels (deepspeed and its small dependencies, airbench,
torchvision for airbench; never torch) and this project without its pins, then runs, in order:

1. smoke: `launch recipes/digits.py` on one GPU and under --debug, bf16 and fp16;
2. cifar: `launch recipes/cifar.py --gpus 1 --precision bf16` to its 10 epochs over --seeds seeds
   (benchmarks/accuracy.py: test accuracy, training and wall time), and airbench94 on the same images
   (benchmarks/airbench_ref.py);
3. lm: `launch recipes/lm.py --size gpt2 --precision bf16` (GPT-2's 124M shape) with --compile, then without
   it under DDP, FSDP and DeepSpeed ZeRO-2: tokens/s and MFU after the first steps;
4. deepspeed-fp16: the language model's tiny preset in fp16 under DDP (torch's GradScaler) and under DeepSpeed
   ZeRO-2 with its own loss scaler (allowed for this check by LAUNCH_UNVERIFIED_DEEPSPEED_FP16=1), same seed,
   compared step by step: loss scale, skipped steps, gradient norm before clipping, loss;
5. overhead: benchmarks/overhead.py --gpu: the launcher's steps/s against the hand-written loop on the GPU for
   the MLP and the CIFAR-10 network, where a host–device sync per step would show;
6. checkpoint: benchmarks/checkpoint.py --gpu: an FSDP model of 268 M parameters with AdamW saved sharded
   (synchronously and in the background) against the whole-state gather, and loaded: host memory, the stall of
   training, throughput against the disk's own;
7. flight-recorder: on two GPUs (skipped on one), a rank of tests/recipes/tiny.py hangs after the first step:
   the job must fail after --step-timeout with NCCL's flight recorder dumps in the run's logs, named by the
   failure, and torchfrtrace must read them.

A step that fails is recorded with its error and the next one runs. OUT/results.json and OUT/results.md are
written after every step (a time-out still leaves what was measured), each run's console and metrics under
OUT/runs/; run folders (checkpoints of a 124M model) stay in a scratch folder that does not travel back.
--smoke runs the same steps on the CPU with tiny models and a made-up CIFAR-10 in a minute or two, airbench,
DeepSpeed's fp16, the flight recorder and --compile skipped (they need CUDA, or take long on the CPU): what CI
tests, so that the one GPU run does not fail on a typo.
"""

import argparse
import importlib.util
import json
import math
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import accuracy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DIGITS, CIFAR, LM = (ROOT / "recipes" / f"{name}.py" for name in ("digits", "cifar", "lm"))
# what travels as wheels (cp312, manylinux x86_64: the GPU machine's Python); torchvision must match its torch
WHEELS = ["deepspeed==0.19.8", "hjson", "msgpack", "ninja", "py-cpuinfo", "einops", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection", "airbench==0.1.8"]
MODULES = {"deepspeed": "deepspeed", "hjson": "hjson", "msgpack": "msgpack", "ninja": "ninja", "py_cpuinfo": "cpuinfo",
           "einops": "einops", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
           "annotated_types": "annotated_types", "typing_inspection": "typing_inspection", "airbench": "airbench",
           "torchvision": "torchvision"}  # wheel name → the module that says it is installed
LM_WARMUP = 30  # steps left out of the language model's rates: compilation, allocator warm-up


class StepError(Exception):
    """A step's command failed: its last lines."""


@dataclass
class Setup:
    out: Path
    scratch: Path
    smoke: bool
    seeds: int
    carry: Path | None
    results: dict = field(default_factory=dict)

    @property
    def where(self) -> list[str]:
        return ["--cpu"] if self.smoke else ["--gpus", "1"]

    @property
    def cifar_data(self) -> Path:
        return self.scratch / "fake-cifar" if self.smoke else self.carry / "cifar10-jpeg.tar.gz"


# ------------------------------------------------------------------ running things


def command(cmd: list, name: str, setup: Setup, timeout: float, env: dict | None = None) -> str:
    """Run `cmd`; its output goes to OUT/runs/NAME.log; a failure raises StepError with its last lines."""
    cmd = [str(c) for c in cmd]
    log = setup.out / "runs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        log.write_text(f"$ {' '.join(cmd)}\n{e.stdout or ''}{e.stderr or ''}")
        raise StepError(f"{name}: no end after {timeout:.0f} s") from None
    log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    if done.returncode:
        tail = " / ".join((done.stderr.strip() or done.stdout.strip()).splitlines()[-4:])
        raise StepError(f"{name}: exit {done.returncode}: {tail}")
    return done.stdout


def launch(recipe: Path, name: str, setup: Setup, *flags, timeout: float = 300, env: dict | None = None) -> list:
    """One launcher run; its metrics records (metrics.jsonl is also copied beside its log)."""
    run_dir = setup.scratch / "runs" / name
    command([sys.executable, "-m", "launcher", recipe, *flags, "--wandb", "disabled", "--run-dir", run_dir],
            name, setup, timeout, env)
    shutil.copy(run_dir / "metrics.jsonl", setup.out / "runs" / f"{name}.metrics.jsonl")
    return accuracy.records(run_dir)


def last(rows: list[dict], key: str):
    return next(r[key] for r in reversed(rows) if key in r)


# ------------------------------------------------------------------ the steps


def smoke(setup: Setup) -> dict:
    """digits.py on one GPU and in one process (--debug), bf16 and fp16: exit 0, and the validation accuracy."""
    short = ["--max-steps", "20" if setup.smoke else "200"]
    runs = {}
    for where, flags in (("gpu", setup.where), ("debug", ["--debug"])):
        for precision in ("bf16", "fp16"):
            start = time.time()
            rows = launch(DIGITS, f"digits-{where}-{precision}", setup, *flags, "--precision", precision, *short)
            runs[f"{where} {precision}"] = {"val_acc": last(rows, "val/acc"), "steps": last(rows, "step"),
                                            "wall_s": round(time.time() - start, 1)}  # --debug skips the test split
    return runs


def cifar(setup: Setup) -> dict:
    """The recipe over seeds, and airbench94 on the same images where CUDA is."""
    flags = [*setup.where, "--precision", "bf16", "--data-dir", setup.cifar_data,
             "--cache-dir", setup.scratch / "cache"]
    if setup.smoke:
        flags += ["--width", "8", "--max-steps", "4", "--batch-size", "64", "--tta", "none"]  # TTA: 6 passes
    ours = accuracy.measure(setup.seeds, [str(f) for f in flags], setup.scratch / "cifar", timeout=600)
    result = {"launcher": ours}
    ref = setup.out / "airbench.json"
    try:  # the reference's failure (a torchvision that does not fit this torch) leaves the recipe's figures
        command([sys.executable, HERE / "airbench_ref.py", "--data", setup.cifar_data, "--seeds", setup.seeds,
                 "--cache-dir", setup.scratch / "cache", "--work", setup.scratch / "airbench", "--json", ref],
                "airbench", setup, timeout=600)
        result["airbench"] = theirs = json.loads(ref.read_text())
    except StepError as e:
        result["airbench"] = theirs = {"error": str(e)}
    if "mean_acc" in theirs:
        result["accuracy_gap"] = ours["mean_acc"] - theirs["mean_acc"]
        result["train_time_ratio"] = ours["mean_train_s"] / theirs["mean_train_s"]
    return result


def rates(rows: list[dict], warmup: int) -> dict:
    """Medians over the windows after `warmup` steps: tokens/s, samples/s, MFU, step time."""
    timed = [r for r in rows if "step_time" in r and r["step"] > warmup] or [r for r in rows if "step_time" in r]
    out = {key: statistics.median(r[key] for r in timed)
           for key in ("tokens_per_s", "samples_per_s", "mfu", "step_time") if all(key in r for r in timed)}
    return {**out, "windows": len(timed)}


def lm(setup: Setup) -> dict:
    """GPT-2's 124M shape in bf16: compiled under DDP, then DDP, FSDP and ZeRO-2 without compiling."""
    if setup.smoke:
        shape = ["--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch-size", "8",
                 "--max-steps", "12", "--log-every", "2"]
        warmup = 4
    else:
        shape = ["--size", "gpt2", "--max-steps", "100", "--log-every", "10"]
        warmup = LM_WARMUP
    engines = {"DDP, --compile": ["--compile"], "DDP": [], "FSDP": ["--engine", "fsdp"]}
    if importlib.util.find_spec("deepspeed"):
        engines["DeepSpeed ZeRO-2"] = ["--engine", "deepspeed", "--zero", "2"]
    out = {}
    if setup.smoke:  # inductor compiles for half a minute on the CPU; tests/test_train.py compiles there already
        del engines["DDP, --compile"]
        out["DDP, --compile"] = {"skipped": "not compiled in smoke mode"}
    for name, flags in engines.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        try:
            rows = launch(LM, f"lm-{slug}", setup, *setup.where, "--precision", "bf16", *shape, "--eval-epochs", "0",
                          *flags, timeout=420)
            out[name] = rates(rows, warmup)
        except StepError as e:  # one engine's failure does not hide the others' figures
            out[name] = {"error": str(e)}
    if not importlib.util.find_spec("deepspeed"):
        out["DeepSpeed ZeRO-2"] = {"skipped": "deepspeed is not installed"}
    return out


def compare_fp16(ddp: list[dict], ds: list[dict], rel: float = 1e-2) -> dict:
    """DeepSpeed's fp16 against DDP's, step by step: the loss scale must be the same at every logged step, the
    skipped steps the same, and the gradient norm and loss equal within `rel` (fp16 sums in another order)."""
    a, b = ([r for r in rows if "loss_scale" in r] for rows in (ddp, ds))
    if not a or len(a) != len(b):
        return {"verified": False, "why": f"{len(a)} logged steps under DDP, {len(b)} under DeepSpeed"}

    def close(x: float, y: float) -> bool:  # a skipped step's norm is inf or nan, on both sides alike
        if not (math.isfinite(x) and math.isfinite(y)):
            return not math.isfinite(x) and not math.isfinite(y)
        return abs(x - y) <= rel * max(abs(x), abs(y))

    for ra, rb in zip(a, b, strict=True):
        for key, same in (("loss_scale", float.__eq__), ("grad_norm", close), ("train/loss", close)):
            x, y = float(ra[key]), float(rb[key])
            if not same(x, y):
                return {"verified": False, "why": f"step {ra['step']}: {key} {x:.6g} under DDP, {y:.6g} under "
                                                  "DeepSpeed"}
    return {"verified": True, "steps": len(a), "loss_scales": sorted({r["loss_scale"] for r in a}),
            "skipped_steps": sum(1 for r in a if not math.isfinite(r["grad_norm"])),
            "final_loss": [a[-1]["train/loss"], b[-1]["train/loss"]]}


def deepspeed_fp16(setup: Setup) -> dict:
    """The tiny language model in fp16, DDP against DeepSpeed ZeRO-2 with its own loss scaler."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "DeepSpeed's fp16 needs a GPU"}
    if not importlib.util.find_spec("deepspeed"):
        return {"skipped": "deepspeed is not installed"}
    flags = [*setup.where, "--precision", "fp16", "--max-steps", "60", "--log-every", "1", "--eval-epochs", "0",
             "--seed", "0", "--clip-grad", "1.0"]
    ddp = launch(LM, "fp16-ddp", setup, *flags)
    ds = launch(LM, "fp16-deepspeed", setup, *flags, "--engine", "deepspeed", "--zero", "2",
                env={"LAUNCH_UNVERIFIED_DEEPSPEED_FP16": "1"})
    return compare_fp16(ddp, ds)


def overhead(setup: Setup) -> dict:
    """benchmarks/overhead.py's MLP and CIFAR-10 rows on the GPU (on the CPU in smoke mode): its table."""
    if setup.smoke:
        flags, env = ["--reps", "1", "--steps", "300", "--cifar-reps", "0", "--per-step-reps", "1",
                      "--per-step-steps", "50"], {}
    else:
        flags, env = ["--gpu", "--reps", "3", "--steps", "1500", "--cifar-reps", "2"], {"CIFAR10_DIR": str(setup.carry)}
    text = command([sys.executable, HERE / "overhead.py", *flags, "--epoch-reps", "0", "--startup-reps", "0",
                    "--cache-dir", setup.scratch / "cache"],
                   "overhead", setup, timeout=540, env=env)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| measure")]
    return {"table": rows, "ratios": [float(m.group(1)) for line in rows
                                      if (m := re.search(r"\| ([0-9.]+) \(min", line))]}


def checkpoint(setup: Setup) -> dict:
    """benchmarks/checkpoint.py on the GPU (on the CPU at a tiny size in smoke mode): its table."""
    size = ["--procs", "2", "--width", "128", "--layers", "2", "--repeats", "1"] if setup.smoke else \
        ["--procs", "1", "--width", "8192", "--layers", "4", "--repeats", "2", "--gpu"]
    folder = setup.scratch / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    text = command([sys.executable, HERE / "checkpoint.py", *size, "--dir", folder], "checkpoint", setup,
                   timeout=400)
    return {"machine": next(line for line in text.splitlines() if line.startswith("machine:")),
            "table": [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| save")]}


def flight_recorder(setup: Setup) -> dict:
    """A rank that hangs after the first step, on two GPUs: the job fails after --step-timeout, NCCL's flight
    recorder has dumped into the run's logs, the failure says where and how to read it, and torchfrtrace reads it."""
    import torch

    if setup.smoke or torch.cuda.device_count() < 2:
        return {"skipped": "the flight recorder needs 2 GPUs (NCCL runs one rank on each)"}
    from launcher.processes import flight

    run_dir, log = setup.scratch / "runs" / "flight-recorder", setup.out / "runs" / "flight-recorder.log"
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "launcher", ROOT / "tests" / "recipes" / "tiny.py", "--gpus", "2",
                           "--crash-at", "5", "--crash-rank", "1", "--fault", "hang", "--timeout", "120",
                           "--step-timeout", "20", "--wandb", "disabled", "--run-dir", run_dir],
                          capture_output=True, text=True, timeout=400)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    folder = flight.folder(run_dir)
    dumps = sorted(p.name for p in folder.glob(f"{flight.PREFIX}*"))
    read = subprocess.run(["torchfrtrace", folder, "-p", flight.PREFIX, "--allow-incomplete-ranks"],
                          capture_output=True, text=True, timeout=120)
    (setup.out / "runs" / "torchfrtrace.log").write_text(read.stdout + read.stderr)
    result = {"exit": done.returncode, "wall_s": round(time.time() - start, 1), "dumps": dumps,
              "told": f"torchfrtrace {folder}" in done.stderr, "torchfrtrace_exit": read.returncode,
              "torchfrtrace_tail": (read.stdout + read.stderr).strip().splitlines()[-5:]}
    if done.returncode != 1 or not dumps or not result["told"] or read.returncode:
        raise StepError(f"flight recorder: {json.dumps(result)}")
    return result


STEPS = {"smoke": smoke, "cifar": cifar, "lm": lm, "deepspeed-fp16": deepspeed_fp16, "overhead": overhead,
         "checkpoint": checkpoint, "flight-recorder": flight_recorder}


# ------------------------------------------------------------------ set-up, data and the report


def install(carry: Path | None) -> list[str]:
    """The carried wheels whose module is missing, installed without dependencies; then this project, unpinned
    (the machine's torch stays)."""
    done = []
    wheels = sorted((carry / "wheels").glob("*.whl")) if carry else []
    modules = {w: MODULES.get(w.name.split("-")[0].lower()) for w in wheels}
    missing = [w for w, module in modules.items() if module is None or not importlib.util.find_spec(module)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    env = {**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1"}  # a machine's own Python, set up for throw-away runs
    if missing:
        subprocess.run([*pip, *map(str, missing)], check=True, env=env)
        done += [w.name for w in missing]
    if not importlib.util.find_spec("launcher"):
        if subprocess.run([*pip, "--no-build-isolation", "-e", str(ROOT)], env=env).returncode == 0:
            done.append("launcher (-e, no dependencies)")
        else:  # no setuptools to build with: every process finds the checkout on the path instead
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            done.append(f"launcher on PYTHONPATH ({ROOT})")
    importlib.invalidate_caches()
    return done


def fake_cifar(folder: Path, per_class: int = 40) -> None:
    """CIFAR-10's pickle layout with made-up images, a colour per class: the smoke run's data."""
    import numpy as np

    g = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_class) for i in range(1, 6)] + [("test_batch", 2 * per_class)]:
        labels = np.arange(n * 10) % 10
        images = g.integers(0, 64, (n * 10, 3, 32, 32)) + (labels * 19)[:, None, None, None]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.astype(np.uint8).reshape(n * 10, -1), "labels": labels.tolist()}, f)


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def smoke_md(result: dict) -> list[str]:
    return ["| run | val acc | steps | wall s |", "|---|---|---|---|",
            *(f"| {name} | {r['val_acc']:.4f} | {r['steps']} | {r['wall_s']:.1f} |" for name, r in result.items())]


def cifar_md(result: dict) -> list[str]:
    lines = [accuracy.table(result["launcher"]), ""]
    ref = result["airbench"]
    if "mean_acc" in ref:
        lines += [f"airbench94 on the same images: {ref['mean_acc']:.4f} ± {ref['std_acc']:.4f} over {ref['seeds']} "
                  f"seeds, {ref['mean_train_s']:.2f} s of training; the recipe: {result['accuracy_gap']:+.4f} "
                  f"accuracy, {result['train_time_ratio']:.2f}× the training time"]
    else:
        lines.append(f"airbench94: {ref.get('skipped') or ref.get('error')}")
    return lines


def lm_md(result: dict) -> list[str]:
    lines = ["| engine | tokens/s | MFU | ms/step |", "|---|---|---|---|"]
    for name, r in result.items():
        if "tokens_per_s" in r:
            mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "–"
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {1000 * r['step_time']:.1f} |")
        else:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error')} | | |")
    return lines


def fp16_md(result: dict) -> list[str]:
    if not result["verified"]:
        return [f"not verified: {result['why']}"]
    scales = ", ".join(map(str, result["loss_scales"]))
    return [f"verified over {result['steps']} steps: the same loss scales ({scales}), {result['skipped_steps']} "
            "skipped steps each, gradient norms and losses within 1 %; final loss "
            f"{result['final_loss'][0]:.4f} (DDP) and {result['final_loss'][1]:.4f} (DeepSpeed)"]


def overhead_md(result: dict) -> list[str]:
    return ["| measure | launcher | reference | ratio |", "|---|---|---|---|", *result["table"]]


def checkpoint_md(result: dict) -> list[str]:
    return [result["machine"], "", "| save | peak MB, busiest rank | vs gather | training stalls, s | vs sync | "
            "complete, s | MB/s | vs disk |", "|---|---|---|---|---|---|---|---|", *result["table"]]


def flight_md(result: dict) -> list[str]:
    return [f"exit {result['exit']} after {result['wall_s']:.0f} s; dumps {', '.join(result['dumps'])}; the failure "
            f"named them: {result['told']}; torchfrtrace:", "", "```", *result["torchfrtrace_tail"], "```"]


MARKDOWN = {"smoke": smoke_md, "cifar": cifar_md, "lm": lm_md, "deepspeed-fp16": fp16_md, "overhead": overhead_md,
            "checkpoint": checkpoint_md, "flight-recorder": flight_md}


def report(setup: Setup) -> None:
    """results.json, and results.md: a table per step."""
    (setup.out / "results.json").write_text(json.dumps(setup.results, indent=1, default=str))
    r = setup.results
    lines = [f"# GPU proof: {r['machine']['device']}, torch {r['machine']['torch']} (CUDA {r['machine']['cuda']}), "
             f"{r['machine']['date']}", "", f"`{r['command']}`", ""]
    for name, step in r["steps"].items():
        lines += [f"## {name}: {step['status']} ({step['seconds']:.0f} s)", ""]
        if step["status"] != "ok":
            lines += [step.get("why", ""), ""]
            continue
        lines += [*MARKDOWN[name](step["result"]), ""]
    (setup.out / "results.md").write_text("\n".join(lines))


def run(setup: Setup, only: list[str]) -> int:
    setup.results = {"command": " ".join(sys.argv), "installed": install(setup.carry), "machine": machine(),
                     "steps": {}}
    if setup.smoke:
        fake_cifar(setup.cifar_data)
    for name in only:
        start, entry = time.time(), {}
        print(f"gpu.py: {name}", file=sys.stderr, flush=True)
        try:
            result = STEPS[name](setup)
            entry = {"status": "skipped", "why": result["skipped"]} if "skipped" in result else \
                {"status": "ok", "result": result}
        except Exception as e:  # recorded; the next step still runs
            entry = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
        setup.results["steps"][name] = {**entry, "seconds": round(time.time() - start, 1)}
        print(f"gpu.py: {name} {entry['status']} in {time.time() - start:.0f} s {entry.get('why', '')}",
              file=sys.stderr, flush=True)
        report(setup)
    return 1 if any(s["status"] == "failed" for s in setup.results["steps"].values()) else 0


def pack(folder: Path, python: str, torchvision: str) -> None:
    """Wheels for the GPU machine's Python and the data, into `folder` (an ignored folder of the checkout)."""
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    binary = [f for f in WHEELS if not f.startswith(("deepspeed", "airbench"))] + [f"torchvision=={torchvision}"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux2014_x86_64", "--python-version", python, "-d", wheels, *binary],
                   check=True)
    for sdist in ("deepspeed==0.19.8", "airbench==0.1.8"):  # pure Python, shipped as sources: built here
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", sdist, "-w", wheels], check=True)
    data = Path(os.environ.get("CIFAR10_DIR", ROOT.parent / "shared" / "data")) / "cifar10-jpeg.tar.gz"
    if not data.exists():
        sys.exit(f"gpu.py pack: no {data}; set CIFAR10_DIR to the folder that holds cifar10-jpeg.tar.gz")
    shutil.copy(data, folder / data.name)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"packed {folder}: {size / 2**20:.1f} MiB; on the GPU machine, with it carried: "
          f"python benchmarks/gpu.py run $OUT --carry {folder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack", help="wheels and data for the GPU machine")
    p.add_argument("folder", type=Path)
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    p.add_argument("--torchvision", default="0.26.0", help="the torchvision of its torch (0.26.0 for torch 2.11)")
    r = sub.add_parser("run", help="the steps, results into OUT")
    r.add_argument("out", type=Path)
    r.add_argument("--carry", type=Path, help="the folder `pack` filled")
    r.add_argument("--smoke", action="store_true", help="on the CPU, tiny sizes")
    r.add_argument("--seeds", type=int, help="CIFAR-10 seeds (default 3, 2 in smoke mode)")
    r.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), help="which steps (default all)")
    r.add_argument("--scratch", type=Path, help="run folders and caches (default: a temporary folder)")
    args = ap.parse_args()
    if args.what == "pack":
        return pack(args.folder, args.python, args.torchvision)
    if not args.smoke and not (args.carry and (args.carry / "cifar10-jpeg.tar.gz").exists()):
        ap.error("run without --smoke needs --carry, the folder `pack` filled")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(args.out.resolve(), (args.scratch or Path(tmp)).resolve(), args.smoke,
                      args.seeds or (2 if args.smoke else 3), args.carry and args.carry.resolve())
        sys.exit(run(setup, args.steps))


if __name__ == "__main__":
    main()
