"""Checkpoints: whole directories, written atomically, verified before use, loaded without running code.

    RUN_DIR/checkpoints/step-00000120/  state.pt       model, optimizer, scheduler, loss scaler, progress (rank 0)
                                        rng-0.pt …     each rank's random generators
                                        manifest.json  written last: step, plan, and size + sha256 of every file
    RUN_DIR/checkpoints/best/           the same, for the best evaluation so far

A checkpoint is assembled under a hidden temporary name and renamed into place when complete, so a
`step-*` directory is never half written; its manifest tells a truncated or damaged file from a good
one. Run directories sit on shared filesystems where others may write, so reading one trusts nothing
but the manifest: a directory holding a file it does not list, a symbolic link or anything but regular
files is refused before any library sees it (listing); each file is hashed through the descriptor it is
then read from, never through a link (Reader.load); and it is unpickled with
`torch.load(weights_only=True)`: tensors and plain containers only, never code. DeepSpeed's own loaders,
which glob their folder and unpickle with weights_only off, run inside `reading()`, where every
torch.load of the process goes through the same verified path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ForeignCheckpoint
from ..text import count
from .pickles import allowed_globals, unsafe

STEP_DIR = re.compile(r"step-(\d+)")
MANIFEST = "manifest.json"
MAX_MANIFEST = 16 << 20  # bytes: a manifest lists files, it is never this large
ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes begins


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
    with open(path, "rb") as f:
        return _digest(f)


def _digest(f) -> str:
    """The sha256 of what `f` holds from where it stands, read through one buffer (no new bytes per chunk)."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 22)
    view = memoryview(buffer)
    while read := f.readinto(buffer):
        digest.update(view[:read])
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(target: Path, state: dict, meta: dict, rank: int, barrier: Callable[[], None],
         engine_files: Callable[[Path], dict[str, str] | None]) -> None:
    """Every rank calls this at the same step. Rank 0 writes `state`, every rank its random generators and
    what `engine_files` writes (DeepSpeed: its partitions; the shards, whose digests it returns on rank 0); rank 0
    then writes the manifest and renames the whole directory into place."""
    tmp, hashed = begin(target, state, rank, barrier, engine_files)
    barrier()
    if rank == 0:
        publish(tmp, target, meta, hashed)
    barrier()


def begin(target: Path, state: dict, rank: int, barrier: Callable[[], None],
          engine_files: Callable[[Path], dict[str, str] | None]) -> tuple[Path, dict[str, str]]:
    """A checkpoint's files, under its temporary name: rank 0's `state`, each rank's random generators and what
    `engine_files` writes; (the temporary folder, the digests engine_files returned). A full disk is
    CheckpointError, what fitted removed."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
            _write(state, tmp / "state.pt")
        barrier()
        hashed = engine_files(tmp) or {}
        _write(rng_state(), tmp / f"rng-{rank}.pt")
    except Exception as e:
        if not disk_full(e):
            raise
        raise full(target, tmp) from None
    return tmp, hashed


def full(target: Path, tmp: Path) -> CheckpointError:
    """No space for checkpoint `target`: what fitted so far is removed, as it is space the next save needs."""
    shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(no_space(f"saving checkpoint {target.name}", target.parent, target.parent.parent))


def publish(tmp: Path, target: Path, meta: dict, hashed: dict[str, str] | None = None) -> None:
    """Rank 0, once every rank's files are in `tmp`: the manifest (`meta` and every file's size and hash), and the
    directory renamed into place, fsynced; the checkpoint counts from here. `hashed`: the sha256 of files hashed
    as they were written (by their names in the manifest), which are not read again."""
    hashed = hashed or {}
    paths = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
    unknown = [name for name in paths if name not in hashed]
    with ThreadPoolExecutor(max_workers=min(8, len(unknown) or 1)) as pool:  # hashlib lets go of the GIL
        hashed = {**hashed, **dict(zip(unknown, pool.map(_sha256, (paths[name] for name in unknown)), strict=True))}
    files = {name: {"bytes": p.stat().st_size, "sha256": hashed[name]} for name, p in paths.items()}
    (tmp / MANIFEST).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
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


def optimizer_carries(written: str, engine: str) -> bool:
    """Whether `engine` can take the optimizer state of a checkpoint the engine `written` saved: DeepSpeed keeps
    it in partitions of its own that no other engine reads, and cannot read the others' (their weights carry)."""
    return (written == "deepspeed") == (engine == "deepspeed")


def verify(path: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint that holds nothing else, or CheckpointError naming what
    is wrong; every file hashed, none loaded."""
    manifest = listing(path)
    for name in manifest["files"]:
        with _opened(path, name, manifest):
            pass
    return manifest


def check(path: Path, but: str | None = None) -> dict:
    """verify(), and every torch file read as the workers will read it, without running code: the manifest. The
    files under the folder `but` are left to the caller, which reads them itself (the shards: sharded.check)."""
    with reading(path) as ckpt:
        for name in ckpt.manifest["files"]:
            if but and name.startswith(f"{but}/"):
                continue
            if name.endswith(".pt"):
                ckpt.load(name)
            else:
                with _opened(path, name, ckpt.manifest):
                    pass
    return ckpt.manifest


def listing(path: Path) -> dict:
    """The manifest, once the directory is seen to hold exactly the files it lists: regular files, no symbolic
    link, nothing it does not list (a partition planted beside DeepSpeed's, which DeepSpeed's own loaders would
    glob and unpickle); hashes are checked where a file is opened. CheckpointError otherwise."""
    if path.is_symlink():
        raise ForeignCheckpoint(f"{path} is a symbolic link, not a checkpoint directory: give the directory itself")
    if not path.is_dir():
        raise ForeignCheckpoint(f"{path} is not a checkpoint directory")
    try:
        with _open_inside(path, MANIFEST) as f:
            text = f.read(MAX_MANIFEST + 1)
        if len(text) > MAX_MANIFEST:
            raise ValueError(f"over {MAX_MANIFEST >> 20} MiB")
        manifest = json.loads(text)
        files = manifest["files"]
        if not all(_plain_name(n) and isinstance(e, dict) and {"bytes", "sha256"} <= e.keys()
                   for n, e in files.items()):
            raise ValueError("a file entry is not a plain relative name with its size and hash")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise CheckpointError(f"{path / MANIFEST} is missing or unreadable ({reason}): the checkpoint is incomplete "
                              "or not the launcher's") from None
    if "state.pt" not in files:
        raise CheckpointError(f"{path} has no state.pt")
    entries = _entries(path)
    odd = next((name for name, kind in entries.items() if kind != "file"), None)
    if odd:
        raise ForeignCheckpoint(f"{path / odd} is {entries[odd]}: refused, as it may point outside the checkpoint "
                              "or block a read; nothing in the checkpoint was loaded")
    stray = [name for name in entries if name not in files and name != MANIFEST]
    if stray:
        shown = ", ".join(stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
        raise ForeignCheckpoint(f"{path} holds {count(len(stray), 'file')} that its manifest does not list ({shown}): "
                              "planted, or left by another program? Nothing in the checkpoint was loaded; remove "
                              f"{'it' if len(stray) == 1 else 'them'} to use it")
    missing = next((name for name in files if name not in entries), None)
    if missing:
        raise CheckpointError(f"{path / missing} is missing")
    return manifest


def _plain_name(name: str) -> bool:
    """A name inside the directory: relative, in normal form, without a way up."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and "\\" not in name and "\0" not in name


def _entries(path: Path) -> dict[str, str]:
    """Everything under `path` but its directories, by name relative to it, and what it is: a file, a symbolic
    link (never followed) or another kind of file."""
    found = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            found.update({f"{entry.name}/{name}": kind for name, kind in _entries(Path(entry.path)).items()})
        else:
            found[entry.name] = "file" if entry.is_file(follow_symlinks=False) else \
                "a symbolic link" if entry.is_symlink() else "not a regular file"
    return found


def _open_inside(root: Path, name: str):
    """`root/name` opened for reading without following a symbolic link at any depth (one swapped in after the
    listing included), as a regular file: nothing outside the checkpoint is ever read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW
    fd = os.open(root, flags | os.O_DIRECTORY)
    try:
        *folders, leaf = name.split("/")
        for part in folders:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        file = os.open(leaf, flags | os.O_NONBLOCK, dir_fd=fd)  # a FIFO would block an open without it
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ForeignCheckpoint(f"{root / name} is a symbolic link or sits under one: refused, as it may point "
                                  "outside the checkpoint") from None
        raise
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file).st_mode):
        os.close(file)
        raise ForeignCheckpoint(f"{root / name} is not a regular file")
    os.set_blocking(file, True)
    return os.fdopen(file, "rb")


@contextmanager
def _opened(root: Path, name: str, manifest: dict):
    """The listed file `name`, open and checked against the manifest (size, then sha256 of what this very
    descriptor reads), positioned at its start."""
    expected = manifest["files"].get(name)
    if expected is None:
        raise ForeignCheckpoint(f"{root / name} is not listed in {root / MANIFEST}: refused (planted, or left by "
                              "another program?)")
    try:
        f = _open_inside(root, name)
    except FileNotFoundError:
        raise CheckpointError(f"{root / name} is missing") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{root / name} is truncated or damaged: {size} bytes, the manifest says "
                                  f"{expected['bytes']}")
        if _digest(f) != expected["sha256"]:
            raise CheckpointError(f"{root / name} is damaged: its sha256 differs from the manifest's")
        f.seek(0)
        yield f


@dataclass
class Reader:
    """A checkpoint being read: each file that is loaded is one the manifest lists, verified as it is opened
    and unpickled with weights_only (tensors and plain data, never code)."""

    path: Path
    manifest: dict
    scratch: Path | None = None

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def load(self, name: str, map_location="cpu"):
        file = self.path / name
        with _opened(self.path, name, self.manifest) as f:
            if f.read(4) != ZIP_MAGIC:
                raise ForeignCheckpoint(f"{file} is not in the format torch.save writes (a zip archive): an old or "
                                      "foreign file, which the launcher never wrote; nothing in it was loaded")
            f.seek(0)
            try:
                with torch.serialization.safe_globals(allowed_globals(name)), warnings.catch_warnings():
                    # torch's aside on a pickle protocol it did not write (crafted files use the newest): what
                    # matters is whether the file loads safely, which the error below says in one line
                    warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                    # torch.load itself is library_load inside reading()
                    return torch.serialization.load(f, map_location=map_location, weights_only=True)
            except Exception as e:
                raise unsafe(file, f, e) from None

    @contextmanager
    def open(self, name: str):
        """The listed file `name`, open, verified against the manifest, at its start."""
        with _opened(self.path, name, self.manifest) as f:
            yield f

    def library_load(self, f, map_location=None, *args, **kwargs):
        """torch.load as the libraries reading the checkpoint call it (DeepSpeed's loaders, with weights_only
        off): a file of this checkpoint that the manifest lists, read by load(); anything else refused. A file
        object (DCP's slices of a file it opened through open()) is read with weights_only alone."""
        if not isinstance(f, (str, os.PathLike)) and kwargs.get("weights_only") is True:
            return torch.serialization.load(f, map_location=map_location, weights_only=True)
        if not isinstance(f, (str, os.PathLike)):
            raise ForeignCheckpoint(f"reading {self.path}: a library loaded a file object rather than a file of the "
                                  "checkpoint, which cannot be verified: refused")
        if self.scratch and within(f, self.scratch) is not None:  # what the library wrote there from verified files
            with torch.serialization.safe_globals(allowed_globals("deepspeed")):
                return torch.serialization.load(f, map_location=map_location, weights_only=True)
        name = within(f, self.path)
        if name is None:
            raise ForeignCheckpoint(f"reading {self.path}: a library asked for {f}, outside the checkpoint: refused")
        return self.load(name, map_location)


def within(f: str | os.PathLike, folder: Path) -> str | None:
    """`f`'s path inside `folder` (posix, as the manifest names files), or None where it lies outside."""
    name = os.path.relpath(os.path.normpath(os.path.abspath(f)), os.path.abspath(folder))
    return None if name == ".." or name.startswith(("../", "/")) else Path(name).as_posix()


@contextmanager
def reading(path: Path, scratch: Path | None = None) -> Iterator[Reader]:
    """The checkpoint at `path`, listed (listing()), for the duration of which every torch.load in this process,
    those inside DeepSpeed's loaders included, reads through Reader.library_load. DeepSpeed globs its folder
    and unpickles what it finds with weights_only off: so it sees the listed, verified files alone, and code in
    none of them runs. `scratch`: a private folder (mode 0700) where a library writes what it reads back (DeepSpeed's
    conversion to a universal checkpoint), read with weights_only too."""
    ckpt = Reader(path, listing(path), scratch)
    original = torch.load
    torch.load = ckpt.library_load
    try:
        yield ckpt
    finally:
        torch.load = original


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
    """The newest checkpoint that verifies; each damaged one passed over is reported through `warn`. One that holds
    what the launcher never wrote (ForeignCheckpoint) is not passed over: it is raised."""
    for path in step_dirs(run_dir):
        try:
            verify(path)
            return path
        except ForeignCheckpoint:
            raise
        except CheckpointError as e:
            warn(f"{e}; falling back to an earlier checkpoint")
    return None


def load_state(path: Path) -> dict:
    """state.pt, verified and read without running code, on the CPU."""
    with reading(path) as ckpt:
        return ckpt.load("state.pt")


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest step checkpoints (the best one lives apart and stays)."""
    if keep > 0:
        for path in step_dirs(run_dir)[keep:]:
            shutil.rmtree(path, ignore_errors=True)
