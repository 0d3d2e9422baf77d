"""End to end through the `glam` command: train, resume, SIGKILL / SIGTERM mid-run."""
import json
import os
import signal
import time

from cli_helpers import TINY_RUN, glam, popen_glam
from glam.train.loading import load_trained
from glam.train.metrics import read_metrics

STEPS = 120
RUN = TINY_RUN + [f"--gin.train.num_steps={STEPS}", "--gin.Checkpointer.save_interval_steps=10"]
UNROLLED_RUN = RUN + ["--gin.DecoderLM.scan_layers=False"]


def losses(model_dir):
  return {step: row["loss"] for step, row in read_metrics(model_dir).items() if "loss" in row}


def wait_for_step(model_dir, step, proc, timeout=300):
  deadline = time.time() + timeout
  path = os.path.join(model_dir, "metrics.jsonl")
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended before step {step}: {proc.stderr.read()}")
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(line).get("step", 0) for line in f if line.strip().endswith("}")]
      if steps and max(steps) >= step:
        return
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_then_rerun_gives_bit_identical_losses(tmp_path):
  """With unrolled blocks, whose train state the trainer holds per layer and checkpoints stacked
  (glam/train/layer_layout.py): the resumed run splits the checkpoint again. Scanned blocks, the
  default, resume in test_rerun_resumes_and_extends and tests/test_parallel_training.py."""
  reference = str(tmp_path / "reference")
  glam("train", *UNROLLED_RUN, f"--model_dir={reference}")
  expected = losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))

  interrupted = str(tmp_path / "interrupted")
  proc = popen_glam("train", *UNROLLED_RUN, f"--model_dir={interrupted}")
  wait_for_step(interrupted, 45, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(losses(interrupted))
  assert killed_at < STEPS, "the run finished before it could be killed"
  resumed = glam("train", *UNROLLED_RUN, f"--model_dir={interrupted}")
  assert "resumed from" in resumed.stderr
  got = losses(interrupted)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert got == expected  # exact float equality, every step, before and after the kill
  # the checkpoint is stacked, as a scanned model's: one loads it
  loaded = load_trained(interrupted, bindings=["DecoderLM.scan_layers = True"])
  assert loaded.model.scan_layers and loaded.step == STEPS
  assert loaded.model.blocks.ffn_1.wi[...].shape[0] == 2  # [blocks, d_model, d_ff]


def test_rerun_resumes_and_extends(tmp_path):
  model_dir = str(tmp_path / "run")
  glam("train", *TINY_RUN, "--gin.train.num_steps=4", f"--model_dir={model_dir}")
  again = glam("train", *TINY_RUN, "--gin.train.num_steps=4", f"--model_dir={model_dir}")
  assert "resumed from" in again.stderr and json.loads(again.stdout.strip().splitlines()[-1])["step"] == 4
  glam("train", *TINY_RUN, "--gin.train.num_steps=6", f"--model_dir={model_dir}")
  assert sorted(losses(model_dir)) == [1, 2, 3, 4, 5, 6]
  assert os.path.exists(os.path.join(model_dir, "config.gin"))
  with open(os.path.join(model_dir, "config.gin")) as f:
    assert "DecoderLM.d_model = 32" in f.read()


def test_sigterm_checkpoints_before_exit(tmp_path):
  model_dir = str(tmp_path / "run")
  proc = popen_glam("train", *RUN, "--gin.Checkpointer.save_interval_steps=1000", f"--model_dir={model_dir}")
  wait_for_step(model_dir, 15, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr
  stopped_at = max(losses(model_dir))
  steps = sorted(int(d) for d in os.listdir(os.path.join(model_dir, "checkpoints")) if d.isdigit())
  assert steps == [stopped_at]  # saved exactly where it stopped, though no save was due
  assert "stopped by signal" in stderr
