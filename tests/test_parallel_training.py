"""Training through the trainer on meshes: checkpoints move between meshes, and several processes
train exactly like one.

- A checkpoint written on data 2 x expert 4 restores on expert 8 and on a single device with the
  same parameter values, and training continues with the same next-step loss on each mesh (and
  the same loss one step later, which also needs the restored optimizer state to be right).
- 2 processes x 4 devices (launch/local.sh, jax.distributed over gloo) give the same per-step
  losses as 1 process x 8 devices (this test process), and their checkpoint holds both processes'
  input positions.
Losses agree to 1e-5 relative: only float summation order differs between meshes.
"""
import json
import os
import shutil
import subprocess

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_helpers import REPO
from glam import config
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model
from glam.parallel.mesh import make_mesh
from glam.parallel.sharding import abstract_with_shardings
from glam.parallel.train_state import train_state_shardings
from glam.train.checkpoint import Checkpointer, handler_registry
from glam.train.optimizers import make_optimizer
from glam.train.trainer import CHECKPOINT_SUBDIR, build_model, train

RUN = [
    "DecoderLM.d_model=16", "DecoderLM.num_blocks=1", "DecoderLM.vocab_size=260",
    "DecoderLM.block=('attn','moe')", "Attention.num_heads=2", "Attention.head_dim=8",
    "MoeLayer.d_ff=32", "MoeLayer.group_size=32", "train.batch_size=8", "train.seq_len=16",
    "train.num_steps=4", "train.log_every=1", "train.num_eval_batches=0",
    "train.measure_peak=False", "train.progress_bar=False",
]
FILES = ["configs/runs/pretrain.gin", "configs/models/glam_tiny.gin"]


def parse(mesh: str, *extra: str) -> None:
  gin.clear_config()
  config.parse(FILES + [f"configs/mesh/{mesh}.gin"], RUN + list(extra))


def train_losses(model_dir: str) -> list[float]:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [row["loss"] for row in sorted(rows, key=lambda r: r["step"]) if row.get("prefix") == "train"]


def restore_params(model_dir: str, mesh_name: str):
  """The step-2 parameters restored onto `mesh_name`'s mesh, the way the trainer restores."""
  parse(mesh_name)
  mesh = make_mesh()
  params = jax.eval_shape(lambda: build_model(DecoderLM, 0)[1])
  state = {"step": jax.ShapeDtypeStruct((), np.int32), "params": params,
           "opt_state": jax.eval_shape(make_optimizer().init, params)}
  shardings = train_state_shardings(state, abstract_model(DecoderLM), mesh)
  with Checkpointer(f"{model_dir}/{CHECKPOINT_SUBDIR}") as checkpointer:
    restored = checkpointer.restore(abstract_with_shardings(state, shardings), step=2)
  return restored.state["params"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """Train 2 steps on data 2 x expert 4, then steps 3-4 resumed on each of three meshes."""
  base = str(tmp_path_factory.mktemp("dp2_ep4_base"))
  parse("dp2_ep4", "train.stop_after=2")
  train(base)  # stops after step 2 with a checkpoint
  runs = {}
  for mesh in ("dp2_ep4", "ep8", "single"):
    directory = str(tmp_path_factory.mktemp(f"resume_{mesh}"))
    shutil.copytree(base, directory, dirs_exist_ok=True)
    parse(mesh)
    train(directory)
    runs[mesh] = directory
  gin.clear_config()
  return base, runs


def test_training_continues_with_the_same_loss_on_other_meshes(resumed):
  _, runs = resumed
  resumed_losses = {mesh: train_losses(directory)[2:] for mesh, directory in runs.items()}  # steps 3, 4
  assert len(train_losses(runs["ep8"])) == 4 and np.all(np.isfinite(resumed_losses["dp2_ep4"]))
  assert resumed_losses["dp2_ep4"][0] != resumed_losses["dp2_ep4"][1]  # step 4 saw an update
  np.testing.assert_allclose(resumed_losses["ep8"], resumed_losses["dp2_ep4"], rtol=1e-5)
  np.testing.assert_allclose(resumed_losses["single"], resumed_losses["dp2_ep4"], rtol=1e-5)


def test_parameters_restore_identically_onto_other_meshes(resumed):
  base, _ = resumed
  reference = jax.device_get(restore_params(base, "dp2_ep4"))
  for mesh in ("ep8", "single"):
    params = restore_params(base, mesh)
    wi = params["blocks"]["moe_1"]["experts"]["wi"]
    devices = 8 if mesh == "ep8" else 1
    assert len(wi.sharding.device_set) == devices
    assert wi.addressable_shards[0].data.shape[1] == 8 // devices  # experts split on ep8
    for (path, ref), got in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                                jax.tree.leaves(jax.device_get(params))):
      np.testing.assert_array_equal(got, ref, err_msg=f"{mesh}: {jax.tree_util.keystr(path)}")
  gin.clear_config()


def launch(num_processes: int, devices: int, model_dir: str, dry_run: bool = False):
  env = dict(os.environ, GLAM_DEVICES_PER_PROCESS=str(devices), GLAM_DRY_RUN="1" if dry_run else "0")
  env.pop("XLA_FLAGS", None)
  args = ([f"--gin_file={f}" for f in FILES + ["configs/mesh/dp2_ep4.gin"]] + [f"--gin.{b}" for b in RUN]
          + [f"--model_dir={model_dir}"])
  return subprocess.run([os.path.join(REPO, "launch", "local.sh"), str(num_processes), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  multi = str(tmp_path_factory.mktemp("two_processes"))
  proc = launch(2, 4, multi)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return multi, proc


def test_two_processes_train_like_one(resumed, two_processes):
  # the reference: 1 process x 8 devices on data 2 x expert 4 (steps 1-2, then 3-4 resumed)
  expected = train_losses(resumed[1]["dp2_ep4"])
  got = train_losses(two_processes[0])
  assert len(expected) == 4 and np.all(np.isfinite(expected)) and len(set(expected)) == 4
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_checkpoint_holds_every_process_input_position(two_processes):
  multi, proc = two_processes
  manager = ocp.CheckpointManager(os.path.join(multi, CHECKPOINT_SUBDIR), handler_registry=handler_registry(),
                                  options=ocp.CheckpointManagerOptions(create=False))
  data = manager.restore(4, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  manager.close()
  assert sorted(data) == ["process_0", "process_1"]
  assert data["process_0"] != data["process_1"]  # each process read its own row slots
  assert "[process 0]" in proc.stdout and "[process 1]" in proc.stdout



def test_a_mesh_checkpoint_loads_and_grows_on_one_device(resumed, tmp_path):
  """eval / generate (load_trained) and surgery read a checkpoint written on 8 devices in a
  process that has 1 (a pod checkpoint on a laptop): Orbax gets explicit one-device targets."""
  import sys
  from glam.surgery import runs
  from glam.train.loading import load_trained
  base, _ = resumed  # data 2 x expert 4, step 2
  tokens = np.arange(2 * 16).reshape(2, 16) % 250
  logits_file, grown_dir = str(tmp_path / "logits.npy"), str(tmp_path / "grown")
  script = ("import numpy as np, jax\nfrom glam.train.loading import load_trained\n"
            "from glam.surgery.grow import grow\nassert jax.device_count() == 1\n"
            f"np.save({logits_file!r}, np.asarray(load_trained({base!r}).model(np.{tokens!r}).logits))\n"
            f"grow({base!r}, {grown_dir!r}, add=8, init='copy')\n")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  expected = np.asarray(load_trained(base).model(tokens).logits)  # here: 8 devices, the saved topology
  np.testing.assert_allclose(np.load(logits_file), expected, rtol=1e-5, atol=1e-5)
  old = runs.flat(runs.read_run(base).state["params"])["blocks/moe_1/experts/wi"]  # [layers, 8, d, f]
  grown = runs.read_run(grown_dir)
  wi = runs.flat(grown.state["params"])["blocks/moe_1/experts/wi"]
  assert grown.step == 2 and wi.shape[1] == 16
  np.testing.assert_array_equal(wi[:, :8], old)
  np.testing.assert_array_equal(wi[:, 8:], old)  # copy: expert 8 + i = expert i
  gin.clear_config()
