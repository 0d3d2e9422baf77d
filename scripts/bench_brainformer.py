"""Brainformer-tiny against GLaM-tiny at matched activated parameters on the synthetic corpus.

  .venv/bin/python scripts/bench_brainformer.py [--steps=200] [--batch_size=8] [--seq_len=128]

Trains each preset (configs/models/brainformer_tiny.gin, glam_tiny.gin) with the same run
settings and data, then prints a table: parameters (total / activated), median step time, the
train loss after equal steps (mean of the last 10 steps) and after equal wall time (the loss each
model had when the slower one's budget ran out: the smaller of the two total training times,
compilation excluded), and the held-out loss at the end. One JSON line follows.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glam import cli  # noqa: E402

MODELS = ("brainformer_tiny", "glam_tiny")


def summary(name):
  import contextlib
  import io
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    cli.main(["model", "summary", f"--gin_file=configs/models/{name}.gin"])
  return json.loads(out.getvalue().strip().splitlines()[-1])


def train(name, args, run_dir):
  shutil.rmtree(run_dir, ignore_errors=True)
  flags = [f"--gin.train.num_steps={args.steps}", f"--gin.train.batch_size={args.batch_size}",
           f"--gin.train.seq_len={args.seq_len}", "--gin.train.log_every=1", f"--gin.train.eval_every={args.steps}",
           "--gin.train.measure_peak=False", "--gin.train.progress_bar=False", "--gin.DecoderLM.vocab_size=260",
           "--gin.Checkpointer.save_interval_steps=100000"]
  code = cli.main(["train", "--gin_file=configs/runs/pretrain.gin", f"--gin_file=configs/models/{name}.gin",
                   *flags, f"--model_dir={run_dir}"])
  if code:
    raise SystemExit(f"training {name} failed with exit code {code}")
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  train_rows = sorted((r for r in rows if r.get("prefix") == "train"), key=lambda r: r["step"])
  eval_rows = [r for r in rows if r.get("prefix") == "eval"]
  seconds = np.array([args.batch_size * args.seq_len / r["tokens_per_s"] for r in train_rows])
  seconds[0] = np.median(seconds[1:])  # the first step includes compilation
  return {"loss": np.array([r["loss"] for r in train_rows]), "seconds": seconds,
          "eval_loss": eval_rows[-1]["loss"] if eval_rows else float("nan")}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--out_dir", default="/tmp/glam_bench_brainformer")
  args = parser.parse_args()
  results = {}
  for name in MODELS:
    run = train(name, args, os.path.join(args.out_dir, name))
    results[name] = {**summary(name), **run}
  budget = min(float(r["seconds"].sum()) for r in results.values())
  window = 10
  table = {}
  for name, r in results.items():
    within = int(np.searchsorted(np.cumsum(r["seconds"]), budget, side="right"))
    table[name] = {
        "total_params": r["total"], "activated_params": r["activated"],
        "train_flops_per_token": r["train_flops_per_token"],
        "step_ms": 1000 * float(np.median(r["seconds"])),
        "loss_equal_steps": float(np.mean(r["loss"][-window:])),
        "steps_in_budget": within,
        "loss_equal_time": float(np.mean(r["loss"][max(0, within - window):max(within, 1)])),
        "eval_loss": r["eval_loss"]}
  print(f"\nsteps {args.steps}, batch {args.batch_size} x {args.seq_len}, equal-time budget {budget:.1f} s")
  header = ("model", "total", "activated", "step ms", f"loss@{args.steps}", "steps@budget", "loss@budget", "eval")
  print("".join(f"{h:>14}" for h in header))
  for name, t in table.items():
    print(f"{name:>14}{t['total_params']:>14,}{t['activated_params']:>14,}{t['step_ms']:>14.1f}"
          f"{t['loss_equal_steps']:>14.4f}{t['steps_in_budget']:>14}{t['loss_equal_time']:>14.4f}{t['eval_loss']:>14.4f}")
  print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                    "budget_s": budget, "table": table}))


if __name__ == "__main__":
  main()
