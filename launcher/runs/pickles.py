"""What a checkpoint's pickles may refer to, and the plain words for one that refers to more: torch files are read
with weights_only (tensors and plain data) plus the few plain-data classes DeepSpeed pickles into its own."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointError, ForeignCheckpoint
from ..text import first_line


def unsafe(file: Path, f: BinaryIO, e: Exception) -> CheckpointError:
    """A file torch.load(weights_only=True) refused, in plain words: the global it would have had to import
    (a crafted file names os.system, say) rather than torch's advice to load it unsafely."""
    allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    extra = torch.serialization.get_safe_globals() + allowed_globals(file.as_posix())
    allowed |= {f"{g.__module__}.{g.__qualname__}" for g in extra}
    foreign = next((g for g in referenced_globals(f) if g not in allowed), None)
    if foreign:
        return ForeignCheckpoint(f"{file} cannot be loaded safely: it refers to {foreign}, which is neither a tensor "
                                 "nor plain data (a crafted or foreign file?); nothing in it was run")
    return CheckpointError(f"{file} cannot be loaded safely ({type(e).__name__}: {first_line(e)})")


def referenced_globals(f: BinaryIO) -> list[str]:
    """The globals (module.name) a torch file's pickle imports, read from its opcodes without running any."""
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as z:
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
    except Exception:  # no pickle, or one broken too badly to read: nothing to name
        return []


def allowed_globals(name: str) -> list:
    """The classes beyond weights_only's own that the file `name` of a checkpoint may hold."""
    return _deepspeed_globals() if "deepspeed" in name.split("/") else []


def _deepspeed_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its optimizer files (fp16's dynamic loss scaler among
    them), and nothing that runs code."""
    from ..engines.zero import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
