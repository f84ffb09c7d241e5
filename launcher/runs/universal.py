"""DeepSpeed's partitions for another number of processes: its universal checkpoint, which any world size loads.

A ZeRO checkpoint holds each rank's partition of the flat optimizer buffers, readable on as many ranks only.
DeepSpeed's `ds_to_universal` turns it into one folder per parameter (its fp32 weights and Adam's moments), and
`load_universal` reads that on any number of processes. The launcher converts a checkpoint it resumes on another
number of processes, once, into RUN_DIR/checkpoints/universal-NAME: a checkpoint like the others (the source's
state, random generators and settings, the universal folder for deepspeed/, a manifest of its own), written
atomically. The source is read verified, as every checkpoint is; what DeepSpeed writes and reads back on the way
goes to a private folder and is read with weights_only too."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError, UsageError
from ..plan import Plan
from ..text import first_line
from . import checkpoint

PREFIX = "universal-"


def target(run_dir: str | Path, source: Path) -> Path:
    """Where the universal form of `source` goes: the same on every node, so that each resumes from it."""
    return checkpoint.folder(run_dir) / f"{PREFIX}{source.name}"


def needed(manifest: dict, engine: str, world: int) -> bool:
    return (engine == manifest.get("engine") == "deepspeed" and not manifest.get("universal")
            and manifest.get("world_size") != world)


def prepare(plan: Plan) -> None:
    """Node 0, holding the run directory, before anything is spawned: the universal checkpoint the plan resumes
    from, made from the one it names (cli/run.py planned both)."""
    if plan.convert_from:
        print(f"launch: converting {plan.convert_from} into {plan.resume}, a universal checkpoint that DeepSpeed "
              "loads on any number of processes", flush=True)
        try:
            convert(Path(plan.convert_from), Path(plan.resume))
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None


def convert(source: Path, out: Path) -> None:
    """The universal checkpoint of `source` at `out`, unless one converted from the same checkpoint is there."""
    from ..engines.zero import TAG, import_deepspeed

    manifest = checkpoint.listing(source)
    if (out / checkpoint.MANIFEST).exists():
        with contextlib.suppress(CheckpointError):
            if checkpoint.verify(out).get("converted_from") == _identity(source, manifest):
                return
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=".universal-", suffix=".tmp"))  # 0700: ours alone
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with checkpoint.reading(source, scratch) as ckpt:
            args = argparse.Namespace(input_folder=str(source / "deepspeed" / TAG), output_folder=str(scratch / TAG),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    ds_to_universal.main(args)
            except CheckpointError:
                raise
            except KeyError as e:  # an optimizer state it does not know: it carries Adam's moments alone
                raise CheckpointError(f"{source}: DeepSpeed cannot make a universal checkpoint of it for another "
                                      "number of processes: its conversion carries Adam's moments alone, and this "
                                      f"optimizer keeps none ({e} missing); resume it on "
                                      f"{manifest.get('world_size')} processes, or under --engine fsdp or ddp "
                                      "(its weights, progress and schedule carry over)") from None
            except Exception as e:
                raise CheckpointError(f"{source}: DeepSpeed's conversion to a universal checkpoint failed "
                                      f"({type(e).__name__}: {first_line(e)})") from None
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "deepspeed").mkdir(parents=True)
            for name in manifest["files"]:
                if not name.startswith("deepspeed/"):
                    with ckpt.open(name) as f, open(tmp / name, "wb") as copy:
                        shutil.copyfileobj(f, copy)
        shutil.move(scratch / TAG, tmp / "deepspeed" / TAG)
        meta = {k: v for k, v in manifest.items() if k != "files"}
        checkpoint.publish(tmp, out, {**meta, "universal": True, "converted_from": _identity(source, manifest)})
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _identity(source: Path, manifest: dict) -> dict:
    """What tells the checkpoint a universal one was made from: its path and its files' hashes."""
    return {"path": str(source.resolve()), "files": json.dumps(manifest["files"], sort_keys=True)}
