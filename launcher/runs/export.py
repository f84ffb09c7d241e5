"""`launch export RUN_DIR|CHECKPOINT [--out FILE]`: a checkpoint's whole weights as one safetensors file,
whatever engine trained them (DeepSpeed's partitions are put together by its own zero_to_fp32)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

from ..errors import CheckpointError
from ..text import first_line
from . import checkpoint, sharded
from .files import warn


class ExportError(Exception):
    """One line, exit 2."""


def weights(path: Path) -> dict:
    """A checkpoint's weights as whole fp32 tensors on the CPU, each file verified as it is read and none
    unpickled with code."""
    with checkpoint.reading(path) as ckpt:
        return read_weights(ckpt)


def read_weights(ckpt: checkpoint.Reader) -> dict:
    """weights() of a checkpoint being read: DeepSpeed's zero_to_fp32 globs its folder and loads what it finds,
    through the reader."""
    if sharded.held(ckpt):
        return sharded.model_weights(ckpt)
    if not (ckpt.path / "deepspeed").is_dir():
        state = ckpt.load("state.pt")
        model = state.get("model") if isinstance(state, dict) else None
        if not isinstance(model, dict):
            raise CheckpointError(f"{ckpt.path / 'state.pt'} holds no model weights: not a launcher checkpoint")
        return model
    from ..engines.zero import TAG, import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path / "deepspeed"), tag=TAG))
    except CheckpointError:
        raise
    except Exception as e:  # files that verify and load, yet are not what DeepSpeed wrote: its own words, in one line
        raise CheckpointError(f"{ckpt.path / 'deepspeed'} does not hold the partitions DeepSpeed wrote "
                              f"({type(e).__name__}: {first_line(e)})") from None


def export(source: Path, out: Path | None) -> Path:
    try:
        if (source / checkpoint.MANIFEST).exists():
            path = source
        else:
            path = checkpoint.latest(source, warn)
            if path is None:
                raise ExportError(f"{source} is neither a checkpoint nor a run directory with a complete checkpoint")
        with checkpoint.reading(path) as ckpt:
            tensors, manifest = read_weights(ckpt), ckpt.manifest
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    from safetensors.torch import save_file

    run_dir = path.parent.parent
    out = out or run_dir / "exports" / f"{run_dir.name}-{path.name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights): each is written whole
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(out),
              metadata={"step": str(manifest["step"]), "engine": manifest.get("engine", "ddp"),
                        "checkpoint": str(path), "hparams": json.dumps(manifest.get("hparams", {}))})
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="launch export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                        help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="default: RUN_DIR/exports/RUN-CHECKPOINT.safetensors")
    args = parser.parse_args(argv)
    try:
        out = export(Path(args.source), args.out)
    except ExportError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"launch: exported {out}")
