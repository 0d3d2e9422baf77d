"""MoDE end to end: backbone run -> expert run (frozen backbone) -> `glam mode compose` -> gate run.

Also the bad inputs: an expert of another backbone, a target that holds a checkpoint, a backbone
given as an expert; none of them (nor a good compose) modifies a source checkpoint.
"""
import hashlib
import os

import jax
import numpy as np
import pytest
from flax import nnx

from glam import cli
from glam import config as glam_config
from glam.surgery.compose import EXPERTS_KEY, compose, flat, read_checkpoint
from glam.train.checkpoint import Checkpointer
from glam.train.loading import load_trained
from glam.train.trainer import train

TINY = [
    "DecoderLM.d_model = 32", "DecoderLM.num_blocks = 2", "DecoderLM.vocab_size = 260",
    "Attention.num_heads = 2", "Attention.head_dim = 16", "FeedForward.d_ff = 64",
    "train.batch_size = 4", "train.seq_len = 32", "train.log_every = 1", "train.num_eval_batches = 0",
    "train.measure_peak = False", "train.progress_bar = False", "train.num_steps = 2",
    "make_mesh.num_devices = 1", "Checkpointer.async_save = False",
]
MODE = ["MoDELM.boundaries = (1, 2)", "MoDELM.expert_depth = 1"]


def run_train(model_dir, gin_files, bindings=()):
  glam_config.parse(gin_files, TINY + list(bindings))
  return train(str(model_dir))


def tree_digest(folder) -> dict[str, str]:
  digests = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mode")
  backbone, expert = root / "backbone", root / "expert_arithmetic"
  run_train(backbone, ["configs/runs/pretrain.gin", "configs/models/dense_tiny.gin"],
            ['train.data = "synthetic:sentences"'])
  run_train(expert, ["configs/models/mode_tiny.gin", "configs/runs/mode_expert.gin"],
            MODE + ['train.data = "synthetic:arithmetic"', f'train.init_checkpoint = "{backbone}"'])
  # Another backbone: the same shapes, one array changed (written directly, no training needed).
  other = read_checkpoint(str(backbone), "--backbone")
  params = jax.tree.map(np.array, other.params)
  params["final_norm"]["scale"][0] += 1.0
  with Checkpointer(str(root / "other_backbone" / "checkpoints"), async_save=False) as checkpointer:
    checkpointer.save(2, {"step": np.int32(2), "params": params}, {}, other.config_text, force=True,
                      metadata=other.metadata)
  return root


def test_expert_run_keeps_the_backbone_bit_identical_and_trains_its_gate(runs):
  backbone = read_checkpoint(str(runs / "backbone"), "backbone").params
  expert = read_checkpoint(str(runs / "expert_arithmetic"), "expert").params
  for path, array in flat(backbone).items():
    np.testing.assert_array_equal(flat(expert)[path], array, err_msg=path)
  assert np.all(expert[EXPERTS_KEY]["gate"]["scale"] != 0)  # the zero-initialised gate has opened


def test_composed_model_equals_the_backbone_then_the_gate_run_trains_only_the_gate(runs):
  composed = runs / "composed"
  sources = {name: tree_digest(runs / name) for name in ("backbone", "expert_arithmetic")}
  summary = compose(str(runs / "backbone"), [str(runs / "expert_arithmetic")] * 2, str(composed))
  assert summary["num_domains"] == 2
  assert sources == {name: tree_digest(runs / name) for name in sources}
  assert not (runs / "backbone" / "composed").exists() and not (runs / "expert_arithmetic" / "composed").exists()

  expert = read_checkpoint(str(runs / "expert_arithmetic"), "expert").params[EXPERTS_KEY]
  params = read_checkpoint(str(composed), "composed").params
  np.testing.assert_array_equal(params[EXPERTS_KEY]["blocks"]["ffn_1"]["wo"],
                                np.concatenate([expert["blocks"]["ffn_1"]["wo"]] * 2))
  np.testing.assert_array_equal(params[EXPERTS_KEY]["gate"]["scale"], 0)  # --gate=backbone

  tokens = (np.arange(64).reshape(2, 32) * 5) % 259
  logits = {}
  for name in ("backbone", "composed"):
    model = load_trained(str(runs / name)).model
    graphdef, state = nnx.split(model)
    logits[name] = jax.jit(lambda s, graphdef=graphdef: nnx.merge(graphdef, s)(tokens).logits)(state)
  np.testing.assert_array_equal(logits["composed"], logits["backbone"])
  assert type(model).__name__ == "MoDELM" and model.num_domains == 2

  run_train(runs / "gate_run", ["configs/models/mode_tiny.gin", "configs/runs/mode_compose.gin"],
            MODE + ["MoDELM.num_domains = 2", f'train.init_checkpoint = "{composed}"'])
  trained = flat(read_checkpoint(str(runs / "gate_run"), "gate run").params)
  # The gate's scale opens first (its kernel and bias get gradients once it is non-zero).
  assert np.all(trained[f"{EXPERTS_KEY}/gate/scale"] != 0)
  for path, array in flat(params).items():
    if not path.startswith(f"{EXPERTS_KEY}/gate/"):
      np.testing.assert_array_equal(trained[path], array, err_msg=path)  # frozen: bit-identical


def test_bad_inputs_are_clear_errors_and_never_touch_the_sources(runs, capsys):
  backbone, expert = str(runs / "backbone"), str(runs / "expert_arithmetic")
  sources = {name: tree_digest(runs / name) for name in ("backbone", "expert_arithmetic", "other_backbone")}
  with pytest.raises(ValueError, match=rf"--experts: {expert} was trained against a different backbone than "
                                       rf"--backbone={runs / 'other_backbone'} \(backbone fingerprint [0-9a-f]{{16}}\)"
                                       r".*\n.*1 of \d+ arrays differ in value \(e.g. final_norm/scale\)"):
    compose(str(runs / "other_backbone"), [expert], str(runs / "bad1"))
  with pytest.raises(ValueError, match=r"--to=.*: already holds a checkpoint"):
    compose(backbone, [expert], expert)
  with pytest.raises(ValueError, match=r"has no 'domain_experts' parameters: not a MoDE expert run"):
    compose(backbone, [backbone], str(runs / "bad2"))
  with pytest.raises(ValueError, match=rf"--to={backbone}/composed: is \(inside\) the --backbone run"):
    compose(backbone, [expert], f"{backbone}/composed")
  with pytest.raises(ValueError, match=rf"--to={expert}/composed: is \(inside\) the --experts run"):
    compose(backbone, [expert], f"{expert}/composed")
  with pytest.raises(FileNotFoundError, match=r"--experts=.*missing"):
    compose(backbone, [str(runs / "missing")], str(runs / "bad3"))
  code = cli.main(["mode", "compose", f"--backbone={runs / 'other_backbone'}", f"--experts={expert}",
                   f"--to={runs / 'bad4'}"])
  assert code == 2 and "different backbone" in capsys.readouterr().err
  assert sources == {name: tree_digest(runs / name) for name in sources}
  assert not (runs / "backbone" / "composed").exists() and not (runs / "expert_arithmetic" / "composed").exists()
  assert not any((runs / f"bad{i}" / "checkpoints").exists() for i in range(1, 5))
