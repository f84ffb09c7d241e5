"""The model and optimizer of a checkpoint as torch.distributed.checkpoint (DCP) keeps them, in CHECKPOINT/sharded/:
each rank writes its own part (FSDP's shards; a replicated DDP tensor once, DCP deduplicating) and reads what its
layout needs now, keyed by parameter name, so that a checkpoint resumes on another world size or engine.

DCP's own reader trusts its folder: it unpickles the metadata and every non-tensor item (a learning rate) with code
allowed. Here every file read is one the manifest lists, opened through checkpoint.Reader (hashed through the
descriptor it is read from) and inside the shards' folder; the metadata is unpickled through an allow-list of DCP's
plain-data classes, the non-tensor items and the tensors with weights_only."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from ..errors import CheckpointError, ForeignCheckpoint
from ..text import first_line
from . import checkpoint
from .pickles import unsafe

FOLDER = "sharded"
METADATA = f"{FOLDER}/.metadata"

# DCP's remark that it runs in one process where torch.distributed is not started (a one-process run, export, the
# check before spawn): that is the intent. For the whole process, as the asynchronous writer's thread makes it
# after any context has closed; and around each call in this thread (quiet), above filters set since
ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"
warnings.filterwarnings("ignore", ONE_PROCESS)

# what DCP pickles into its metadata (dataclasses of plain fields, paths, sizes, dtypes), and nothing that runs code
SAFE = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout")} | {
    (module, name) for module in ("pathlib", "pathlib._local")
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")}


@contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ONE_PROCESS)
        yield


class Writer(FileSystemWriter):
    """DCP's writer into folder/sharded/, fsyncing, with a thread per core this process may use (up to 4): one
    thread serialises and writes at about a third of what the disk takes. Each rank hashes its files as it writes
    them (HashingFiles) and hands the digests to rank 0 with its write results, through DCP's own gather: so that
    publishing the checkpoint need not read every shard back. `digests`: on rank 0 once the save is complete,
    every rank's shard files by their names in the manifest."""

    def __init__(self, folder: Path):
        super().__init__(folder / FOLDER, sync_files=True, thread_count=max(1, min(4, len(os.sched_getaffinity(0)))))
        self.fs = HashingFiles()
        self.digests: dict[str, str] = {}

    def write_data(self, plan, planner):
        results = super().write_data(plan, planner).wait()  # DCP's file writer is done when it returns
        carried = torch.futures.Future()
        carried.set_result([dataclasses.replace(result, storage_data=_Hashed(
            **vars(result.storage_data), sha256=self.fs.digests.get(result.storage_data.relative_path)))
            for result in results])
        return carried

    def finish(self, metadata: Metadata, results: list) -> None:
        plain = []
        for ranks in results:
            for result in ranks:
                if result.storage_data.sha256:
                    self.digests[f"{FOLDER}/{result.storage_data.relative_path}"] = result.storage_data.sha256
            plain.append([dataclasses.replace(result, storage_data=result.storage_data.plain()) for result in ranks])
        super().finish(metadata, plain)


@dataclasses.dataclass
class _Hashed(_StorageInfo):
    """Where an item was written, and the sha256 of its whole file (None where it could not be hashed on the way):
    between the ranks only, what the metadata keeps is plain()."""

    sha256: str | None = None

    def plain(self) -> _StorageInfo:
        return _StorageInfo(self.relative_path, self.offset, self.length, self.transform_descriptors)


class HashingFiles(FileSystem):
    """DCP's file access for writing: every file written hashed on the way (`digests`, by file name)."""

    def __init__(self):
        super().__init__()
        self.digests: dict[str, str] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        with super().create_stream(path, mode) as stream:
            if mode != "wb":
                yield stream
                return
            hashing = _Hashing(stream)
            yield hashing
            if hashing.digest is not None:
                self.digests[Path(path).name] = hashing.digest.hexdigest()


class _Hashing:
    """A file being written, hashed as the bytes go by: written once, in order (a seek, and there is no digest)."""

    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def write(self, data) -> int:
        written = self.stream.write(data)
        if self.digest is not None:
            self.digest.update(data)  # hashlib lets go of the GIL: the other writer threads go on meanwhile
        return written

    def seek(self, *args) -> int:
        self.digest = None
        return self.stream.seek(*args)

    def __getattr__(self, name: str):  # tell, flush, fileno, close: the file's own
        return getattr(self.stream, name)


def save(folder: Path, shards: dict) -> dict[str, str]:
    """Each rank's part of `shards` into folder/sharded/, fsynced; a collective of every rank. On rank 0 the
    digests of every rank's shard files (Writer)."""
    storage = Writer(folder)
    with quiet():
        dcp.save(shards, storage_writer=storage)
    return storage.digests


def stager() -> DefaultStager:
    """What copies the shards aside for save_async, in this thread. Kept for the run: it keeps its copies' memory
    (one more of each rank's part, in host memory) for the next save, which then copies without allocating."""
    return DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=False))


def save_async(folder: Path, shards: dict, group, staging: DefaultStager) -> Future:
    """save() in a thread of DCP's over `group` (gloo), once `shards` are copied aside by `staging`, so that
    training may change them meanwhile: the future is done when this rank's files and, on rank 0, the metadata are
    written; its result is save()'s."""
    storage, digests = Writer(folder), Future()
    with quiet():
        upload = dcp.async_save(shards, storage_writer=storage, process_group=group, async_stager=staging)

    def done(upload: Future) -> None:
        error = upload.exception()
        digests.set_exception(error) if error else digests.set_result(storage.digests)

    upload.add_done_callback(done)
    return digests


def held(ckpt: checkpoint.Reader) -> bool:
    """Whether the checkpoint keeps its model and optimizer in shards (older ones hold them whole in state.pt)."""
    return bool(ckpt.manifest.get("sharded"))


def load(ckpt: checkpoint.Reader, shards: dict) -> None:
    """The checkpoint's shards into `shards` (what the engine holds now: the names, shapes and places to fill), in
    place; a collective of every rank."""
    reader = Reader(ckpt)
    reader.read_metadata()  # first: DCP logs a failed read with its traceback and goes on to look elsewhere
    _load(reader, shards)


def check(path: Path) -> dict:
    """checkpoint.check() before anything starts, the shards included: DCP's metadata and every non-tensor item
    read as the workers will read them, so that a crafted one is refused in one line (the tensors are read with
    weights_only), and every shard file hashed once; the manifest."""
    manifest = checkpoint.check(path, but=FOLDER)
    with checkpoint.reading(path) as ckpt:
        if held(ckpt):
            reader = Reader(ckpt)
            items = reader.read_metadata().state_dict_metadata.items()
            _load(reader, {key: None for key, kind in items if isinstance(kind, BytesStorageMetadata)})
            for name in ckpt.manifest["files"]:
                if name.startswith(f"{FOLDER}/") and name not in reader.fs.opened:
                    with ckpt.open(name):
                        pass
    return manifest


def model_weights(ckpt: checkpoint.Reader) -> dict:
    """The whole model (every parameter and buffer, by name), assembled in this process from every rank's shards;
    the optimizer state is never read."""
    reader = Reader(ckpt)
    items = reader.read_metadata().state_dict_metadata.items()
    model = {key: torch.empty(kind.size, dtype=kind.properties.dtype) for key, kind in items
             if key.startswith("model.") and isinstance(kind, TensorStorageMetadata)}
    _load(reader, model)
    return {key.removeprefix("model."): tensor for key, tensor in model.items()}


def _load(reader: Reader, state: dict) -> None:
    try:
        with quiet():
            dcp.load(state, storage_reader=reader, planner=Planner(reader))
    except CheckpointException as e:
        raise told(e, reader.ckpt.path) from None


def failures(e: BaseException) -> list[BaseException]:
    """What failed inside DCP, on whichever ranks (it gathers them into one CheckpointException), or `e` itself."""
    return [error for error, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]


def told(e: CheckpointException, path: Path) -> CheckpointError:
    """The root cause of a failed read of the shards at `path` as one CheckpointError: ours as they were raised
    (a refused file), anything else named."""
    errors = failures(e)
    ours = next((error for error in errors if isinstance(error, CheckpointError)), None)
    if ours:
        return ours
    first = errors[0] if errors else e
    return CheckpointError(f"reading the shards of {path} failed ({type(first).__name__}: {first_line(first)})")


class VerifiedFiles(FileSystem):
    """DCP's file access, for reading one checkpoint: a file inside its shards' folder that the manifest lists,
    opened and verified by checkpoint.Reader; anything else refused."""

    def __init__(self, ckpt: checkpoint.Reader):
        super().__init__()
        self.ckpt = ckpt
        self.current: Path | None = None  # the file being read: what an unsafe item is named by
        self.opened: set[str] = set()  # and those read so far, by their names in the manifest

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        if mode != "rb":
            raise ForeignCheckpoint(f"reading {self.ckpt.path}: DCP asked to open {path} for writing: refused")
        name = checkpoint.within(path, self.ckpt.path)
        if name is None or not name.startswith(f"{FOLDER}/"):
            raise ForeignCheckpoint(f"{self.ckpt.path / METADATA} points at {path}, outside the checkpoint's shards: "
                                    "refused (a crafted or foreign checkpoint?); nothing was read from it")
        self.current = self.ckpt.path / name
        self.opened.add(name)
        with self.ckpt.open(name) as f:
            yield f


class Reader(FileSystemReader):
    """DCP's reader of a checkpoint's shards through VerifiedFiles, its metadata unpickled through SAFE."""

    def __init__(self, ckpt: checkpoint.Reader):
        super().__init__(ckpt.path / FOLDER)
        self.ckpt, self.fs = ckpt, VerifiedFiles(ckpt)

    def read_metadata(self) -> Metadata:
        file = self.ckpt.path / METADATA
        with self.fs.create_stream(file, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, file).load()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{file} cannot be loaded safely ({type(e).__name__}: {first_line(e)})") \
                    from None
        if not isinstance(metadata, Metadata):
            raise ForeignCheckpoint(f"{file} holds a {type(metadata).__name__}, not DCP's metadata: refused")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, file: Path):
        super().__init__(f)
        self.file = file

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise ForeignCheckpoint(f"{self.file} cannot be loaded safely: it refers to {module}.{name}, which is not "
                                "part of DCP's metadata (a crafted or foreign file?); nothing in it was run")


class Planner(DefaultLoadPlanner):
    """DCP's planner, but that a non-tensor item is unpickled with weights_only (DCP's allows code)."""

    def __init__(self, reader: Reader):
        super().__init__()
        self.reader = reader

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            item = torch.serialization.load(value, weights_only=True)
        except Exception as e:
            raise unsafe(self.reader.fs.current, value, e) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
        else:
            self.state_dict[read_item.dest_index.fqn] = item
