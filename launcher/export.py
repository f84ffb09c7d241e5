"""`launch export RUN_DIR|CHECKPOINT [--out FILE]`: a checkpoint's whole weights as one safetensors file,
whatever engine trained them (DeepSpeed's partitions are put together by its own zero_to_fp32)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

from . import checkpoint
from .errors import CheckpointError


class ExportError(Exception):
    """One line, exit 2."""


def weights(path: Path) -> dict:
    """The checkpoint's weights as whole fp32 tensors on the CPU."""
    if (path / "deepspeed").is_dir():
        from .zero import TAG, import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(path / "deepspeed"), tag=TAG))
    return checkpoint.load_state(path)["model"]


def export(source: Path, out: Path | None) -> Path:
    if (source / "manifest.json").exists():
        path = source
    else:
        path = checkpoint.latest(source, lambda text: print(f"launch: warning: {text}", file=sys.stderr))
        if path is None:
            raise ExportError(f"{source} is neither a checkpoint nor a run directory with a complete checkpoint")
    try:
        manifest = checkpoint.check(path)  # verified and readable without running code, before anything loads it
        tensors = weights(path)
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
