"""Bad input: one clear line, exit 2, nothing spawned. And the flags a recipe gets."""

import dataclasses
import importlib.metadata
import time

import pytest
import torch

from conftest import ROOT, in_process, launch, ok, refused
from launcher import flags
from launcher.cli import run as cli
from launcher.plan import Plan
from launcher.runs import record as run_record

DIGITS = ROOT / "recipes" / "digits.py"
CIFAR = ROOT / "recipes" / "cifar.py"


def test_help_lists_the_recipes_hyperparameters_with_types_and_defaults():
    out = ok(launch(DIGITS, "--help")).stdout
    for flag in ("--batch-size BATCH_SIZE", "--grad-accum K", "--precision {fp32,bf16,fp16}", "--gpus N"):
        assert flag.split()[0] in out
    assert "[int, default: 64]" in out  # --batch-size
    assert "[float, default: 0.003]" in out  # --lr
    assert "hyperparameters of digits.py" in out


COMMENTED = """
from dataclasses import dataclass, field
from torch import nn
from launcher import Splits

@dataclass
class Hparams:
    epochs: int = 2  # passes over the data
    # global: samples per optimizer step,
    # however many processes share them
    batch_size: int = 8
    lr: float = 0.1
    width: int = field(default=4,  # channels
                       metadata={"help": "the metadata's text wins"})
    dropout: float = 0.5  # a share: 50 % of the units
    # a comment with a blank line under it is nobody's

    depth: int = 2


def data(hp):
    return Splits(train=[])


def model(hp):
    return nn.Linear(1, 1)


def loss(hp):
    return nn.MSELoss()
"""


def test_a_hyperparameters_help_comes_from_its_metadata_or_its_comment(tmp_path, capsys):
    path = tmp_path / "commented.py"
    path.write_text(COMMENTED)
    code, out, _ = in_process(capsys, path, "--help")
    shown = " ".join(out.split("hyperparameters of commented.py (Hparams):", 1)[1].split())
    assert code == 0
    for expected in ("--epochs INT passes over the data [int, default: 2]",
                     "--batch-size INT global: samples per optimizer step, however many processes share them [int,",
                     "--lr FLOAT [float, default: 0.1]", "--width INT the metadata's text wins [int, default: 4]",
                     "--dropout FLOAT a share: 50 % of the units [float, default: 0.5]",
                     "--depth INT [int, default: 2]"):
        assert expected in shown, expected


def test_launcher_help_without_a_recipe(capsys):
    out = ok(launch("--help")).stdout
    assert "launch RECIPE" in out and "--cpu" in out
    commands = out.split("commands on runs (each with its own --help):\n", 1)[1].splitlines()
    assert [line.split()[1] for line in commands] == ["status", "logs", "cancel", "resume", "sweep", "export"]
    for command in ("status", "logs", "cancel", "sweep"):
        code, text, _ = in_process(capsys, command, "--help")
        assert code == 0 and text.startswith(f"usage: launch {command}"), text
    cli.main(["resume", "--help"])
    assert capsys.readouterr().out.startswith("usage: launch resume RUN_DIR")
    assert in_process(capsys, "--version") == (0, f"launch {importlib.metadata.version('launcher')}\n", "")


BAD = [
    pytest.param([DIGITS, "--bach-size", "32"], "unknown flag --bach-size (did you mean --batch-size?)",
                 id="unknown-flag"),
    pytest.param([DIGITS, "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'", id="wrong-type"),
    pytest.param([DIGITS, "--precision", "fp8"], "invalid choice: 'fp8'", id="bad-choice"),
    pytest.param(["recipes/nope.py"], "recipe", id="missing-recipe"),
    pytest.param([], "missing RECIPE", id="no-recipe"),
    pytest.param([DIGITS, "--cpu", "--gpus", "1"], "--cpu and --gpus exclude each other", id="cpu-and-gpus"),
    pytest.param([DIGITS, "--cpu", "--procs", "0"], "--procs must be at least 1, not 0", id="zero-procs"),
    pytest.param([DIGITS, "--procs", "2"], "--procs N needs --cpu", id="procs-without-cpu"),
    pytest.param([DIGITS, "--cpu", "--grad-accum", "-1"], "--grad-accum must be at least 1", id="negative-accum"),
    pytest.param([DIGITS, "--cpu", "--clip-grad", "-0.5"], "--clip-grad must be at least 0", id="negative-clip"),
    pytest.param([DIGITS, "--cpu", "--procs", "2", "--batch-size", "63"], "must be a positive multiple of 2",
                 id="indivisible-batch"),
    pytest.param([DIGITS, "--debug", "--cpu", "--procs", "2"], "--debug runs one process", id="debug-many"),
    pytest.param([DIGITS, "--cpu", "--resume", "/nonexistent/ckpt"], "no such checkpoint or run directory",
                 id="missing-resume"),
    pytest.param([DIGITS, "--cpu", "--procs", "999"], "each process needs one", id="absurd-procs"),
    pytest.param([DIGITS, "--cpu", "--timeout", "1"], "would fail healthy runs", id="absurd-timeout"),
    pytest.param([DIGITS, "--cpu", "--max-restarts", "1000"], "at most 100", id="absurd-restarts"),
    pytest.param([DIGITS, "--cpu", "--save-every", "-5"], "--save-every must be at least 0", id="negative-save"),
    pytest.param([DIGITS, "--cpu", "--timeout", "nan"], "--timeout must be a finite number", id="nan-timeout"),
    pytest.param([DIGITS, "--cpu", "--nodes", "2", "--run-dir", "x"], "--nodes 2 needs --master-addr", id="no-master"),
    pytest.param([DIGITS, "--cpu", "--nodes", "2", "--node-rank", "2", "--master-addr", "h"],
                 "--node-rank 2 must be below --nodes 2", id="node-rank"),
    pytest.param([DIGITS, "--cpu", "--nodes", "3:2"], "--nodes 3:2: an elastic node count is MIN:MAX, 1 ≤ MIN ≤ MAX",
                 id="elastic-backwards"),
    pytest.param([DIGITS, "--cpu", "--nodes", "1:x"], "--nodes 1:x: an elastic node count is MIN:MAX",
                 id="elastic-unreadable"),
    pytest.param([DIGITS, "--cpu", "--nodes", "2", "--min-nodes", "3", "--master-addr", "h"],
                 "--min-nodes 3 must be at most --nodes 2", id="elastic-min-above"),
    pytest.param([DIGITS, "--cpu", "--nodes", "2:4", "--master-addr", "h", "--batch-size", "32"],
                 "--batch-size 32 must split over every world --nodes 2:4 allows (2, 3, 4 processes): 3 does not "
                 "divide it", id="elastic-batch"),
    pytest.param([DIGITS, "--cpu", "--nodes", "1:2", "--master-addr", "h", "--engine", "deepspeed"],
                 "--nodes MIN:MAX restarts on the nodes that are left, where a DeepSpeed checkpoint cannot be loaded",
                 id="elastic-deepspeed"),
    pytest.param([DIGITS, "--cpu", "--nodes", "1:2", "--slurm"], "--nodes 1:2 is for nodes you start yourself",
                 id="elastic-slurm"),
    pytest.param([DIGITS, "--cpu", "--nodes", "2", "--master-addr", "h", "--max-restarts", "1"],
                 "--max-restarts works on one node, or with an elastic --nodes MIN:MAX", id="restarts-fixed-nodes"),
    pytest.param([DIGITS, "--cpu", "--master-port", "70000"], "is not a port", id="bad-port"),
    pytest.param([DIGITS, "--cpu", "--rendezvous-timeout", "0"], "--rendezvous-timeout must be at least 2, not 0",
                 id="rendezvous-timeout"),
    pytest.param([CIFAR, "--cpu", "--val-size", "-1"], "invalid hyperparameters: --val-size must be at least 0",
                 id="hparam-check"),
    pytest.param([DIGITS, "--slurm", "--cpu", "--time", "1:00"], "--time 1:00 leaves under 5 minutes of training "
                 "before Slurm's warning signal (USR2@120: 120 s before the limit)", id="slurm-time-too-short"),
    pytest.param([DIGITS, "--slurm", "--cpu", "--time", "soon"], "--time soon: expected minutes, M:S, H:M:S",
                 id="slurm-time-unreadable"),
    pytest.param([DIGITS, "--cpu", "--lr", "-1"], "--lr is a learning rate: a finite number of at least 0, not -1",
                 id="negative-lr"),
    pytest.param([DIGITS, "--cpu", "--procs", "2", "--lr", "inf"], "--lr is a learning rate", id="infinite-lr"),
    pytest.param([DIGITS, "--cpu", "--dropout", "nan"], "invalid hyperparameters: --dropout is nan; give a number",
                 id="nan-hparam"),
    pytest.param([CIFAR, "--cpu", "--data-dir", "/nonexistent/cifar", "--no-download"], "no CIFAR-10 in /nonexistent",
                 id="missing-data-dir"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    """In this process: what `launch` does with argv up to the point it would start anything."""
    run_dir = tmp_path / "run"
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        cli.main([*map(str, args), "--run-dir", str(run_dir)] if args else [])
    out, err = capsys.readouterr()
    assert exited.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: "), err
    assert message in lines[0]
    assert not run_dir.exists() and "processes" not in out  # nothing was set up or spawned


BOUNDED = [(name, bound, f.metadata[bound]) for name, f in flags.FIELDS.items() for bound in ("low", "high")
           if f.metadata.get(bound) is not None]


@pytest.mark.parametrize("name,bound,limit", BOUNDED, ids=[f"{n}-{b}" for n, b, _ in BOUNDED])
def test_every_flag_is_held_to_its_declared_bounds(name, bound, limit, tmp_path, capsys):
    """Each bound declared in flags.py refuses the value just past it, and only that value: the parser, the checks
    and the plan are all derived from the one declaration."""
    past = limit - 1 if bound == "low" else limit + 1
    word = "at least" if bound == "low" else "at most"
    assert f"{flags.option(name)} must be {word} {limit}, not {past}" in refused(
        capsys, DIGITS, "--cpu", flags.option(name), past, "--run-dir", tmp_path / "run")


def test_a_plan_field_named_like_a_flag_holds_that_flag(tmp_path):
    """make_plan resolves only the fields that depend on more than their own flag; every other one is the flag."""
    given = {"seed": 7, "clip_grad": 0.5, "keep": 5, "save_every": 4, "early_stop": 2, "timeout": 30.0,
             "rendezvous_timeout": 9, "max_restarts": 3, "health": False, "device_data": False,
             "find_unused_parameters": True, "precision": "bf16", "wandb_entity": "team"}
    argv = [DIGITS, "--cpu", "--run-dir", tmp_path / "run", "--no-health", "--no-device-data",
            "--find-unused-parameters"]
    for name, value in given.items():
        if not isinstance(value, bool):
            argv += [flags.option(name), value]
    plan = cli.parse([str(a) for a in argv])[0]
    assert {name: getattr(plan, name) for name in given} == given


def test_a_plan_field_named_like_a_flag_has_that_flags_default():
    """One default per flag: a Plan built in code (as tests and benchmarks do) means what the command line means."""
    fields = {f.name: f.default for f in dataclasses.fields(Plan) if f.name in flags.FIELDS}
    declared = {name: flags.FIELDS[name].default for name in fields if flags.FIELDS[name].default is not None}
    assert len(declared) > 20 and {name: fields[name] for name in declared} == declared


@pytest.mark.parametrize("args", [[DIGITS, "--bach-size", "32"], [DIGITS, "--cpu", "--procs", "2", "--lr", "inf"]],
                         ids=["parser", "checks"])
def test_bad_input_is_one_line_and_exit_2_from_the_command(args, tmp_path):
    """The table above, end to end for one error of the parser and one of the checks: the installed command."""
    run_dir = tmp_path / "run"
    result = launch(*args, "--run-dir", run_dir, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("launch: error: "), result.stderr
    assert not run_dir.exists() and result.stdout == ""


def test_nodes_need_a_run_directory_they_share(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, DIGITS, "--cpu", "--nodes", "2", "--master-addr", "127.0.0.1")
    assert "--nodes 2 needs --run-dir or --name: every node must use the same run directory" in err
    assert not (tmp_path / "runs").exists()


def test_recipe_that_fails_to_import(tmp_path, capsys):
    recipe = tmp_path / "broken.py"
    recipe.write_text("import torch\n\nimport no_such_module\n\n\nclass Hparams:\n    pass\n")
    assert refused(capsys, recipe) == (f"launch: error: recipe {recipe} failed to import: "
                                       "ModuleNotFoundError: No module named 'no_such_module' (line 3)")


def test_recipe_without_the_contract(tmp_path, capsys):
    recipe = tmp_path / "partial.py"
    recipe.write_text("def data(hp):\n    pass\n\n\ndef model(hp):\n    pass\n")
    assert "lacks Hparams, loss" in refused(capsys, recipe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpus_without_a_gpu(capsys):
    assert refused(capsys, DIGITS, "--gpus", "1") == ("launch: error: --gpus 1: no GPUs visible; use --cpu to run on "
                                                      "the CPU")


def test_a_run_directory_is_never_reused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    err = refused(capsys, DIGITS, "--cpu", "--run-dir", tmp_path)
    assert "already holds a run; continue it with --resume auto" in err


def test_a_run_directory_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a directory")
    for run_dir, slurm in ((file, []), (file / "sub", []), (file, ["--slurm"])):
        assert refused(capsys, DIGITS, "--cpu", "--run-dir", run_dir, *slurm) == (
            f"launch: error: --run-dir {run_dir}: {file} is a file, not a directory")


def test_resume_auto_needs_a_run_to_continue(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "--resume auto needs --run-dir or --name" in refused(capsys, DIGITS, "--cpu", "--resume", "auto")


def test_bad_input_fails_fast():
    start = time.perf_counter()
    assert launch(DIGITS, "--lr", "fast").returncode == 2
    assert time.perf_counter() - start < 30  # generous: imports only, no process group, no data


def test_every_field_type_becomes_a_typed_flag(tmp_path):
    recipe = tmp_path / "types.py"
    recipe.write_text(TYPES_RECIPE)
    plan, _, hp, _ = cli.parse([str(recipe), "--cpu", "--run-dir", str(tmp_path / "r"), "--batch-size", "8",
                             "--rate", "1e-3", "--name-tag", "x y", "--no-flag", "--mode", "b", "--cap", "none",
                             "--depth", "3"])
    assert (hp.batch_size, hp.rate, hp.name_tag, hp.flag, hp.mode, hp.cap, hp.depth) == (8, 1e-3, "x y", False, "b",
                                                                                          None, 3)
    assert plan.hparams["mode"] == "b" and plan.micro_batch == 8
    with pytest.raises(cli.UsageError, match="invalid choice: 'c'"):
        cli.parse([str(recipe), "--cpu", "--mode", "c", "--depth", "1"])
    with pytest.raises(cli.UsageError, match="required: --depth"):
        cli.parse([str(recipe), "--cpu"])


TYPES_RECIPE = """
from dataclasses import dataclass
from typing import Literal, Optional

@dataclass
class Hparams:
    depth: int                 # no default: a required flag
    epochs: int = 1
    batch_size: int = 4
    rate: float = 0.1
    lr: float = 0.1
    name_tag: str = "a"
    flag: bool = True
    mode: Literal["a", "b"] = "a"
    cap: Optional[int] = 5

def data(hp): ...
def model(hp): ...
def loss(hp): ...
"""


def test_secrets_stay_out_of_the_run_record(tmp_path):
    recipe = tmp_path / "secret.py"
    recipe.write_text(TYPES_RECIPE + "\n@dataclass\nclass Hparams(Hparams):\n    hub_token: str = ''\n")
    plan, _, _, _ = cli.parse([str(recipe), "--cpu", "--depth", "1", "--hub-token", "SENTINEL-7f3a"])
    assert plan.hparams["hub_token"] == "SENTINEL-7f3a"  # the workers get it
    record = run_record.record(plan)
    assert record["plan"]["hparams"]["hub_token"] == "<redacted>"
    assert "SENTINEL" not in str(record)


def test_an_at_file_holds_arguments_one_per_line(tmp_path):
    args = tmp_path / "trial.args"
    args.write_text("recipes/digits.py\n--lr\n0.001\n--name\nwith space\n")
    assert cli.with_files([f"@{args}", "--cpu", "@nowhere"]) == [
        "recipes/digits.py", "--lr", "0.001", "--name", "with space", "--cpu", "@nowhere"]


@pytest.mark.parametrize("given,same", [
    (["--nproc-per-node", "2", "--cpu"], ["--procs", "2", "--cpu"]),
    (["--cpu", "--nproc_per_node=2"], ["--cpu", "--procs", "2"]),
    (["--cpu", "--procs", "2", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master-port",
      "29400"],
     ["--cpu", "--procs", "2", "--nodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port",
      "29400"]),
    (["--cpu", "--max_restarts", "3"], ["--cpu", "--max-restarts", "3"]),
    (["--cpu", "--nnodes=1:2", "--master_addr", "h", "--max-restarts", "2"],
     ["--cpu", "--nodes", "2", "--min-nodes", "1", "--master-addr", "h", "--max-restarts", "2"]),
    (["--cpu", "--nodes", "2:2", "--master-addr", "h"], ["--cpu", "--nodes", "2", "--master-addr", "h"]),
], ids=["nproc-per-node", "underscores-and-equals", "torchruns-node-flags", "max-restarts", "elastic", "fixed-range"])
def test_torchruns_flags_are_launchs_own(tmp_path, given, same):
    """A torchrun user's command line works as typed where launch does the same thing."""
    run_dir = ["--run-dir", str(tmp_path / "run")]
    plans = [dataclasses.replace(cli.parse([str(DIGITS), *argv, *run_dir])[0], wandb_id=None) for argv in (given, same)]
    assert plans[0] == plans[1]


@pytest.mark.parametrize("flag,message", [
    (["--standalone"], "launch needs no --standalone: without --nodes it runs on this node, on a free local port"),
    (["--rdzv-endpoint", "host:29400"], "--rdzv-endpoint HOST:PORT is --master-addr HOST --master-port PORT here"),
    (["--rdzv_backend", "c10d"], "there is no rendezvous backend to choose"),
    (["--num_machines", "2"], "--num-machines is --nodes N here"),
    (["--main_process_ip", "10.0.0.1"], "--main-process-ip is --master-addr HOST here"),
    (["--num_processes", "8"], "launch counts processes per node: --gpus N (or --cpu --procs N) on each node"),
    (["--gradient_accumulation_steps", "4"], "--gradient-accumulation-steps is --grad-accum K here"),
    (["--mixed_precision", "bf16"], "--mixed-precision is --precision fp32|bf16|fp16 here"),
    (["--config_file", "acc.yaml"], "launch reads no Accelerate config file: give what it holds as flags"),
    (["--nproc-per-node", "auto"], "--nproc-per-node auto: launch takes a number of processes on this node here"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
@pytest.mark.parametrize("where", ["before-the-recipe", "after-the-recipe", "before-a-script"])
def test_torchruns_and_accelerates_other_flags_say_what_to_write(capsys, tmp_path, flag, message, where):
    script = ROOT / "tests" / "scripts" / "alone.py"
    argv = {"before-the-recipe": [*flag, DIGITS], "after-the-recipe": [DIGITS, *flag],
            "before-a-script": [*flag, script]}[where]
    err = refused(capsys, "--cpu", "--run-dir", tmp_path / "run", *argv)
    assert err.startswith("launch: error: ") and message in err, err
