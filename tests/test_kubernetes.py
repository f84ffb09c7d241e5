"""--kubernetes: the TrainJob, validated with Kubeflow's own models (there is no cluster here), and its command run
as the pods run it: two processes on this machine with the environment Kubeflow's torch runtime gives each pod."""

import os
import socket
import subprocess

import pytest
import yaml

from conftest import LAUNCH, ROOT, TINY, clean_env, in_process, records, refused
from launcher.processes import kubernetes

kubeflow = pytest.importorskip("kubeflow_trainer_api.models", reason="pip install -e '.[kubernetes]'")


def dry_run(capsys, *flags) -> dict:
    code, out, err = in_process(capsys, TINY.relative_to(ROOT), "--kubernetes", "--image", "ghcr.io/me/launcher:1",
                                "--dry-run", *flags)
    assert code == 0, err
    return yaml.safe_load(out)


def test_the_trainjob_is_kubeflows_own(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    job = dry_run(capsys, "--nodes", "2", "--cpu", "--procs", "2", "--name", "My_Run.1", "--api-token", "s3cret",
                  "--lr", "0.05")
    assert kubeflow.TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job  # what the API's types hold
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == (kubernetes.API_VERSION, "TrainJob",
                                                                         "my-run-1")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["resourcesPerNode"]["limits"] == {"cpu": "2"}
    assert trainer["command"] == ["launch", "tests/recipes/tiny.py", "--cpu", "--procs", "2", "--api-token",
                                  "$(LAUNCH_SECRET_API_TOKEN)", "--lr", "0.05", "--name", "my-run-1", "--resume",
                                  "auto"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"]}
    assert env == {"WANDB_API_KEY": {"name": "launcher", "key": "wandb-api-key", "optional": True},
                   "LAUNCH_SECRET_API_TOKEN": {"name": "launcher", "key": "api-token", "optional": False}}
    assert not set(env) & set(kubernetes.RESERVED)
    assert "s3cret" not in yaml.safe_dump(job)


@pytest.mark.parametrize("flags,message", [
    (["--cpu", "--kubernetes"], "--kubernetes needs --image IMAGE"),
    (["--image", "x"], "--image goes with --kubernetes"),
    (["--kubernetes", "--image", "x"], "--kubernetes needs what each node runs: --gpus N, or --cpu [--procs N]"),
    (["--kubernetes", "--slurm", "--cpu", "--image", "x"], "--kubernetes and --slurm are two ways to submit"),
    (["--kubernetes", "--cpu", "--image", "x", "--node-rank", "1", "--nodes", "2"],
     "--node-rank is for jobs without a scheduler; with --kubernetes the TrainJob sets it"),
], ids=["no-image", "image-alone", "no-device", "and-slurm", "node-rank"])
def test_bad_kubernetes_input_is_one_line_and_exit_2(flags, message, capsys, tmp_path):
    assert message in refused(capsys, TINY, *flags, "--run-dir", tmp_path / "run")


def test_without_kubectl_the_manifest_is_written_and_the_way_to_apply_it_said(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, _ = in_process(capsys, TINY, "--kubernetes", "--cpu", "--image", "x", "--run-dir", tmp_path / "run")
    written = tmp_path / "run" / "trainjob.yaml"
    assert code == 0 and f"kubectl is not on PATH: apply it with\n  kubectl apply -f {written}" in out
    assert yaml.safe_load(written.read_text())["kind"] == "TrainJob"


def test_the_pods_command_trains_one_run_on_two_nodes(capsys, tmp_path, monkeypatch):
    """Each pod runs the TrainJob's command with what Kubeflow's torch runtime injects (PET_*; node 0 on loopback
    here, as `<job>-node-0-0.<job>` there): one run, to its last step, with one W&B run."""
    monkeypatch.chdir(ROOT)
    job = dry_run(capsys, "--nodes", "2", "--cpu", "--max-steps", "8", "--wandb", "offline", "--run-dir",
                  str(tmp_path / "run"))
    trainer = job["spec"]["trainer"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pods = [subprocess.Popen([str(LAUNCH), *trainer["command"][1:]], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE,
                             env=clean_env(PET_NNODES=trainer["numNodes"], PET_NPROC_PER_NODE=1, PET_NODE_RANK=rank,
                                           PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port))
            for rank in (1, 0)]
    outputs = [pod.communicate(timeout=300) for pod in pods]
    for pod, (out, err) in zip(pods, outputs, strict=True):
        assert pod.returncode == 0, out + err
    assert "1 process on node 0 of 2 (as torchrun's and Kubeflow's PET_* variables say)" in outputs[1][0]
    assert max(r["step"] for r in records(tmp_path / "run")) == 8
    assert len(list((tmp_path / "run").rglob("offline-run-*"))) == 1
    assert not any(k.startswith("PET_") for k in os.environ)


def test_the_readmes_trainjob_is_what_the_dry_run_prints(capsys, monkeypatch):
    """README.md shows a --dry-run and what it prints: the same manifest, byte for byte."""
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "--kubernetes" in line and line.startswith("launch "))
    shown = readme.split(command + "\n```\n\n```\n", 1)[1].split("```", 1)[0]
    code, out, err = in_process(capsys, *command.split()[1:])
    assert code == 0, err
    assert out == shown
