"""`glam experts grow`: every expert-axis array grows consistently, preserve keeps the outputs,
bad input gets a clear error, and the source checkpoint is never modified."""
import hashlib
import os

import gin
import jax
import numpy as np
import pytest

from glam import cli, config
from glam.surgery import runs
from glam.surgery.grow import grow, grown_config
from glam.train.loading import load_trained

TINY_MOE = ["DecoderLM.d_model=32", "DecoderLM.num_blocks=1", "DecoderLM.vocab_size=260", "Attention.num_heads=2",
            "Attention.head_dim=16", "FeedForward.d_ff=32", "MoeLayer.d_ff=32", "MoeLayer.num_experts=4"]


def write_source(directory, bindings, gin_file="configs/models/glam_tiny.gin", step=3):
  """A checkpoint without training: fresh params, an optimizer state filled with random numbers
  (so that copied statistics are recognisable)."""
  config.parse([gin_file], bindings)
  state, _ = runs.fresh_state()
  rng = np.random.default_rng(0)
  state["opt_state"] = jax.tree.map(lambda x: rng.random(np.shape(x)).astype(np.asarray(x).dtype)
                                    if np.issubdtype(np.asarray(x).dtype, np.floating) else x, state["opt_state"])
  state["step"] = np.int32(step)
  runs.write_run(str(directory), step, state, {"process_0": {"anything": 1}}, gin.config_str(), {"vocab": "byte-v1"})
  gin.clear_config()
  return str(directory)


def digest(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  base = tmp_path_factory.mktemp("grow")
  return {"tc": write_source(base / "tc", TINY_MOE),
          "ec": write_source(base / "ec", TINY_MOE + ["MoeLayer.router=@ExpertChoiceRouter"]),
          "dense": write_source(base / "dense", TINY_MOE, gin_file="configs/models/dense_tiny.gin")}


def logits(run_dir, tokens):
  return np.asarray(load_trained(run_dir).model(tokens).logits)


TOKENS = jax.random.randint(jax.random.key(1), (2, 24), 0, 259)


@pytest.mark.parametrize("router", ["tc", "ec"])
def test_preserve_gives_identical_logits_and_random_does_not(sources, tmp_path, router):
  before = logits(sources[router], TOKENS)
  grow(sources[router], str(tmp_path / "preserve"), add=2, init="preserve")
  grow(sources[router], str(tmp_path / "random"), add=2, init="random")
  preserved = load_trained(str(tmp_path / "preserve"))
  assert preserved.model.blocks.moe_1.num_experts == 6
  np.testing.assert_array_equal(np.asarray(preserved.model(TOKENS).logits), before)
  assert np.max(np.abs(logits(str(tmp_path / "random"), TOKENS) - before)) > 1e-4


def test_copy_extends_weights_router_and_optimizer_state_consistently(sources, tmp_path):
  result = grow(sources["tc"], str(tmp_path / "grown"), add=3, init="copy")
  assert result["experts"] == [4, 7] and result["step"] == 3
  old = runs.read_run(sources["tc"])
  new = runs.read_run(str(tmp_path / "grown"))
  assert new.step == 3 and new.data_state == old.data_state and new.metadata["grown_experts"] == [4, 7]
  assert "MoeLayer.num_experts = 7" in new.config_text
  source_index = np.arange(3) % 4
  old_p, new_p = runs.flat(old.state["params"]), runs.flat(new.state["params"])
  for name, axis in (("experts/wi", 1), ("experts/wo", 1), ("router/kernel", 2)):
    path = f"blocks/moe_1/{name}"
    np.testing.assert_array_equal(np.take(new_p[path], np.arange(4), axis=axis), old_p[path])
    np.testing.assert_array_equal(np.take(new_p[path], np.arange(4, 7), axis=axis),
                                  np.take(old_p[path], source_index, axis=axis))
  for path in old_p:
    if "moe_1/experts" not in path and "moe_1/router" not in path:
      np.testing.assert_array_equal(new_p[path], old_p[path])
  old_o, new_o = runs.flat(old.state["opt_state"]), runs.flat(new.state["opt_state"])
  grown = [p for p in new_o if np.shape(new_o[p]) != np.shape(old_o[p])]
  assert grown, "some optimizer statistics have an expert axis"
  for path in grown:
    axis = [i for i, (a, b) in enumerate(zip(np.shape(old_o[path]), np.shape(new_o[path]))) if a != b][0]
    np.testing.assert_array_equal(np.take(new_o[path], np.arange(4, 7), axis=axis),
                                  np.take(old_o[path], source_index, axis=axis))


def test_noisy_copy_differs_from_its_source_expert_by_small_noise(sources, tmp_path):
  grow(sources["tc"], str(tmp_path / "noisy"), add=1, init="noisy_copy", noise=0.01)
  wi = runs.flat(runs.read_run(str(tmp_path / "noisy")).state["params"])["blocks/moe_1/experts/wi"]
  difference = wi[:, 4] - wi[:, 0]
  assert 0 < np.std(difference) < 0.05 * np.std(wi[:, 0])


def test_bad_input_is_refused_and_the_source_is_untouched(sources, tmp_path, capsys):
  before = {name: digest(path) for name, path in sources.items()}
  with pytest.raises(ValueError, match=rf"--from={sources['dense']}: the model has no MoE layers"):
    grow(sources["dense"], str(tmp_path / "a"), add=2)
  with pytest.raises(ValueError, match=r"--add=1: 4\+1=5 experts is not divisible by the mesh's expert axis of size 4"):
    grow(sources["tc"], str(tmp_path / "b"), add=1, bindings=["mesh_shape.expert=4"])
  grow(sources["tc"], str(tmp_path / "c"), add=4, bindings=["mesh_shape.expert=4"])  # 8 experts: fine
  written = digest(tmp_path / "c")
  with pytest.raises(ValueError, match=rf"--to={tmp_path / 'c'}: already holds checkpoints \(steps \[3\]"):
    grow(sources["tc"], str(tmp_path / "c"), add=2)
  with pytest.raises(ValueError, match=r"already holds checkpoints \(steps \[3\]"):  # its checkpoints folder
    grow(sources["tc"], str(tmp_path / "c" / "checkpoints"), add=2)
  assert digest(tmp_path / "c") == written  # the refused target is not touched either
  with pytest.raises(ValueError, match="is the source directory"):
    grow(sources["tc"], sources["tc"], add=2)
  with pytest.raises(ValueError, match=rf"is inside the source directory {sources['tc']}"):
    grow(sources["tc"], os.path.join(sources["tc"], "grown"), add=2)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"--to=.*file: exists and is not a directory"):
    grow(sources["tc"], str(tmp_path / "file"), add=2)
  code = cli.main(["experts", "grow", f"--from={sources['dense']}", f"--to={tmp_path / 'd'}", "--add=2"])
  assert code == 2 and f"--from={sources['dense']}: the model has no MoE layers" in capsys.readouterr().err
  code = cli.main(["experts", "grow", f"--from={sources['tc']}", f"--to={tmp_path / 'e'}", "--add=2",
                   "--gin.mesh_shape.expert=4"])
  assert code == 2 and "4+2=6 experts is not divisible by the mesh's expert axis of size 4" in capsys.readouterr().err
  assert not any((tmp_path / name).exists() for name in ("a", "b", "d", "e"))
  assert {name: digest(path) for name, path in sources.items()} == before


def test_preserve_scales_the_expert_choice_cap_with_the_capacity_factor():
  text = ("MoeLayer.router = @ExpertChoiceRouter()\nExpertChoiceRouter.capacity_factor = 2.0\n"
          "ExpertChoiceRouter.max_experts_per_token = 3\n")
  grown = grown_config(text, old=4, new=6, preserve=True)
  assert "ExpertChoiceRouter.capacity_factor = 3.0" in grown
  assert "ExpertChoiceRouter.max_experts_per_token = 5" in grown  # ceil(3 x 6 / 4): still >= the factor
  assert "max_experts_per_token = 3" in grown_config(text, old=4, new=6, preserve=False)
