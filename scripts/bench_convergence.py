"""Router convergence at equal activated compute: Switch top-1, GShard top-2, expert choice, dense.

  python scripts/bench_convergence.py [--out_dir runs/convergence] [--models switch,gshard,ec,dense]
      [--report OUT_DIR/convergence.md] [--plot OUT_DIR/convergence.png]
      [--targets 1.6,1.5] [--gin.NAME=VALUE ...]

docs/results/convergence.md was made with --report=docs/results/convergence.md
--plot=docs/results/convergence.png (the markdown's prose outside the generated markers is kept).

Trains each model in this process with `glam.train.trainer.train` (the same seed, data, batch,
steps and optimizer: configs/bench/convergence_run.gin plus one configs/bench/convergence_<model>.gin),
reads the curves back from each run's metrics.jsonl, and writes a markdown table (steps to reach
given held-out losses, loss at equal steps, loss at equal wall time, tokens/s) and a PNG (held-out
loss against steps and against wall time). `--gin.NAME=VALUE` bindings apply to every model.
A run directory that already holds a finished run of the same length is reused, not retrained.

Equal activated compute. With expert hidden width F (256 here), every model spends the same
matmul work per token in its MoE positions, 4 d F multiply-adds:
  * GShard top-2 and expert choice (c = 2): two experts of hidden F per token (EC: on average);
  * Switch top-1: one expert of hidden 2F;
  * dense: a plain-GELU FFN of hidden 2F (the experts' activation) where the others have MoE;
the other layers (attention, GeGLU FFNs, embeddings) are identical. `flops_per_token` (training
FLOPs per token, glam/models/summary.py) agrees within 0.2% (the routers' d x E matrices).
What this does not equalise: token-choice capacity (factor 1.25 x k x tokens / experts slots per
expert) pads the expert batch to 1.25x of the activated work, expert choice computes exactly n c
slots, and routing itself (dispatch/combine einsums, top-k) costs time the FLOP count ignores;
the wall-time columns show the sum of all of it.

Wall time is training time: each log interval's duration from the trainer's tokens/s, with the
first interval (it holds compilation) and the intervals after an evaluation (they hold it)
replaced by the run's median per-step time. The whole run's wall time (compilation, evaluation
and the final checkpoint included) is reported beside it.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_GIN = "configs/bench/convergence_run.gin"
# name -> (label in tables and plots, model gin file)
MODELS = {
    "switch": ("Switch top-1 (E=8, 2F)", "configs/bench/convergence_switch.gin"),
    "gshard": ("GShard top-2 (E=8, F)", "configs/bench/convergence_gshard.gin"),
    "ec": ("Expert choice c=2 (E=8, F)", "configs/bench/convergence_ec.gin"),
    "dense": ("Dense (2F)", "configs/bench/convergence_dense.gin"),
}
REFERENCE = "gshard"  # ratios are against top-2, the Expert Choice paper's baseline
RESULT_FILE = "bench.json"  # per run directory: what the script measured around train()


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out_dir", default="runs/convergence", help="one run directory per model under it")
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
  parser.add_argument("--report", default=None, help="markdown to write (default: OUT_DIR/convergence.md)")
  parser.add_argument("--plot", default=None, help="PNG to write (default: OUT_DIR/convergence.png)")
  parser.add_argument("--targets", default=None,
                      help="held-out losses for the steps-to-reach table (default: from the first "
                           "evaluation down to the final losses, see default_targets)")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for arg in rest:
    if not arg.startswith("--gin.") or "=" not in arg:
      parser.error(f"unrecognised argument {arg!r} (expected --gin.NAME=VALUE)")
    bindings.append(arg[len("--gin."):])
  args.report = args.report or os.path.join(args.out_dir, "convergence.md")
  args.plot = args.plot or os.path.join(args.out_dir, "convergence.png")
  args.models = [m for m in args.models.split(",") if m]
  for name in args.models:
    if name not in MODELS:
      parser.error(f"--models: unknown model {name!r}; known: {sorted(MODELS)}")
  if len(args.models) < 2:
    parser.error("--models: name at least two models to compare")
  if args.targets is not None:
    try:
      args.targets = [float(t) for t in args.targets.split(",") if t]
    except ValueError:
      parser.error(f"--targets={args.targets!r}: expected comma-separated numbers such as 1.6,1.5")
  return args, bindings


# ----------------------------------------------------------------------------- running

def run_model(name: str, run_dir: str, bindings: list[str]) -> dict:
  """Trains one model in `run_dir` (or reuses a finished run there); returns its bench.json."""
  import gin
  from glam import config
  from glam.models.lm import DecoderLM
  from glam.models.summary import abstract_model, count_parameters, flops_per_token
  from glam.train.trainer import train

  config.parse([RUN_GIN, MODELS[name][1]], bindings, [REPO])
  num_steps = gin.query_parameter("train.num_steps")
  result_path = os.path.join(run_dir, RESULT_FILE)
  if os.path.exists(result_path):
    with open(result_path) as f:
      previous = json.load(f)
    if previous.get("num_steps") == num_steps and previous.get("bindings") == bindings:
      print(f"bench_convergence: reusing {run_dir} ({num_steps} steps)", file=sys.stderr)
      return previous
  if os.path.isdir(run_dir) and os.listdir(run_dir):
    raise ValueError(f"{run_dir}: holds another run (no {RESULT_FILE} for {num_steps} steps with these "
                     "bindings); remove it or pick another --out_dir")
  with gin.unlock_config():
    model = abstract_model(DecoderLM)
  seq_len = gin.query_parameter("train.seq_len")
  info = {"model": name, "num_steps": num_steps, "bindings": bindings,
          "batch_size": gin.query_parameter("train.batch_size"), "seq_len": seq_len,
          **{f"params_{k}": v for k, v in count_parameters(model).items()},
          "train_flops_per_token": flops_per_token(model, seq_len)["train"]}
  start = time.perf_counter()
  train(run_dir)
  info["run_wall_s"] = time.perf_counter() - start
  info["load_average_at_end"] = os.getloadavg()  # 1, 5, 15 min: how shared the machine was
  config.save_text(result_path, json.dumps(info, indent=1) + "\n")
  return info


# ----------------------------------------------------------------------------- curves

def read_curves(run_dir: str, info: dict) -> dict:
  """Train and held-out loss by step, and training seconds at each logged step (see the docstring)."""
  from glam.train.metrics import read_metrics
  train_rows = read_metrics(run_dir, "train")
  eval_rows = read_metrics(run_dir, "eval")
  if not train_rows or not eval_rows:
    raise ValueError(f"{run_dir}/metrics.jsonl: no train or eval rows; did the run log and evaluate?")
  tokens_per_step = info["batch_size"] * info["seq_len"]
  log_steps = np.array(sorted(train_rows))
  widths = np.diff(np.concatenate([[0], log_steps]))
  seconds = np.array([tokens_per_step * w / train_rows[s]["tokens_per_s"] for s, w in zip(log_steps, widths)])
  # An evaluation at step e runs before step e + 1, so it is inside the interval (previous, current]
  # with previous <= e < current; the first interval holds compilation.
  starts = np.concatenate([[0], log_steps[:-1]])
  disturbed = np.array([any(start <= e < end for e in eval_rows) for start, end in zip(starts, log_steps)])
  disturbed[0] = True
  per_step = seconds / widths
  clean = per_step[~disturbed] if (~disturbed).any() else per_step[1:] if len(per_step) > 1 else per_step
  median_step_s = float(np.median(clean))
  seconds = np.where(disturbed, widths * median_step_s, seconds)
  eval_steps = np.array(sorted(eval_rows))
  train_time = np.concatenate([[0.0], np.cumsum(seconds)])
  return {
      "train_steps": log_steps, "train_loss": np.array([train_rows[s]["loss"] for s in log_steps]),
      "eval_steps": eval_steps, "eval_loss": np.array([eval_rows[s]["loss"] for s in eval_steps]),
      # training seconds at each evaluation, interpolated on the logged steps
      "eval_time": np.interp(eval_steps, np.concatenate([[0], log_steps]), train_time),
      "train_time": train_time[1:], "median_step_s": median_step_s,
      # token choice: routed assignments past capacity, mean over the MoE layers and logged steps
      "dropped_fraction": (float(np.mean([train_rows[s]["dropped_fraction"] for s in log_steps]))
                           if "dropped_fraction" in train_rows[int(log_steps[-1])] else None),
      "tokens_per_s": tokens_per_step / median_step_s,
      "compile_s": max(0.0, float(tokens_per_step * widths[0] / train_rows[int(log_steps[0])]["tokens_per_s"]
                                  - widths[0] * median_step_s)),
  }


def first_crossing(xs: np.ndarray, losses: np.ndarray, target: float) -> float | None:
  """The x where the piecewise-linear loss curve first reaches `target`, or None if it never does."""
  for i, loss in enumerate(losses):
    if loss <= target:
      if i == 0:
        return float(xs[0])
      x0, x1, l0 = xs[i - 1], xs[i], losses[i - 1]
      return float(x0 + (x1 - x0) * (l0 - target) / (l0 - loss))
  return None


def loss_at(xs: np.ndarray, losses: np.ndarray, x: float) -> float | None:
  """Held-out loss at `x` (steps or seconds), linear between evaluations; None past the curve."""
  if x < xs[0] or x > xs[-1] + 1e-9:
    return None
  return float(np.interp(x, xs, losses))


# ----------------------------------------------------------------------------- report

def fmt(value, spec: str = ".3f", none: str = "not reached") -> str:
  return none if value is None else format(value, spec)


def default_targets(curves: dict) -> list[float]:
  """Five levels, loosest first, rounded to 0.01: from the best first evaluation down to the worst
  final loss (which every model reaches), in four equal steps, then the best final loss."""
  best_first = min(c["eval_loss"][0] for c in curves.values())
  worst_final = max(c["eval_loss"][-1] for c in curves.values())
  best_final = min(c["eval_loss"][-1] for c in curves.values())
  levels = [math.ceil(x * 100) / 100 for x in np.linspace(best_first, worst_final, 5)[1:]]
  levels.append(math.ceil(best_final * 100) / 100)
  return sorted(set(levels), reverse=True)


def report_markdown(names: list[str], infos: dict, curves: dict, targets: list[float], command: str) -> str:
  labels = {n: MODELS[n][0] for n in names}
  header = "| | " + " | ".join(labels[n] for n in names) + " |\n|---|" + "---|" * len(names) + "\n"
  reference = REFERENCE if REFERENCE in names else names[0]
  ref_flops = infos[reference]["train_flops_per_token"]
  lines = ["## Models and throughput\n\n", header]
  rows = [
      ("total parameters", lambda n: f"{infos[n]['params_total']:,}"),
      ("activated parameters", lambda n: f"{infos[n]['params_activated']:,}"),
      ("train FLOPs / token", lambda n: f"{infos[n]['train_flops_per_token'] / 1e6:.3f} M "
                                        f"({infos[n]['train_flops_per_token'] / ref_flops:.3f}x)"),
      ("tokens/s (median interval)", lambda n: f"{curves[n]['tokens_per_s']:,.0f}"),
      ("step time (median)", lambda n: f"{curves[n]['median_step_s'] * 1e3:.0f} ms"),
      ("compilation (about)", lambda n: f"{curves[n]['compile_s']:.0f} s"),
      ("training time (see note)", lambda n: f"{curves[n]['train_time'][-1]:.0f} s"),
      ("whole run, measured", lambda n: f"{infos[n]['run_wall_s']:.0f} s"),
      ("dropped assignments (mean)", lambda n: fmt(curves[n]["dropped_fraction"], ".3f", "-")),
      ("final held-out loss", lambda n: f"{curves[n]['eval_loss'][-1]:.4f}"),
      ("final train loss", lambda n: f"{curves[n]['train_loss'][-1]:.4f}"),
  ]
  lines += [f"| {title} | " + " | ".join(cell(n) for n in names) + " |\n" for title, cell in rows]

  lines += ["\n## Steps to reach a held-out loss\n\n",
            f"Linear between evaluations; in brackets, as a fraction of {labels[reference]}'s steps.\n\n",
            header]
  for target in targets:
    crossing = {n: first_crossing(curves[n]["eval_steps"], curves[n]["eval_loss"], target) for n in names}
    base = crossing[reference]
    cells = [fmt(crossing[n], ".0f") + (f" ({crossing[n] / base:.2f})" if crossing[n] is not None and base else "")
             for n in names]
    lines.append(f"| {target:.2f} | " + " | ".join(cells) + " |\n")

  lines += ["\n## Held-out loss at equal steps\n\n", header]
  steps = curves[names[0]]["eval_steps"]
  for step in steps[np.unique(np.linspace(0, len(steps) - 1, min(8, len(steps))).round().astype(int))]:
    cells = [fmt(loss_at(curves[n]["eval_steps"], curves[n]["eval_loss"], step), ".4f", "-") for n in names]
    lines.append(f"| step {int(step)} | " + " | ".join(cells) + " |\n")

  shortest = min(curves[n]["eval_time"][-1] for n in names)
  lines += ["\n## Held-out loss at equal training time\n\n",
            f"At fractions of the shortest run's training time ({shortest:.0f} s).\n\n", header]
  for fraction in (0.25, 0.5, 0.75, 1.0):
    at = fraction * shortest
    cells = [fmt(loss_at(curves[n]["eval_time"], curves[n]["eval_loss"], at), ".4f", "-") for n in names]
    lines.append(f"| {at:.0f} s | " + " | ".join(cells) + " |\n")
  lines += ["\nCommand: `" + command + "`\n"]
  return "".join(lines)


BEGIN, END = "<!-- bench_convergence: begin -->\n", "<!-- bench_convergence: end -->\n"


def write_report(path: str, generated: str) -> None:
  """Writes the generated tables between the markers of `path`, keeping the prose around them."""
  from glam.config import save_text
  text = f"# Router convergence comparison\n\n{BEGIN}{END}"
  if os.path.exists(path):
    with open(path) as f:
      existing = f.read()
    if BEGIN in existing and END in existing.split(BEGIN, 1)[1]:
      text = existing
  before, rest = text.split(BEGIN, 1)
  after = rest.split(END, 1)[1]
  save_text(path, before + BEGIN + generated + END + after)


def plot(names: list[str], curves: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for name in names:
    c = curves[name]
    line, = by_step.plot(c["eval_steps"], c["eval_loss"], marker="o", markersize=3, label=MODELS[name][0])
    by_step.plot(c["train_steps"], c["train_loss"], color=line.get_color(), alpha=0.25, linewidth=1)
    by_time.plot(c["eval_time"], c["eval_loss"], marker="o", markersize=3, color=line.get_color())
  by_step.set(xlabel="step", ylabel="loss (held-out: markers; train: faint)", title="loss vs steps")
  by_time.set(xlabel="training time (s)", title="held-out loss vs training time")
  finals = [c["eval_loss"][-1] for c in curves.values()]
  firsts = [c["eval_loss"][0] for c in curves.values()]
  by_step.set_ylim(min(finals) - 0.1, max(firsts) + 0.1)
  for ax in (by_step, by_time):
    ax.grid(alpha=0.3)
  by_step.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)  # atomic, like glam.config.save_text


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args, bindings = parse_args(argv)
  infos, curves = {}, {}
  for name in args.models:
    run_dir = os.path.join(args.out_dir, name)
    infos[name] = run_model(name, run_dir, bindings)
    curves[name] = read_curves(run_dir, infos[name])
    print(json.dumps({"model": name, "final_eval_loss": round(float(curves[name]["eval_loss"][-1]), 4),
                      "tokens_per_s": round(curves[name]["tokens_per_s"]),
                      "run_wall_s": round(infos[name]["run_wall_s"], 1)}), flush=True)
  targets = args.targets or default_targets(curves)
  command = "python scripts/bench_convergence.py " + " ".join(argv)
  image = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(args.report)))
  generated = report_markdown(args.models, infos, curves, targets, command.strip())
  write_report(args.report, f"![held-out loss against steps and training time]({image})\n\n{generated}")
  plot(args.models, curves, args.plot)
  print(f"bench_convergence: wrote {args.report} and {args.plot}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
