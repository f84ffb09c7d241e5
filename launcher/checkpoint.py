"""Checkpoints: whole directories, written atomically, verified before use, loaded without running code.

    RUN_DIR/checkpoints/step-00000120/  state.pt       model, optimizer, scheduler, loss scaler, progress (rank 0)
                                        rng-0.pt …     each rank's random generators
                                        manifest.json  written last: step, plan, and size + sha256 of every file
    RUN_DIR/checkpoints/best/           the same, for the best evaluation so far

A checkpoint is assembled under a hidden temporary name and renamed into place when complete, so a
`step-*` directory is never half written; its manifest tells a truncated or damaged file from a good
one. Files are read with `torch.load(weights_only=True)`: tensors and plain containers only, never
arbitrary pickled objects.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickletools
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .text import first_line

STEP_DIR = re.compile(r"step-(\d+)")


def folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _write(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(target: Path, state: dict, meta: dict, rank: int, barrier: Callable[[], None],
         engine_files: Callable[[Path], None]) -> None:
    """Every rank calls this at the same step. Rank 0 writes `state`, every rank its random generators and
    what `engine_files` writes (DeepSpeed: its partitions); rank 0 then writes the manifest and renames the
    whole directory into place."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
            _write(state, tmp / "state.pt")
        barrier()
        engine_files(tmp)
        _write(rng_state(), tmp / f"rng-{rank}.pt")
    except Exception as e:
        if not disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # what fitted so far is space the next save needs
        raise CheckpointError(no_space(f"saving checkpoint {target.name}", target.parent,
                                       target.parent.parent)) from None
    barrier()
    if rank == 0:
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
        _fsync_dir(tmp)
        if target.exists():  # a step saved again after a resume, or the previous best
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    barrier()


def verify(path: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint, or CheckpointError naming the bad file."""
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{manifest_path} is missing or unreadable ({e}): the checkpoint is incomplete") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} is truncated or damaged: {size} bytes, "
                                  f"the manifest says {expected['bytes']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} is damaged: its sha256 differs from the manifest's")
    if "state.pt" not in files:
        raise CheckpointError(f"{path} has no state.pt")
    return manifest


def check(path: Path) -> dict:
    """verify(), and read every file as the workers will, without running code: the manifest."""
    manifest = verify(path)
    for name in manifest["files"]:
        if name.endswith(".pt"):
            try:
                with torch.serialization.safe_globals(_safe_globals(path / name)), warnings.catch_warnings():
                    # torch's aside on a pickle protocol it did not write (crafted files use the newest): what
                    # matters is whether the file loads safely, which the error below says in one line
                    warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                    torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise unsafe(path / name, e) from None
    return manifest


def unsafe(file: Path, e: Exception) -> CheckpointError:
    """A file torch.load(weights_only=True) refused, in plain words: the global it would have had to import
    (a crafted file names os.system, say) rather than torch's advice to load it unsafely."""
    allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    extra = torch.serialization.get_safe_globals() + _safe_globals(file)
    allowed |= {f"{g.__module__}.{g.__qualname__}" for g in extra}
    foreign = next((g for g in referenced_globals(file) if g not in allowed), None)
    if foreign:
        return CheckpointError(f"{file} cannot be loaded safely: it refers to {foreign}, which is neither a tensor nor "
                               "plain data (a crafted or foreign file?); nothing in it was run")
    return CheckpointError(f"{file} cannot be loaded safely ({type(e).__name__}: {first_line(e)})")


def referenced_globals(file: Path) -> list[str]:
    """The globals (module.name) a torch file's pickle imports, read from its opcodes without running any."""
    try:
        with zipfile.ZipFile(file) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except Exception:  # not a zip, no pickle, or one broken too badly to read: nothing to name
        return []


def _safe_globals(file: Path) -> list:
    return _deepspeed_globals() if "deepspeed" in file.parts else []


def _deepspeed_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its optimizer files (fp16's dynamic loss scaler among
    them), and nothing that runs code."""
    from .zero import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def causes(e: BaseException | None):
    """The exception and those it was raised from or during, innermost last."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> bool:
    """Whether a failure comes from a full disk or quota, however it was wrapped (torch.save raises a
    RuntimeError whose context is the OSError)."""
    return any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in causes(e))


def no_space(what: str, path: Path, run_dir: str | Path) -> str:
    """`what` failed for want of space: the filesystem holding `path` by its mount point, what is free on it,
    and the checkpoint a resume would start from."""
    mount = Path(path).resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    free, kept = shutil.disk_usage(mount).free, step_dirs(run_dir)
    return (f"{what} failed: no space left on the filesystem at {mount} ({free / 2**20:.1f} MiB free); the newest "
            f"complete checkpoint is {kept[0] if kept else 'none'}")


def clean(run_dir: str | Path) -> None:
    """Remove what saves that were killed left behind (.NAME.tmp, .NAME.old): only a run that holds the run
    directory calls this, so no live save owns them."""
    for path in folder(run_dir).glob(".*"):
        if path.is_dir() and path.suffix in (".tmp", ".old"):
            shutil.rmtree(path, ignore_errors=True)


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, newest first."""
    found = [(int(m.group(1)), p) for p in folder(run_dir).glob("step-*") if (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest(run_dir: str | Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; each one passed over is reported through `warn`."""
    for path in step_dirs(run_dir):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"{e}; falling back to an earlier checkpoint")
    return None


def load_state(path: Path) -> dict:
    """On the CPU: load_state_dict() copies to wherever the model and optimizer live."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise unsafe(path / "state.pt", e) from None


def load_rng(path: Path, rank: int) -> dict | None:
    file = path / f"rng-{rank}.pt"
    return torch.load(file, weights_only=True) if file.exists() else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest step checkpoints (the best one lives apart and stays)."""
    if keep > 0:
        for path in step_dirs(run_dir)[keep:]:
            shutil.rmtree(path, ignore_errors=True)
