"""A Lifelong-MoE stage end to end through `glam`: grow a checkpoint, train it with
configs/runs/lifelong_stage.gin on new data, on a data 2 x expert 4 mesh (the student's 8 experts and
the teacher's 4 split over the expert axis); old experts and old router columns come out
bit-identical, new experts and shared layers train, and the distillation KL is logged."""
import json
import os

import numpy as np
import pytest

from glam import cli
from glam.surgery import runs
from glam.surgery.grow import grow
from glam.train.distill import kl_divergence
from test_surgery_grow import TINY_MOE, write_source

STAGE_FLAGS = ["--gin.train.batch_size=8", "--gin.train.seq_len=32", "--gin.train.log_every=1",
               "--gin.train.num_eval_batches=0", "--gin.train.measure_peak=False", "--gin.train.progress_bar=False",
               "--gin.train.data='synthetic:reverse'"]


def test_kl_divergence_matches_a_direct_computation():
  rng = np.random.default_rng(0)
  teacher, student = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  p = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
  q = np.exp(student) / np.exp(student).sum(-1, keepdims=True)
  np.testing.assert_allclose(kl_divergence(teacher, student), np.sum(p * np.log(p / q), -1), rtol=1e-5)
  np.testing.assert_allclose(kl_divergence(teacher, teacher), 0.0, atol=1e-6)


def test_lifelong_stage_freezes_old_experts_and_distils(tmp_path):
  stage1 = write_source(tmp_path / "stage1", TINY_MOE, step=3)
  stage2 = str(tmp_path / "stage2")
  grow(stage1, stage2, add=4, init="noisy_copy", reset_data=True)  # 8 experts: the expert axis 4 divides
  before = runs.flat(runs.read_run(stage2).state["params"])
  code = cli.main(["train", "--gin_file=configs/runs/pretrain.gin", f"--gin_file={stage2}/config.gin",
                   "--gin_file=configs/runs/lifelong_stage.gin", "--gin_file=configs/mesh/dp2_ep4.gin",
                   "--gin.OLD_EXPERTS=4",
                   f"--gin.PREVIOUS_STAGE='{stage1}'", "--gin.train.num_steps=6", *STAGE_FLAGS,
                   f"--model_dir={stage2}"])
  assert code == 0
  after_run = runs.read_run(stage2)
  assert after_run.step == 6
  after = runs.flat(after_run.state["params"])
  for name, axis in (("experts/wi", 1), ("experts/wo", 1), ("router/kernel", 2)):
    path = f"blocks/moe_1/{name}"
    old = np.arange(4)
    np.testing.assert_array_equal(np.take(after[path], old, axis=axis), np.take(before[path], old, axis=axis))
    new = np.arange(4, 8)
    assert not np.array_equal(np.take(after[path], new, axis=axis), np.take(before[path], new, axis=axis))
  assert not np.array_equal(after["blocks/attn_0/query"], before["blocks/attn_0/query"])  # shared layers train
  with open(os.path.join(stage2, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  kls = [row["distill_kl"] for row in logged if "distill_kl" in row]
  assert [row["step"] for row in logged if "distill_kl" in row] == [4, 5, 6]  # counts on from the grown step
  assert kls and all(np.isfinite(kls)) and min(kls) > 0


def test_domains_spec_names_several_files_as_domains(tmp_path):
  from glam.data.sources import source_from_spec
  (tmp_path / "a.txt").write_text("alpha one\nalpha two\n")
  (tmp_path / "b.jsonl").write_text('{"text": "beta"}\n')
  source = source_from_spec(f"domains:play={tmp_path}/a.txt, web={tmp_path}/b.jsonl")
  assert source.domain_names == ("play", "web") and source.num_documents == 3
  assert [(source.document(i).text, source.document(i).domain) for i in range(3)] == [
      ("alpha one", "play"), ("alpha two", "play"), ("beta", "web")]
  with pytest.raises(ValueError, match="is not NAME=GLOB"):
    source_from_spec(f"domains:{tmp_path}/a.txt")


def test_stage_without_previous_stage_is_an_error_naming_the_bindings(tmp_path, capsys):
  """lifelong_stage.gin distils by default: leaving PREVIOUS_STAGE unset must not silently turn it off."""
  base = ["train", "--gin_file=configs/runs/pretrain.gin", "--gin_file=configs/models/glam_tiny.gin",
          "--gin_file=configs/runs/lifelong_stage.gin", *STAGE_FLAGS, f"--model_dir={tmp_path / 'run'}"]
  assert cli.main(base) == 2
  message = capsys.readouterr().err
  assert "train.distill_weight=1.0 but train.distill_from is unset" in message
  assert "--gin.PREVIOUS_STAGE=" in message and "--gin.train.distill_weight=0" in message
  assert not (tmp_path / "run").exists()  # refused before anything was written
  assert cli.main(base + [f"--gin.PREVIOUS_STAGE='{tmp_path}'", "--gin.train.distill_weight=0"]) == 2
  assert "train.distill_weight=0: set the weight lambda > 0" in capsys.readouterr().err
  assert cli.main(base + ["--gin.train.distill_weight=-0.5"]) == 2
  assert "train.distill_weight=-0.5: must be >= 0" in capsys.readouterr().err


def test_teacher_is_sharded_like_the_student_or_whole_when_its_experts_do_not_divide():
  import jax
  from glam import config
  from glam.models.lm import DecoderLM
  from glam.parallel.mesh import make_mesh
  from glam.train.distill import place_teacher
  from glam.train.trainer import build_model
  config.parse(["configs/models/glam_tiny.gin"], TINY_MOE)  # 4 experts
  graphdef, params = build_model(DecoderLM, 0)
  host = jax.device_get(params)
  for mesh_file, expert_rows in (("dp2_ep4", 1), ("ep8", 4)):  # 4 experts over 4 devices; 4 do not divide 8
    config.parse(["configs/models/glam_tiny.gin", f"configs/mesh/{mesh_file}.gin"], TINY_MOE)
    placed = place_teacher(graphdef, host, make_mesh())
    wi = placed["blocks"]["moe_1"]["experts"]["wi"]  # [layers, experts, d_model, d_ff]
    assert len(wi.sharding.device_set) == 8
    assert {shard.data.shape[1] for shard in wi.addressable_shards} == {expert_rows}
    for got, want in zip(jax.tree.leaves(jax.device_get(placed)), jax.tree.leaves(host)):
      np.testing.assert_array_equal(got, want)
