"""Checkpoints on a filesystem that others write to: every load path (resume by path, by run directory and auto,
a restart's resume in the worker, the best weights for the test split, export) reads only files the manifest lists,
verified as they are opened; nothing planted is loaded, nothing outside the checkpoint is read, no code runs."""

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, in_process, launch, plant, refused, rehash, tiny
from launcher.errors import CheckpointError, ForeignCheckpoint
from launcher.recipe import contract as recipe
from launcher.runs import checkpoint, export, sharded

PARTITION = "deepspeed/zero/zero_pp_rank_2_mp_rank_00_optim_states.pt"  # a third rank's, beside two ranks' own
ZERO = ("--engine", "deepspeed", "--zero", "2")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """A run directory of one process with checkpoints at steps 2 and 4 and a best one."""
    folder, _ = tiny(tmp_path_factory.mktemp("ddp"), "run", "--max-steps", "4", "--save-every", "2", dump=False)
    return folder / "run"


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> Path:
    """A run directory of 2 processes under ZeRO-2, its checkpoint at step 4."""
    folder, _ = tiny(tmp_path_factory.mktemp("zero"), "run", "--max-steps", "4", *ZERO, procs=2, dump=False)
    return folder / "run"


def copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def resume(run: Path, how: str, engine: tuple) -> list:
    """The command line of a resume of `run`: by its newest checkpoint's path, by the run directory, or auto."""
    procs = ("--procs", "2") if engine else ()
    common = [TINY, "--cpu", *procs, "--wandb", "disabled", "--max-steps", "6", *engine]
    if how == "path":
        return [*common, "--run-dir", run.parent / "next", "--resume", checkpoint.step_dirs(run)[0]]
    if how == "run dir":
        return [*common, "--run-dir", run.parent / "next", "--resume", run]
    return [*common, "--run-dir", run, "--resume", "auto"]


@pytest.mark.parametrize("how", ["path", "run dir", "auto"])
def test_a_partition_planted_beside_deepspeeds_is_refused_by_resume_and_export_and_runs_nothing(
        tmp_path, capsys, zero, how):
    """The reported hole: DeepSpeed's zero_to_fp32 globs every *_optim_states.pt and unpickles it with code allowed."""
    run = copy(zero, tmp_path / "run")
    newest = checkpoint.step_dirs(run)[0]
    marker = tmp_path / "pwned"
    plant(newest / PARTITION, marker)
    said = (f"{newest} holds 1 file that its manifest does not list ({PARTITION}): planted, or left by another "
            "program? Nothing in the checkpoint was loaded; remove it to use it")
    assert refused(capsys, *resume(run, how, ZERO)) == f"launch: error: --resume: {said}"
    assert refused(capsys, "export", newest if how == "path" else run, "--out", tmp_path / "x.safetensors") \
        == f"launch: error: {said}"
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()
    # never passed over for an older checkpoint in silence, as a damaged one is
    assert "falling back" not in capsys.readouterr().err


PLACES = {  # where each load path reads: the checkpoint's top, the rank files, DeepSpeed's folders
    "ddp": ["evil.pt", "rng-1.pt", "state.pt.bak", "deepspeed/zero/mp_rank_00_model_states.pt"],
    "zero": ["evil.pt", "rng-2.pt", PARTITION, "deepspeed/zero/mp_rank_01_model_states.pt", "deepspeed/zero.pt",
             "deepspeed/zero/extra/x.pt"],
}


@pytest.mark.parametrize("engine,place", [(e, p) for e, places in PLACES.items() for p in places])
def test_a_file_planted_where_a_load_path_reads_is_refused_by_every_path_naming_it(
        tmp_path, capsys, request, engine, place):
    run = copy(request.getfixturevalue(engine), tmp_path / "run")
    marker = tmp_path / "pwned"
    for checkpoint_dir in (*checkpoint.step_dirs(run), checkpoint.folder(run) / "best"):
        if checkpoint_dir.exists():
            plant(checkpoint_dir / place, marker)
    flags = ZERO if engine == "zero" else ()
    for how in ("path", "run dir", "auto"):
        text = refused(capsys, *resume(run, how, flags))
        assert text.startswith("launch: error: --resume: ") and f"({place})" in text, text
    for source in (run, checkpoint.step_dirs(run)[0], checkpoint.folder(run) / "best"):
        if source.exists():
            assert f"({place})" in refused(capsys, "export", source, "--out", tmp_path / "x.safetensors")
    assert not marker.exists()


def test_inside_reading_every_library_load_is_verified_at_the_moment_it_opens(tmp_path, zero):
    """What DeepSpeed's loaders would meet if a file were planted or swapped after the listing (a race on a shared
    filesystem): a file the manifest does not list, one outside the checkpoint, a listed one swapped for another
    or for a link; the manifest read at the listing is what counts."""
    run = copy(zero, tmp_path / "run")
    path = checkpoint.step_dirs(run)[0]
    marker, outside = tmp_path / "pwned", tmp_path / "outside.pt"
    plant(outside, marker)
    with checkpoint.reading(path) as ckpt:
        plant(path / PARTITION, marker)
        with pytest.raises(ForeignCheckpoint, match="is not listed in .*manifest.json: refused"):
            torch.load(path / PARTITION, weights_only=False)
        with pytest.raises(ForeignCheckpoint, match="outside the checkpoint: refused"):
            torch.load(outside, weights_only=False)
        with pytest.raises(ForeignCheckpoint, match=f"{PARTITION} is not listed"):  # DeepSpeed's glob found it
            export.read_weights(ckpt)
        os.remove(path / PARTITION)
        listed = path / "deepspeed/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        plant(listed, marker)
        with pytest.raises(CheckpointError, match="is truncated or damaged|is damaged"):
            torch.load(listed, weights_only=False)
        listed.unlink()
        listed.symlink_to(outside)
        with pytest.raises(ForeignCheckpoint, match="is a symbolic link"):
            torch.load(listed, weights_only=False)
        with pytest.raises(ForeignCheckpoint, match="file object"):
            torch.load(open(outside, "rb"), weights_only=False)
    assert torch.load is torch.serialization.load  # put back
    assert not marker.exists()


def test_a_file_planted_during_the_run_stops_the_restart_and_the_best_weights_naming_it(tmp_path):
    """The worker's own load paths: the restart after a crash resumes from the newest checkpoint, and the test
    split is evaluated on the best checkpoint's weights; someone plants a file in each while the run goes on."""
    folder, restarted = tiny(tmp_path, "restart", "--max-steps", "8", "--save-every", "2", "--max-restarts", "1",
                             "--plant", f"run/checkpoints/step-00000004/{PARTITION}", "--plant-at", "5",
                             "--crash-at", "5", "--crash-rank", "0", *ZERO, procs=2, check=False)
    newest = folder / "run" / "checkpoints" / "step-00000004"
    assert restarted.returncode == 1, restarted.stderr
    assert "planted crash" not in restarted.stderr.splitlines()[-1]
    assert (f"{newest} holds 1 file that its manifest does not list ({PARTITION})"
            in restarted.stderr.splitlines()[-1]), restarted.stderr
    assert not (folder / "pwned").exists()

    # lr 1, constant: the best evaluation is step 4's, whose weights the test split is evaluated with at the end;
    # saved synchronously, so that the plant lands in the published folder rather than in the one being replaced
    folder, best = tiny(tmp_path, "best", "--max-steps", "8", "--eval-every", "2", "--lr", "1", "--schedule",
                        "constant", "--plant", "run/checkpoints/best/evil.pt", "--plant-at", "8", "--no-async-save",
                        check=False)
    assert best.returncode == 1
    assert (f"{folder / 'run' / 'checkpoints' / 'best'} holds 1 file that its manifest does not list (evil.pt)"
            in best.stderr.splitlines()[-1]), best.stderr
    assert not (folder / "pwned").exists()


def test_a_changed_zero_stage_is_refused_before_anything_starts_and_the_record_stays(tmp_path, capsys, zero):
    run = copy(zero, tmp_path / "run")
    recorded = (run / "config.json").read_text()
    newest = checkpoint.step_dirs(run)[0]
    argv = [TINY, "--cpu", "--procs", "2", "--wandb", "disabled", "--engine", "deepspeed", "--zero", "3",
            "--run-dir", run, "--resume", "auto"]
    assert refused(capsys, *argv) == (
        f"launch: error: {newest} was written with --zero 2, whose partitions --zero 3 cannot load (stage 3 "
        f"partitions the weights too): resume it with --zero 2, or start afresh from its weights (launch export "
        f"{newest})")
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["zero"]  # as checkpoints written before the manifest kept it: its files tell
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert "was written with --zero 1 or 2, whose partitions --zero 3 cannot load" in refused(capsys, *argv)
    assert (run / "config.json").read_text() == recorded


def test_a_start_that_fails_keeps_the_command_launch_resume_repeats(tmp_path, ddp):
    """--n-train 4 leaves no batch of 16: the workers fail before training begins, and the run's record keeps the
    command of the start before; the next start that trains makes its own the run's."""
    run = copy(ddp, tmp_path / "run")
    recorded = json.loads((run / "config.json").read_text())["command"]
    failed = launch(TINY, "--cpu", "--wandb", "disabled", "--run-dir", run, "--resume", "auto", "--max-steps", "6",
                    "--n-train", "4")
    assert failed.returncode == 1 and "larger than the training set" in failed.stderr
    assert json.loads((run / "config.json").read_text())["command"] == recorded
    resumed = launch("resume", run, "--max-steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "done: 6 steps" in resumed.stdout
    assert json.loads((run / "config.json").read_text())["command"] == [*recorded, "--max-steps", "6"]
    assert not (run / ".config.next.json").exists()


def test_an_old_format_pickle_is_refused_in_the_launchers_words(tmp_path, capsys, ddp):
    run = copy(ddp, tmp_path / "run")
    newest = checkpoint.step_dirs(run)[0]
    torch.save(torch.load(newest / "state.pt", weights_only=True), newest / "state.pt",
               _use_new_zipfile_serialization=False)
    rehash(newest)
    assert refused(capsys, *resume(run, "path", ())) == (
        f"launch: error: --resume: {newest / 'state.pt'} is not in the format torch.save writes (a zip archive): an "
        "old or foreign file, which the launcher never wrote; nothing in it was loaded")


def test_resuming_on_another_number_of_processes_says_how_the_batch_is_split_now(tmp_path):
    """DDP on 2 processes, resumed on 1: the global batch of 16 stays, 16 per process now."""
    source, _ = tiny(tmp_path, "two", "--max-steps", "4", "--save-every", "2", procs=2, dump=False)
    _, resumed = tiny(tmp_path, "one", "--max-steps", "6", "--resume", source / "run", dump=False)
    assert ("launch: resuming on 1 process a checkpoint 2 processes wrote: the global batch 16 is now 1 × 1 "
            "accumulation × 16 per process (it was 2 × 1 × 8)") in resumed.stdout
    assert "done: 6 steps" in resumed.stdout


def crafted_item(run: Path, marker: Path) -> Path:
    """The newest checkpoint of a copy of `run` with an optimizer setting DCP stores as bytes (its param_groups'
    lr) swapped for an exploit, written by DCP itself, the manifest rehashed."""
    newest = checkpoint.step_dirs(run)[0]
    with checkpoint.reading(newest) as ckpt:
        meta = sharded.Reader(ckpt).read_metadata()
    lr = next(key for key in meta.state_dict_metadata if key.startswith("optimizer.param_groups.") and
              key.endswith(".lr"))
    shutil.rmtree(newest / "sharded")
    import torch.distributed.checkpoint as dcp

    dcp.save({lr: recipe.load(TINY).Exploit(marker)}, checkpoint_id=newest / "sharded", no_dist=True)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("sharded/")}
    manifest["files"].update({f"sharded/{p.name}": {} for p in (newest / "sharded").iterdir()})
    (newest / "manifest.json").write_text(json.dumps(manifest))
    rehash(newest)
    return newest


def test_dcps_metadata_and_byte_items_are_read_without_running_code(tmp_path, capsys, ddp):
    """DCP keeps its metadata as a pickle and each non-tensor item (a learning rate) as torch.save's bytes, and its
    own reader unpickles both with code allowed; crafted ones, rehashed into the manifest, are refused in one line
    before anything starts, naming what they would have run."""
    marker = tmp_path / "pwned"
    run = copy(ddp, tmp_path / "metadata")
    newest = checkpoint.step_dirs(run)[0]
    (newest / "sharded" / ".metadata").write_bytes(pickle.dumps(recipe.load(TINY).Exploit(marker)))
    rehash(newest)
    said = (f"{newest / 'sharded' / '.metadata'} cannot be loaded safely: it refers to posix.system, which is not "
            "part of DCP's metadata (a crafted or foreign file?); nothing in it was run")
    for how in ("path", "run dir", "auto"):
        assert refused(capsys, *resume(run, how, ())) == f"launch: error: --resume: {said}"
    assert refused(capsys, "export", newest, "--out", tmp_path / "x.safetensors") == f"launch: error: {said}"

    run = copy(ddp, tmp_path / "item")
    newest = crafted_item(run, marker)
    text = refused(capsys, *resume(run, "path", ()))
    assert text.startswith(f"launch: error: --resume: {newest / 'sharded'}/__0_0.distcp cannot be loaded safely: "
                           "it refers to posix.system"), text
    assert not marker.exists()


def test_a_sharded_checkpoint_naming_a_file_outside_its_folder_is_refused(tmp_path, capsys, ddp):
    """DCP's metadata says which file holds each item: one that names state.pt, or a path out of the checkpoint,
    reaches no file the shards do not own."""
    run = copy(ddp, tmp_path / "run")
    newest = checkpoint.step_dirs(run)[0]
    with checkpoint.reading(newest) as ckpt:
        meta = sharded.Reader(ckpt).read_metadata()
    for info in meta.storage_data.values():
        info.relative_path = "../../../../outside.pt"
    (newest / "sharded" / ".metadata").write_bytes(pickle.dumps(meta))
    rehash(newest)
    text = refused(capsys, *resume(run, "path", ()))
    assert text.startswith("launch: error: --resume: ") and "outside" in text and "refused" in text, text


# ---------------------------------------------------------------- a fuzzed checkpoint directory

opened: list[tuple[str, int]] | None = None  # what the audit hook records while a test listens


def _audit(event: str, args: tuple) -> None:
    if opened is not None and event in ("open", "os.listdir", "os.scandir") and args \
            and isinstance(args[0], (str, bytes, os.PathLike)):
        flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
        opened.append((os.fsdecode(args[0]), flags))


sys.addaudithook(_audit)


def where(path: str, flags: int) -> Path:
    """What an open of `path` reaches: links followed, the last one not where O_NOFOLLOW says so."""
    if flags & os.O_NOFOLLOW:
        return Path(os.path.realpath(os.path.dirname(path) or ".")) / os.path.basename(path)
    return Path(os.path.realpath(path))


def mutate(path: Path, outside: Path, marker: Path, rng: random.Random) -> None:
    """One to three of what someone with write access might do to a checkpoint directory, the manifest rewritten to
    agree with the files now and then."""
    for _ in range(rng.randint(1, 3)):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
        dirs = [path, *sorted(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]
        victim, where = rng.choice(files), rng.choice(dirs)
        kind = rng.choice(["exploit", "bytes", "tensors", "rename", "link file", "link dir", "link to dir", "fifo",
                           "replace"])
        name = where / rng.choice(["x.pt", "zero_pp_rank_3_mp_rank_00_optim_states.pt", "mp_rank_01_model_states.pt",
                                   "rng-7.pt", "latest", ".hidden.pt"])
        if os.path.lexists(name) and (name.is_symlink() or not name.is_file()):
            continue  # written through, a link or a FIFO would reach outside or block the test itself
        if kind == "exploit":
            plant(name, marker)
        elif kind == "bytes":
            name.write_bytes(rng.randbytes(rng.randint(0, 300)))
        elif kind == "tensors":
            torch.save({"w": torch.randn(3)}, name)
        elif kind == "rename" and not name.exists():
            victim.rename(name)
        elif kind == "link file":
            victim.unlink()
            victim.symlink_to(outside / "exploit.pt")
        elif kind == "link dir" and not name.exists():
            name.symlink_to(outside)
        elif kind == "link to dir" and where != path and not where.is_symlink():
            shutil.rmtree(where)
            where.symlink_to(outside)
        elif kind == "fifo" and not name.exists():
            os.mkfifo(name)
        elif kind == "replace":
            plant(victim, marker)
    if rng.random() < 0.5 and (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
        listed = [p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != "manifest.json"
                  and not p.is_fifo() and (p.is_file() or not p.exists())]
        manifest["files"] = {}
        for p in listed:
            data = p.read_bytes() if p.is_file() else b""
            manifest["files"][p.relative_to(path).as_posix()] = {"bytes": len(data),
                                                                 "sha256": hashlib.sha256(data).hexdigest()}
        (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("engine", ["ddp", "zero"])
def test_a_fuzzed_checkpoint_never_runs_code_nor_reads_outside_it(tmp_path, capsys, request, engine):
    """60 directories mutated at random (seeded): resume's checks and export either refuse in one line or, where
    the mutation left nothing untrusted, go on; none runs the planted code, none opens a file outside."""
    global opened
    source = checkpoint.step_dirs(request.getfixturevalue(engine))[0]
    outside, marker = tmp_path / "outside", tmp_path / "pwned"
    outside.mkdir()
    plant(outside / "exploit.pt", marker)
    (outside / "secret.txt").write_text("not for the launcher's eyes")
    flags = ZERO if engine == "zero" else ()
    outcomes = []
    for seed in range(30):
        path = tmp_path / f"case-{seed}" / "checkpoints" / source.name
        shutil.copytree(source, path)
        mutate(path, outside, marker, random.Random(seed))
        opened = []
        try:
            code, _, err = in_process(capsys, TINY, "--cpu", *(("--procs", "2") if flags else ()), "--wandb",
                                      "disabled", *flags, "--run-dir", tmp_path / f"next-{seed}", "--resume", path,
                                      "--check")
            exported, _, export_err = in_process(capsys, "export", path, "--out", tmp_path / f"{seed}.safetensors")
        finally:
            seen, opened = opened, None
        outcomes.append((code, exported))
        assert code in (0, 2) and exported in (0, 2) and (code == 0 or err.count("\n") == 1), err
        assert not marker.exists(), f"seed {seed}: the planted code ran"
        read_outside = [p for p, flags in seen if where(p, flags).is_relative_to(outside.resolve())]
        assert not read_outside, f"seed {seed}: read outside the checkpoint: {read_outside}"
    assert sum(code == 2 for code, _ in outcomes) >= 20  # most mutations leave something untrusted
