"""Kubernetes: the run as a Kubeflow Trainer v2 TrainJob, built with the models of the kubeflow-trainer-api package
(typed as the API server types them), printed with --dry-run, else written into the run directory and applied with
kubectl. Each pod runs the user's launch command; Kubeflow's torch runtime gives it torchrun's PET_* variables, where
the launcher reads its node count, rank and node 0 (processes/cluster.py). No secret goes into the manifest: the
pods read each from a Secret (secretKeyRef)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from .. import flags
from ..errors import UsageError
from ..flags import Flags
from ..plan import Plan
from ..runs import directory as rundir
from ..text import count, first_line

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RESERVED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")  # Kubeflow's
WANDB_KEY = "wandb-api-key"  # the key of the Secret that holds W&B's
# launcher flags the TrainJob sets (the node count, node 0), or that only writing it needs
SUBMISSION_ONLY = ("--kubernetes", "--dry-run", "--image", "--namespace", "--runtime", "--secret", "--nodes",
                   "--node-rank", "--master-addr", "--master-port", "--name")
KUBECTL_TIMEOUT = 60


def job_name(run: str) -> str:
    """The TrainJob's name from the run's: what Kubernetes allows (an RFC 1035 label: lower case, digits and '-',
    a letter first, at most 63), which the pods also take for their run name, so that every node writes one run."""
    name = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
    name = name if name[:1].isalpha() else f"run-{name}"
    return name[:63].rstrip("-")


def manifest(plan: Plan, args: Flags, argv: list[str]) -> dict:
    """The TrainJob of `plan`, as a dict of the API's own (camelCase) names: built and validated with the models."""
    try:
        from kubeflow_trainer_api import models
    except ImportError:
        raise UsageError("--kubernetes needs the kubeflow-trainer-api package: pip install "
                         "kubeflow-trainer-api==2.3.0 (in a clone of the launcher: pip install -e '.[kubernetes]')"
                         ) from None
    quantity = models.IoK8sApimachineryPkgApiResourceQuantity
    name = job_name(plan.name)
    secret = plan.secret_options()
    command, hidden = _hide_secrets(_command(argv, plan, name), secret)

    def from_secret(variable: str, key: str, optional: bool):
        return models.IoK8sApiCoreV1EnvVar(name=variable, value_from=models.IoK8sApiCoreV1EnvVarSource(
            secret_key_ref=models.IoK8sApiCoreV1SecretKeySelector(name=args.secret, key=key, optional=optional)))

    # without the Secret (or its key) the pods log to W&B offline, into the run directory
    env = [from_secret("WANDB_API_KEY", WANDB_KEY, True)] if plan.wandb != "disabled" else []
    env += [from_secret(variable, key, False) for variable, key in hidden.items()]
    resources = {"nvidia.com/gpu": quantity(str(plan.nproc))} if plan.device == "cuda" else \
        {"cpu": quantity(str(plan.nproc))}
    job = models.TrainerV1alpha1TrainJob(
        api_version=API_VERSION, kind="TrainJob",
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=args.namespace),
        spec=models.TrainerV1alpha1TrainJobSpec(
            runtime_ref=models.TrainerV1alpha1RuntimeRef(name=args.runtime, api_group="trainer.kubeflow.org",
                                                         kind="ClusterTrainingRuntime"),
            trainer=models.TrainerV1alpha1Trainer(
                image=args.image, command=command, num_nodes=plan.nnodes, env=env or None,
                resources_per_node=models.IoK8sApiCoreV1ResourceRequirements(limits=resources, requests=resources))))
    return job.to_dict()


def _command(argv: list[str], plan: Plan, name: str) -> list[str]:
    """The user's launch command as each pod runs it: the recipe (or script) by the path given, which the image
    holds, the job's name as the run's, and --resume auto unless it says otherwise."""
    at = len(argv) - (len(plan.script_args) + 1 if plan.script_args is not None else 0)
    ours = flags.without(argv[:at], SUBMISSION_ONLY)
    script = [argv[at], *plan.script_args] if plan.script_args is not None else []
    # a pod that Kubernetes starts again continues from the run's newest checkpoint
    resume = [] if any(token.split("=")[0] == "--resume" for token in ours) else ["--resume", "auto"]
    return ["launch", *ours, "--name", name, *resume, *script]


def _hide_secrets(command: list[str], secret_flags: set[str]) -> tuple[list[str], dict[str, str]]:
    """`command` with each secret flag's value replaced by $(VARIABLE), which Kubernetes expands from the pod's
    environment; {variable: the Secret's key}, the flag's name."""
    hidden, values = flags.mask(command, secret_flags, lambda flag: f"$({flags.secret_variable(flag)})")
    return hidden, {flags.secret_variable(flag): flag[2:] for flag in values}


def submit_run(plan: Plan, args: Flags, argv: list[str]) -> int:
    """--kubernetes: the TrainJob for this run; printed with --dry-run, else written and applied with kubectl."""
    import yaml

    text = yaml.safe_dump(manifest(plan, args, argv), sort_keys=False)
    if args.dry_run:
        print(text, end="")
        return 0
    run_dir = Path(plan.run_dir)
    rundir.make(run_dir)
    path = run_dir / "trainjob.yaml"  # what was applied, to apply again by hand
    path.write_text(text)
    where = count(plan.nproc, "GPU" if plan.device == "cuda" else "CPU process")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(f"launch: wrote {path}: {count(plan.nnodes, 'node')} × {where}; kubectl is not on PATH: apply it with\n"
              f"  kubectl apply -f {shlex.quote(str(path))}", flush=True)
        return 0
    try:
        done = subprocess.run([kubectl, "apply", "-f", str(path)], capture_output=True, text=True,
                              timeout=KUBECTL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UsageError(f"kubectl apply -f {path} did not answer in {KUBECTL_TIMEOUT} s") from None
    if done.returncode:
        raise UsageError(f"kubectl refused the TrainJob ({first_line(done.stderr or done.stdout)}); it is in {path}")
    name, namespace = job_name(plan.name), f" -n {args.namespace}" if args.namespace else ""
    print(f"launch: applied TrainJob {name}: {count(plan.nnodes, 'node')} × {where}, manifest {path}\n"
          f"  follow:  kubectl logs{namespace} -f -l jobset.sigs.k8s.io/jobset-name={name} --max-log-requests "
          f"{plan.nnodes}\n"
          f"  status:  kubectl get trainjob{namespace} {name}\n"
          f"  cancel:  kubectl delete trainjob{namespace} {name}", flush=True)
    return 0
