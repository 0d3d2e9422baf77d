"""`glam experts upcycle`: experts start as copies of the dense FFN at their position, and with
renormalised top-2 routing (no token dropped) the MoE model reproduces the dense logits."""
import jax
import numpy as np
import pytest

from glam.surgery import runs
from glam.surgery.upcycle import upcycle
from glam.train.loading import load_trained
from test_surgery_grow import write_source

SIZES = ["DecoderLM.d_model=32", "DecoderLM.vocab_size=260", "Attention.num_heads=2", "Attention.head_dim=16",
         "FeedForward.d_ff=32", "FeedForward.activation='geglu'"]
# The MoE model: 2 blocks of (attn, moe, attn, ffn) = the dense 4 x (attn, ffn); experts as the dense FFN.
MOE = ["DecoderLM.num_blocks=2", "MoeLayer.num_experts=4", "MoeLayer.d_ff=32", "MoeLayer.activation='geglu'",
       "CapacityEinsum.eval_capacity_factor=2.0"]  # >= experts / k: no token dropped in evaluation


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  return write_source(tmp_path_factory.mktemp("dense") / "run", SIZES + ["DecoderLM.num_blocks=4"],
                      gin_file="configs/models/dense_tiny.gin")


def test_upcycled_model_reproduces_the_dense_logits(dense_run, tmp_path):
  result = upcycle(dense_run, str(tmp_path / "moe"), ["configs/models/glam_tiny.gin"], bindings=SIZES + MOE)
  assert result["moe_sublayers"] == ["moe_1"]
  tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 259)
  dense = load_trained(dense_run)
  moe = load_trained(str(tmp_path / "moe"))
  assert moe.step == 0 and moe.model.blocks.moe_1.num_experts == 4
  np.testing.assert_allclose(np.asarray(moe.model(tokens).logits), np.asarray(dense.model(tokens).logits),
                             rtol=1e-5, atol=1e-5)
  # Layer 2 of the dense model (block 1, ffn_1) became block 1's MoE: each expert a copy.
  dense_p, moe_p = runs.flat(runs.read_run(dense_run).state["params"]), runs.flat(
      runs.read_run(str(tmp_path / "moe")).state["params"])
  for expert in range(4):
    np.testing.assert_array_equal(moe_p["blocks/moe_1/experts/wi"][1, expert], dense_p["blocks/ffn_1/wi"][2])
  np.testing.assert_array_equal(moe_p["blocks/attn_2/query"][0], dense_p["blocks/attn_0/query"][1])


def test_mismatched_activation_or_layout_is_refused(dense_run, tmp_path):
  with pytest.raises(ValueError, match="MoeLayer.activation='gelu'"):
    upcycle(dense_run, str(tmp_path / "a"), ["configs/models/glam_tiny.gin"],
            bindings=SIZES + MOE + ["MoeLayer.activation='gelu'"])
  with pytest.raises(ValueError, match="sub-layers"):
    upcycle(dense_run, str(tmp_path / "b"), ["configs/models/glam_tiny.gin"],
            bindings=SIZES + MOE + ["DecoderLM.num_blocks=3"])


def test_bad_targets_and_expert_counts_are_refused_and_the_source_is_untouched(dense_run, tmp_path, capsys):
  from glam import cli
  from test_surgery_grow import digest
  before = digest(dense_run)
  (tmp_path / "held" / "checkpoints" / "7").mkdir(parents=True)  # another run's checkpoint
  with pytest.raises(ValueError, match=rf"--to={tmp_path / 'held'}: already holds checkpoints \(steps \[7\]"):
    upcycle(dense_run, str(tmp_path / "held"), ["configs/models/glam_tiny.gin"], bindings=SIZES + MOE)
  with pytest.raises(ValueError, match=rf"is inside the source directory {dense_run}"):
    upcycle(dense_run, f"{dense_run}/moe", ["configs/models/glam_tiny.gin"], bindings=SIZES + MOE)
  with pytest.raises(ValueError, match=r"num_experts \{'blocks/moe_1': 4\} is not divisible by the mesh's expert "
                                       r"axis of size 8"):
    upcycle(dense_run, str(tmp_path / "a"), ["configs/models/glam_tiny.gin"],
            bindings=SIZES + MOE + ["mesh_shape.expert=8"])
  with pytest.raises(ValueError, match=r"--gin_file=configs/models/dense_tiny.gin has no MoE sub-layers"):
    upcycle(dense_run, str(tmp_path / "b"), ["configs/models/dense_tiny.gin"], bindings=SIZES)
  code = cli.main(["experts", "upcycle", f"--from={dense_run}", f"--to={tmp_path / 'c'}",
                   "--gin_file=configs/models/glam_tiny.gin", *[f"--gin.{b}" for b in SIZES + MOE],
                   "--gin.mesh_shape.expert=8"])
  assert code == 2 and "is not divisible by the mesh's expert axis of size 8" in capsys.readouterr().err
  assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))
  assert digest(dense_run) == before
