"""train.init_checkpoint: exactly the checkpoint's parameters, fresh step and optimizer, clear
errors for vocabulary / shape / missing / extra parameters, and init_allow_missing."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam.config import ConfigError
from glam.train.checkpoint import Checkpointer, CheckpointMismatchError
from glam.train.init_checkpoint import init_from_checkpoint, load_params, resolve
from glam.train.optimizers import adafactor, make_optimizer

VOCAB = "byte-v1"


def params_like(seed, extra=None, wi_shape=(2, 8, 16)):
  key = jax.random.key(seed)
  params = {"blocks": {"ffn": {"wi": jax.random.normal(key, wi_shape)}},
            "embed": {"embedding": jax.random.normal(jax.random.fold_in(key, 1), (12, 8))}}
  params.update(extra or {})
  return params


def optimizer():
  return make_optimizer(optimizer=lambda: adafactor(learning_rate=0.1, min_dim_size_to_factor=4))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run directory with checkpoints at steps 3 and 7 (step 7 holds `params_like(7)` after two
  real updates, so its optimizer state is not fresh)."""
  root = tmp_path_factory.mktemp("pretrained")
  tx = optimizer()
  with Checkpointer(str(root / "checkpoints"), async_save=False) as ckpt:
    for step in (3, 7):
      params = params_like(step)
      opt_state = tx.init(params)
      for _ in range(2):
        updates, opt_state = tx.update(jax.tree.map(jnp.sin, params), opt_state, params)
      ckpt.save(step, {"step": jnp.int32(step), "params": params, "opt_state": opt_state}, {}, "",
                force=True, metadata={"vocab": VOCAB, "vocab_size": 259})
  return str(root)


def assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loads_exactly_the_checkpoint_params_with_fresh_step_and_optimizer(run_dir):
  tx = optimizer()
  fresh = params_like(100)
  state = {"step": np.int32(0), "params": fresh, "opt_state": tx.init(fresh)}
  new = init_from_checkpoint(state, run_dir, VOCAB, tx)
  assert_tree_equal(new["params"], params_like(7))  # the latest step's parameters, bit for bit
  assert int(new["step"]) == 0
  assert_tree_equal(new["opt_state"], tx.init(params_like(7)))  # fresh statistics, not the saved ones


@pytest.mark.parametrize("spelling, step", [("", 7), ("checkpoints", 7), ("checkpoints/3", 3)])
def test_run_dir_checkpoint_dir_or_step_dir(run_dir, spelling, step):
  path = os.path.join(run_dir, spelling)
  assert resolve(path)[1] == (None if step == 7 else 3)
  params, loaded_step, missing = load_params(path, params_like(100), VOCAB)
  assert (loaded_step, missing) == (step, [])
  assert_tree_equal(params, params_like(step))


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"train.init_checkpoint=.*: not a run directory"):
    load_params(str(tmp_path), params_like(0), VOCAB)


def test_vocabulary_mismatch(run_dir):
  with pytest.raises(CheckpointMismatchError, match=r"trained with vocabulary byte-v1, this run uses spm-1234"):
    load_params(run_dir, params_like(0), "spm-1234")


def test_shape_mismatch_and_extra_parameters_list_each_path(run_dir):
  with pytest.raises(CheckpointMismatchError) as error:
    load_params(run_dir, {"blocks": {"ffn": {"wi": jnp.zeros((2, 8, 32))}}}, VOCAB)
  message = str(error.value)
  assert "blocks/ffn/wi: saved (2, 8, 16), model expects (2, 8, 32)" in message
  assert "embed/embedding: in the checkpoint only (saved (12, 8))" in message


def test_missing_parameters_are_errors_unless_allowed(run_dir):
  extra = {"domain_experts": {"wi": jnp.full((3, 4), 5.0), "gate": jnp.ones((4,))}}
  with pytest.raises(CheckpointMismatchError) as error:
    load_params(run_dir, params_like(100, extra), VOCAB, allow_missing=["domain_experts/wi"])
  message = str(error.value)
  assert "domain_experts/gate: expected by the model but not in the checkpoint" in message
  assert "domain_experts/wi" not in message  # allowed
  params, _, missing = load_params(run_dir, params_like(100, extra), VOCAB, allow_missing=["domain_experts/.*"])
  assert sorted(missing) == ["domain_experts/gate", "domain_experts/wi"]
  assert_tree_equal(params, params_like(7, extra))  # loaded where saved, fresh init kept elsewhere
  with pytest.raises(CheckpointMismatchError, match="domain_experts/gate"):  # fullmatch: "gate" alone is no match
    load_params(run_dir, params_like(100, extra), VOCAB, allow_missing=["gate", "domain_experts/wi"])
  with pytest.raises(ConfigError, match=r"train.init_allow_missing=.*not a valid regex"):
    load_params(run_dir, params_like(100, extra), VOCAB, allow_missing=["(unclosed"])
