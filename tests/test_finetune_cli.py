"""End to end through the `glam` command: a tiny pretraining run, then FLAN-style instruction
tuning from its checkpoint (finetune.gin + flan.gin + --gin.init_checkpoint), resumed after a
stop, and a mismatched model refused with the differing parameters."""
import json
import os

from cli_helpers import TINY_RUN, glam
from glam import cli

FLAN_RUN = [arg.replace("configs/runs/pretrain.gin", "configs/runs/flan.gin") for arg in TINY_RUN]


def metric_lines(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_pretrain_then_instruction_tune_from_its_checkpoint(tmp_path, capsys):
  pretrained, tuned = str(tmp_path / "pretrained"), str(tmp_path / "flan")
  glam("train", *TINY_RUN, "--gin.train.num_steps=1", f"--model_dir={pretrained}")
  init = f"--gin.init_checkpoint='{pretrained}'"

  first = glam("train", "--gin_file=configs/runs/finetune.gin", *FLAN_RUN, init, "--gin.train.num_steps=2",
               "--gin.train.stop_after=1", f"--model_dir={tuned}")
  assert "initialised from" in first.stderr and "(step 1); fresh optimizer, step 0" in first.stderr
  assert os.path.isdir(os.path.join(tuned, "checkpoints", "1"))
  assert "init_checkpoint" in open(os.path.join(tuned, "config.gin")).read()
  train = [m for m in metric_lines(tuned) if m.get("prefix") == "train"]
  assert [m["step"] for m in train] == [1]  # the step counter started again at 0

  # Run again: it resumes from its own checkpoint; init_checkpoint is not read again.
  second = glam("train", "--gin_file=configs/runs/finetune.gin", *FLAN_RUN, init, "--gin.train.num_steps=2",
                f"--model_dir={tuned}")
  assert "resumed from" in second.stderr and "initialised from" not in second.stderr
  evals = [m for m in metric_lines(tuned) if m.get("prefix") == "eval"]
  assert evals and {"loss/arithmetic", "loss/copy"} & set(evals[-1])  # held-out mixture, per task

  # In-process (it fails before compiling anything): the same command line, no interpreter start-up.
  code = cli.main(["train", *FLAN_RUN, init, "--gin.DecoderLM.d_model=48", "--gin.train.num_steps=1",
                   f"--model_dir={tmp_path / 'wrong'}"])
  stderr = capsys.readouterr().err
  assert code == 2
  assert "does not fit the model" in stderr and "embed/embedding: saved (260, 32), model expects (260, 48)" in stderr
