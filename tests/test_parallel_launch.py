"""The launch scripts' argument handling, the environment they set, and their dry-run commands
(no cluster needed), and jax.distributed start-up from the environment."""
import os
import shlex
import subprocess

import pytest

from cli_helpers import REPO
from glam.config import ConfigError
from glam.parallel.distributed import initialize_distributed


def run(script: str, *args: str, dry_run: bool = True, **env):
  environment = dict(os.environ, GLAM_DRY_RUN="1" if dry_run else "0", **env)
  return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO, env=environment,
                        capture_output=True, text=True, timeout=60)


def test_local_launcher_prints_one_command_per_process():
  proc = run("local.sh", "3", "--gin_file=configs/mesh/dp8.gin", "--model_dir=/tmp/x", GLAM_DEVICES_PER_PROCESS="2")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert f"GLAM_PROCESS_ID={i}" in line and "GLAM_NUM_PROCESSES=3" in line and "JAX_PLATFORMS=cpu" in line
    assert "xla_force_host_platform_device_count=2" in line
    assert line.endswith("-m glam train --gin_file=configs/mesh/dp8.gin --model_dir=/tmp/x")
  assert len({line.split()[0] for line in lines}) == 1  # one coordinator address for all


@pytest.mark.parametrize("args, env, message", [
    (("zero",), {}, "NUM_PROCESSES=zero: expected a positive integer"),
    ((), {}, "usage:"),
    (("2",), {"GLAM_DEVICES_PER_PROCESS": "x"}, "GLAM_DEVICES_PER_PROCESS=x"),
])
def test_local_launcher_rejects_bad_arguments(args, env, message):
  proc = run("local.sh", *args, **env)
  assert proc.returncode == 2 and message in proc.stderr


def test_tpu_pod_command_runs_on_all_workers_with_quoted_flags():
  flags = ["--gin_file=configs/mesh/ep8.gin", "--gin.DecoderLM.block=('attn', 'moe')", "--model_dir=gs://b/run"]
  proc = run("tpu_pod.sh", "my-tpu", "us-central2-b", *flags, GLAM_PROJECT="proj", GLAM_REPO_DIR="/srv/glam")
  assert proc.returncode == 0, proc.stderr
  words = shlex.split(proc.stdout)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--zone=us-central2-b" in words and "--project=proj" in words and "--worker=all" in words
  remote = next(w for w in words if w.startswith("--command="))[len("--command="):]
  assert remote.startswith("cd /srv/glam && GLAM_DISTRIBUTED_AUTO=1 ")
  assert shlex.split(remote.split(" -m glam train ", 1)[1]) == flags  # the flags survive the remote shell
  without_project = run("tpu_pod.sh", "t", "z", "--model_dir=gs://b/x")
  assert without_project.returncode == 0 and "--project" not in without_project.stdout


def test_gpu_slurm_command_is_one_srun_task_per_node():
  proc = run("gpu_slurm.sbatch", "--gin_file=configs/mesh/ep8.gin", "--model_dir=/shared/run")
  assert proc.returncode == 0, proc.stderr
  words = shlex.split(proc.stdout)
  assert words[0] == "srun" and "--ntasks-per-node=1" in words and "GLAM_DISTRIBUTED_AUTO=1" in words
  assert words[-5:] == ["-m", "glam", "train", "--gin_file=configs/mesh/ep8.gin", "--model_dir=/shared/run"]
  with open(os.path.join(REPO, "launch", "gpu_slurm.sbatch")) as f:
    assert "#SBATCH --ntasks-per-node=1" in f.read()


@pytest.mark.parametrize("script, args", [("tpu_pod.sh", ("t", "z", "--gin_file=a.gin")),
                                          ("gpu_slurm.sbatch", ("--gin_file=a.gin",))])
def test_cluster_launchers_require_a_model_dir(script, args):
  proc = run(script, *args)
  assert proc.returncode == 2 and "missing --model_dir" in proc.stderr


def test_distributed_is_off_without_a_coordinator(monkeypatch):
  for name in ("GLAM_COORDINATOR", "GLAM_NUM_PROCESSES", "GLAM_PROCESS_ID", "GLAM_DISTRIBUTED_AUTO"):
    monkeypatch.delenv(name, raising=False)
  assert initialize_distributed() is False


def test_distributed_environment_errors_name_the_variables(monkeypatch):
  monkeypatch.setenv("GLAM_COORDINATOR", "localhost:1")
  monkeypatch.delenv("GLAM_PROCESS_ID", raising=False)
  monkeypatch.setenv("GLAM_NUM_PROCESSES", "two")
  with pytest.raises(ConfigError, match=r"\$GLAM_NUM_PROCESSES='two': expected an integer"):
    initialize_distributed()
  monkeypatch.setenv("GLAM_NUM_PROCESSES", "2")
  with pytest.raises(ConfigError, match=r"num_processes=2 and process_id=None"):
    initialize_distributed()
  monkeypatch.setenv("GLAM_PROCESS_ID", "5")
  with pytest.raises(ConfigError, match=r"process_id=5: must be in \[0, 2\)"):
    initialize_distributed()
