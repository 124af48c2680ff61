"""launch/: the cluster files parse and pass their tools' checks, and every distpose command in them is a real
one: its subcommand answers --help, and a `distpose train`'s config and overrides load."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CLI = [sys.executable, "-m", "distpose"]


def strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def distpose_commands(text: str) -> list[list[str]]:
    """Every `distpose SUBCOMMAND args...` in a shell command line, up to a redirection or separator."""
    commands = []
    for match in re.finditer(r"(?:^|[\s/])distpose\s+([a-z]+)([^>|;&\n]*)", text):
        commands.append([match.group(1), *shlex.split(match.group(2))])
    return commands


def check_distpose_command(command: list[str]) -> None:
    sub, *args = command
    help_run = subprocess.run([*CLI, sub, "--help"], check=False, capture_output=True, text=True, cwd=REPO)
    assert help_run.returncode == 0, f"distpose {sub} --help: {help_run.stderr}"
    if sub == "train":  # the config file and every override must load (`distpose config` checks both)
        config_args = [a for a in args if not a.startswith("--") and "$" not in a]
        loaded = subprocess.run([*CLI, "config", *config_args], check=False, capture_output=True, text=True, cwd=REPO)
        assert loaded.returncode == 0, f"distpose config {' '.join(config_args)}: {loaded.stderr}"


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "onprem.yaml"])
def test_ray_cluster_launcher_files_pass_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / "ray" / name).read_text())
    validate_config(prepare_config(config))  # what `ray up` checks, with its defaults filled in
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("--metrics-export-port=8080") == 2, "every node must serve metrics on a known port"
    commands = [c for s in strings(config) for c in distpose_commands(s)]
    assert commands, f"{name} runs no distpose command"
    for command in commands:
        check_distpose_command(command)


def test_kuberay_rayjob_runs_distpose_on_gpu_workers_with_shared_storage():
    documents = list(yaml.safe_load_all((LAUNCH / "kuberay" / "rayjob.yaml").read_text()))
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in documents if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and "ReadWriteMany" in claim["spec"]["accessModes"]
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for c in pod["spec"]["containers"] for m in c["volumeMounts"]}
        assert claims.get("shared") == claim["metadata"]["name"] and mounts["shared"] == "/shared"
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert all(gpus) and gpus, "the worker group must request GPUs"
    entrypoint = job["spec"]["entrypoint"]
    assert "train.storage=/shared/" in entrypoint, "checkpoints must go to the shared volume"
    (command,) = distpose_commands(entrypoint)
    assert command[0] == "train"
    check_distpose_command(command)


def test_sbatch_script_passes_shellcheck_and_trains():
    script = LAUNCH / "slurm" / "distpose.sbatch"
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    text = script.read_text()
    assert re.search(r'bin/distpose" train "\$CONFIG" .*--address "\$HEAD_IP:\$RAY_PORT"', text)
    usage = re.search(r"sbatch launch/slurm/distpose\.sbatch (.*)", text).group(1)
    check_distpose_command(["train", *shlex.split(usage)])


def test_prometheus_config_reads_rays_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = yaml.safe_load((LAUNCH / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (files,) = [sd["files"] for sd in job["file_sd_configs"]]
    assert [Path(f).name for f in files] == [PROMETHEUS_SERVICE_DISCOVERY_FILE]
