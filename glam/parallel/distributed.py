"""Multi-process start-up: jax.distributed.initialize from gin or the environment.

The same program runs once per host (TPU pod worker, Slurm task, or a local process in tests);
JAX's multi-controller runtime joins them into one set of global devices.
"""
import os

import gin
import jax

from glam.config import ConfigError

# Environment variables launch/local.sh sets (TPU pods and Slurm are detected by JAX itself).
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "GLAM_COORDINATOR", "GLAM_NUM_PROCESSES", "GLAM_PROCESS_ID"
# launch/tpu_pod.sh and launch/gpu_slurm.sbatch set this: JAX detects the cluster (TPU pod, Slurm) itself.
ENV_AUTO = "GLAM_DISTRIBUTED_AUTO"


@gin.configurable
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False,
                           cpu_collectives: str = "gloo") -> bool:
  """Joins this process to a multi-process run; returns whether it did.

  Args:
    coordinator_address: "host:port" of process 0 (default: $GLAM_COORDINATOR).
    num_processes, process_id: this run's size and rank (default: $GLAM_NUM_PROCESSES / $GLAM_PROCESS_ID).
    auto: call jax.distributed.initialize() with no arguments, letting JAX detect the cluster
      (TPU pod workers, Slurm tasks); also on when $GLAM_DISTRIBUTED_AUTO=1, which
      launch/tpu_pod.sh and launch/gpu_slurm.sbatch set.
    cpu_collectives: the CPU collectives implementation for cross-process work ("gloo").
  Without a coordinator (from arguments or environment) and without `auto`, nothing happens: a
  single process.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  auto = auto or os.environ.get(ENV_AUTO) == "1"
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = _int_env(ENV_NUM_PROCESSES)
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = _int_env(ENV_PROCESS_ID)
  if not coordinator_address and not auto:
    return False
  if not auto and (num_processes is None or process_id is None):
    raise ConfigError(f"initialize_distributed: coordinator {coordinator_address!r} given but num_processes="
                      f"{num_processes} and process_id={process_id}; set both (or ${ENV_NUM_PROCESSES} / "
                      f"${ENV_PROCESS_ID})")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"initialize_distributed.process_id={process_id}: must be in [0, {num_processes})")
  if jax.distributed.is_initialized():
    return True
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if auto:
    jax.distributed.initialize()
    return True
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  return True


def _int_env(name: str) -> int:
  value = os.environ[name]
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"${name}={value!r}: expected an integer") from None


def gather_process_states(key: str, state) -> dict:
  """{key_of_process_i: state_i for every process}: each process's JSON-serialisable value (e.g.
  its input position), so that the checkpoint, written by process 0, holds every process's entry.
  Single-process: {key: state}."""
  import json

  import numpy as np
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return {key: state}
  text = json.dumps({"key": key, "state": state}).encode()
  lengths = multihost_utils.process_allgather(np.array([len(text)], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:len(text)] = np.frombuffer(text, np.uint8)
  everyone = multihost_utils.process_allgather(padded)  # [processes, max length]
  entries = [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(everyone, np.ravel(lengths))]
  return {entry["key"]: entry["state"] for entry in entries}
