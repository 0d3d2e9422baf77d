"""Helpers to drive the `glam` command from tests: in-process for speed, or as a subprocess."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A very small model and run: fast to compile on 2 cores, still a real transformer.
TINY_RUN = [
    "--gin_file=configs/runs/pretrain.gin",
    "--gin_file=configs/models/dense_tiny.gin",
    "--gin.DecoderLM.d_model=32", "--gin.DecoderLM.num_blocks=2", "--gin.DecoderLM.vocab_size=260",
    "--gin.Attention.num_heads=2", "--gin.Attention.head_dim=16", "--gin.FeedForward.d_ff=64",
    "--gin.train.batch_size=4", "--gin.train.seq_len=32", "--gin.train.log_every=1",
    "--gin.train.eval_every=1000", "--gin.train.num_eval_batches=1",
    "--gin.train.measure_peak=False", "--gin.train.progress_bar=False",
]


def glam(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
  """Runs `python -m glam ARGS` in the repo with 1 CPU device, returns the completed process."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, "-m", "glam", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, **kwargs)
  if check and proc.returncode != 0:
    pytest.fail(f"glam {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc


def popen_glam(*args) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", "glam", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_script(path: str, *args) -> subprocess.CompletedProcess:
  """Runs `python scripts/NAME ARGS` in the repo with 1 CPU device; fails the test if it exits non-zero."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, path, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  if proc.returncode != 0:
    pytest.fail(f"{path} {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc
