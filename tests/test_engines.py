"""The same recipe under every engine, 2 CPU processes over gloo: the same losses, metrics and weights as
DDP, and checkpoints that resume exactly under the engine that wrote them."""

import pytest
import torch

from conftest import TINY, eval_record, launch, train_records
from test_checkpoint import assert_same, tiny
from test_train import params

COMMON = ("--max-steps", "12", "--noise", "0.1", "--log-every", "1", "--grad-accum", "2", "--clip-grad", "0.5",
          "--batch-size", "16")
ENGINES = {
    "fsdp": ("--engine", "fsdp"),
    "fsdp-grad-op": ("--engine", "fsdp", "--sharding", "grad-op"),
    "fsdp-offload": ("--engine", "fsdp", "--offload", "both"),
}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # float32 reductions in another order: last-bit differences


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    folder, _ = tiny(tmp_path_factory.mktemp("ddp"), "ddp", *COMMON, procs=2)
    return folder


def checkpoint_weights(folder) -> dict:
    return torch.load(folder / "run" / "checkpoints" / "step-00000012" / "state.pt", weights_only=True)["model"]


def assembled(folder) -> dict:
    """The two ranks' shards, put back together along the first dimension."""
    shards = [params(folder, rank) for rank in range(2)]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_trains_like_ddp(tmp_path, ddp, engine):
    folder, result = tiny(tmp_path, engine, *COMMON, *ENGINES[engine], procs=2)
    assert "FSDP2" in result.stdout.splitlines()[0]  # the engine asked for, named at the start
    losses, reference = train_records(folder / "run"), train_records(ddp / "run")
    assert losses.keys() == reference.keys() == set(range(1, 13))
    for step in losses:
        for key in ("train/loss", "grad_norm", "lr"):
            assert losses[step][key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)
    for split in ("val", "test"):
        got, want = eval_record(folder / "run", split), eval_record(ddp / "run", split)
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (split, key)
    ddp_weights = params(ddp, 0)
    assert_same(params(ddp, 1), ddp_weights)
    for weights in (assembled(folder), checkpoint_weights(folder)):  # each rank's shard, and the gathered copy
        assert weights.keys() == ddp_weights.keys()
        for k in weights:
            torch.testing.assert_close(weights[k], ddp_weights[k], **TOLERANCE)
    assert_same(assembled(folder), checkpoint_weights(folder))


@pytest.mark.parametrize("engine", ["fsdp"])
def test_an_engine_resumes_exactly_from_its_own_checkpoint(tmp_path, engine):
    common = ("--max-steps", "12", "--noise", "0.1", "--save-every", "6", *ENGINES[engine])
    straight, _ = tiny(tmp_path, "straight", *common, procs=2)
    stopped, result = tiny(tmp_path, "stopped", *common, "--crash-at", "8", procs=2, check=False)
    assert result.returncode == 1 and "planted crash" in result.stderr
    tiny(tmp_path, "stopped", *common, "--crash-at", "8", "--resume", "auto", procs=2)
    for rank in range(2):
        assert_same(params(stopped, rank), params(straight, rank))
    assert_same(checkpoint_weights(stopped), checkpoint_weights(straight))


def test_one_process_shards_too(tmp_path):
    """--engine fsdp in a single process (inside launch itself) still runs the sharded code path."""
    folder, result = tiny(tmp_path, "one", "--max-steps", "4", "--engine", "fsdp")
    assert "FSDP2 full" in result.stdout and "done: 4 steps" in result.stdout


@pytest.mark.parametrize("flags,message", [
    (("--sharding", "grad-op"), "--sharding grad-op is for --engine fsdp, not ddp"),
    (("--offload", "both"), "--offload both is for --engine fsdp, not ddp"),
    (("--engine", "fsdp", "--precision", "fp16"), "--engine fsdp with --precision fp16 is not supported"),
    (("--engine", "zero"), "argument --engine: invalid choice: 'zero'"),
])
def test_engine_flags_that_contradict_each_other_exit_2(tmp_path, flags, message):
    result = launch(TINY, "--cpu", *flags, "--run-dir", tmp_path / "run")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
