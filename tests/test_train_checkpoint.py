"""Checkpoints: bit-identical round trips, keep policy, corrupt or unfinished steps, shape errors."""
import glob
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from glam.train.checkpoint import (CheckpointError, Checkpointer, CheckpointMismatchError,
                                   read_checkpoint_config)
from glam.train.optimizers import adafactor, make_optimizer

CONFIG = "DecoderLM.d_model = 32\n"


def train_state(steps: int = 2):
  """A small real state: factored and unfactored Adafactor statistics, after `steps` updates."""
  key = jax.random.key(0)
  params = {"blocks": {"ffn": {"wi": jax.random.normal(key, (2, 8, 16))}},
            "norm": {"scale": jnp.array([-0.0, 1.0, 2.0, 3.0])}}
  tx = make_optimizer(optimizer=lambda: adafactor(learning_rate=0.1, min_dim_size_to_factor=4))
  opt_state = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda p: jnp.sin(p + i), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(jnp.add, params, updates)
  return {"step": jnp.int32(steps), "params": params, "opt_state": opt_state}


def bits(tree):
  return [(np.asarray(x).dtype, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def abstract(state):
  return jax.eval_shape(lambda: state)


def damage(directory, step, item="state"):
  """Truncates every file of one item of a step to half its size."""
  files = [f for f in glob.glob(os.path.join(directory, str(step), item, "**"), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as handle:
      handle.truncate(os.path.getsize(f) // 2)


def test_round_trip_is_bit_identical(tmp_path):
  state = train_state()
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.save(500, state, {"epoch": 1, "offset": 77}, CONFIG, metadata={"vocab": "bytes"})
  restored = ckpt.restore(abstract(state))
  ckpt.close()
  assert restored.step == 500
  assert jax.tree.structure(restored.state) == jax.tree.structure(state)  # namedtuples come back
  assert bits(restored.state) == bits(state)
  assert restored.data_state == {"epoch": 1, "offset": 77}
  assert restored.config_text == CONFIG
  assert restored.metadata == {"vocab": "bytes"}
  assert read_checkpoint_config(str(tmp_path)) == CONFIG


def test_restore_into_shardings(tmp_path):
  state = train_state()
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharding = NamedSharding(mesh, P(None, "data"))  # wi's 8 rows over the devices
  target = abstract(state)
  wi = target["params"]["blocks"]["ffn"]["wi"]
  target["params"]["blocks"]["ffn"]["wi"] = jax.ShapeDtypeStruct(wi.shape, wi.dtype, sharding=sharding)
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, {}, CONFIG, force=True)
    restored = ckpt.restore(target)
  got = restored.state["params"]["blocks"]["ffn"]["wi"]
  assert got.sharding == sharding
  assert bits(restored.state) == bits(state)


def test_should_save_and_force(tmp_path):
  with Checkpointer(str(tmp_path), save_interval_steps=5, async_save=False) as ckpt:
    assert [s for s in range(12) if ckpt.should_save(s)] == [5, 10]
    state = {"x": jnp.zeros(2)}
    assert not ckpt.save(3, state, {}, CONFIG)
    assert ckpt.save(3, state, {}, CONFIG, force=True)
    assert ckpt.save(5, state, {}, CONFIG)
    assert ckpt.all_steps() == [3, 5]


def test_keep_last_and_keep_every(tmp_path):
  state = {"x": jnp.zeros(2)}
  with Checkpointer(str(tmp_path), save_interval_steps=1, keep_last=2, keep_every=4) as ckpt:
    for step in range(1, 11):
      ckpt.save(step, state, {"step": step}, CONFIG)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4, 8, 9, 10]
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 8, 9, 10]


def test_async_save_survives_donated_arrays(tmp_path):
  state = train_state()
  expected = bits(state)
  copy = jax.tree.map(lambda x: x + 0, state)  # fresh buffers that we then free, as donation would
  with Checkpointer(str(tmp_path), async_save=True) as ckpt:
    ckpt.save(7, copy, {"n": 1}, CONFIG, force=True)
    for leaf in jax.tree.leaves(copy):
      leaf.delete()
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 7
    assert bits(ckpt.restore(abstract(state)).state) == expected


def test_corrupt_latest_falls_back_with_warning(tmp_path, capsys):
  states = {step: train_state(step) for step in (1, 2, 3)}
  with Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, {"step": step}, f"step = {step}\n")
  damage(tmp_path, 3, "state")
  os.remove(glob.glob(os.path.join(tmp_path, "2", "data", "*"))[0])  # a missing file, not a short one
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  restored = ckpt.restore(abstract(states[1]))
  assert restored.step == 1 and restored.data_state == {"step": 1}
  assert bits(restored.state) == bits(states[1])
  warning = capsys.readouterr().err
  assert "step 3 (" in warning and "step 2 (" in warning and "using step 1 instead" in warning
  # An explicit step does not fall back.
  with pytest.raises(CheckpointError, match="step 3"):
    ckpt.restore(abstract(states[1]), step=3)
  # Resaving a step that exists (here the damaged one) replaces it.
  assert ckpt.save(3, states[3], {"step": 3}, "step = 3\n", force=True)
  assert bits(ckpt.restore(abstract(states[3])).state) == bits(states[3])
  ckpt.close()


def test_all_corrupt_is_a_clear_error(tmp_path):
  state = train_state(1)
  with Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(1, state, {}, CONFIG)
    ckpt.save(2, state, {}, CONFIG)
  damage(tmp_path, 1)
  damage(tmp_path, 2)
  with Checkpointer(str(tmp_path)) as ckpt, pytest.raises(CheckpointError) as error:
    ckpt.restore(abstract(state))
  message = str(error.value)
  assert "no readable checkpoint" in message and "step 2:" in message and "step 1:" in message
  with Checkpointer(str(tmp_path / "empty")) as ckpt, pytest.raises(CheckpointError, match="no checkpoints"):
    ckpt.restore(abstract(state))


def test_shape_mismatch_lists_every_path(tmp_path):
  state = train_state(1)
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(10, state, {}, CONFIG, force=True)
    other = jax.tree.map(lambda x: x, state)
    other["params"] = {"blocks": {"ffn": {"wi": jnp.zeros((2, 8, 32))}}, "head": jnp.zeros(4)}
    with pytest.raises(CheckpointMismatchError) as error:
      ckpt.restore(abstract({"step": state["step"], "params": other["params"],
                             "opt_state": state["opt_state"]}))
  message = str(error.value)
  assert "params/blocks/ffn/wi: saved (2, 8, 16), model expects (2, 8, 32)" in message
  assert "params/norm/scale: in the checkpoint only (saved (4,))" in message
  assert "params/head: expected by the model but not in the checkpoint" in message


def test_read_checkpoint_config_by_step_and_fallback(tmp_path, capsys):
  with Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {"x": jnp.zeros(2)}, {}, f"run.step = {step}\n")
  assert read_checkpoint_config(str(tmp_path), step=1) == "run.step = 1\n"
  assert read_checkpoint_config(str(tmp_path)) == "run.step = 2\n"
  damage(tmp_path, 2, "config")
  assert read_checkpoint_config(str(tmp_path)) == "run.step = 1\n"
  assert "step 2 (" in capsys.readouterr().err
  with pytest.raises(CheckpointError, match="no such checkpoint directory"):
    read_checkpoint_config(str(tmp_path / "missing"))


def test_save_killed_midway_leaves_previous_step_intact(tmp_path):
  """SIGKILL right after an async save starts: the unfinished step is a temporary directory that
  is never listed, the previous step restores, and the next save of that step succeeds."""
  script = textwrap.dedent(f"""
      import os, signal
      import jax.numpy as jnp
      from glam.train.checkpoint import Checkpointer
      ckpt = Checkpointer({str(tmp_path)!r}, save_interval_steps=1)
      ckpt.save(1, {{"w": jnp.arange(4.0)}}, {{"n": 1}}, "a = 1")
      ckpt.wait_until_finished()
      ckpt.save(2, {{"w": jnp.ones(4_000_000)}}, {{"n": 2}}, "a = 2")
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  # Step 2 is at most a temporary directory (none at all if the kill came before Orbax made one:
  # the timing depends on the machine's load), never a finished "2".
  leftovers = [d for d in os.listdir(tmp_path) if d.startswith("2")]
  assert all(".orbax-checkpoint-tmp" in d for d in leftovers), os.listdir(tmp_path)
  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    restored = ckpt.restore(target)
    assert restored.step == 1 and restored.data_state == {"n": 1}
    np.testing.assert_array_equal(restored.state["w"], np.arange(4.0))
    assert ckpt.save(2, {"w": jnp.full(4, 2.0)}, {"n": 2}, "a = 2", force=True)
    ckpt.wait_until_finished()
    assert ckpt.restore(target).state["w"].tolist() == [2.0] * 4
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_bad_settings_name_the_binding(tmp_path):
  with pytest.raises(ValueError, match=r"Checkpointer\.keep_last=0"):
    Checkpointer(str(tmp_path), keep_last=0)
  with pytest.raises(ValueError, match=r"Checkpointer\.save_interval_steps=0"):
    Checkpointer(str(tmp_path), save_interval_steps=0)
  with Checkpointer(str(tmp_path)) as ckpt, pytest.raises(TypeError, match="data_state"):
    ckpt.save(1, {"x": jnp.zeros(1)}, {"rng": object()}, CONFIG, force=True)
