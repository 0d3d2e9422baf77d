"""scripts/bench_convergence.py: equal activated compute of its configs, and a tiny end-to-end run
whose table and plot must carry the numbers the runs wrote to metrics.jsonl."""
import importlib.util
import json
import os

import numpy as np
import pytest

from cli_helpers import REPO

SCRIPT = os.path.join(REPO, "scripts", "bench_convergence.py")
# Two models (one routed, the dense baseline), tiny shapes, 4 steps, evaluated at steps 2 and 4.
TINY = ["--gin.DecoderLM.d_model=32", "--gin.DecoderLM.num_blocks=1", "--gin.DecoderLM.vocab_size=260",
        "--gin.Attention.num_heads=2", "--gin.Attention.head_dim=16", "--gin.FeedForward.d_ff=64",
        "--gin.MoeLayer.num_experts=4", "--gin.MoeLayer.d_ff=32", "--gin.MoeLayer.group_size=128",
        "--gin.train.batch_size=8", "--gin.train.seq_len=32", "--gin.train.num_steps=4",
        "--gin.train.log_every=1", "--gin.train.eval_every=2", "--gin.train.num_eval_batches=1"]
MODELS = ["ec", "dense"]


def load_script():
  spec = importlib.util.spec_from_file_location("bench_convergence", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return load_script()


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
  out = tmp_path_factory.mktemp("convergence")
  argv = [f"--out_dir={out / 'runs'}", f"--models={','.join(MODELS)}", f"--report={out / 'report.md'}",
          f"--plot={out / 'plot.png'}", *TINY]
  assert bench.main(argv) == 0
  return out, argv


def test_configs_have_equal_activated_compute(bench):
  import gin
  from glam import config
  from glam.models.lm import DecoderLM
  from glam.models.summary import abstract_model, count_parameters, flops_per_token
  flops, totals = {}, {}
  for name, (_, gin_file) in bench.MODELS.items():
    config.parse([bench.RUN_GIN, gin_file], [], [REPO])
    with gin.unlock_config():
      model = abstract_model(DecoderLM)
    flops[name] = flops_per_token(model, 128)["train"]
    totals[name] = count_parameters(model)["total"]
  reference = flops["gshard"]
  for name, value in flops.items():
    assert abs(value / reference - 1) < 0.01, (name, value, reference)
  # ...while the sparse models hold more parameters than they use: the comparison is not vacuous.
  assert totals["switch"] > totals["gshard"] > totals["dense"]


def test_report_numbers_come_from_metrics(tiny_run):
  from glam.train.metrics import read_metrics
  out, _ = tiny_run
  report = (out / "report.md").read_text()
  finals = {}
  for name in MODELS:
    evals = read_metrics(str(out / "runs" / name), "eval")
    assert sorted(evals) == [2, 4]
    finals[name] = evals[4]["loss"]
    info = json.loads((out / "runs" / name / "bench.json").read_text())
    assert info["num_steps"] == 4 and info["run_wall_s"] > 0
  final_row = next(line for line in report.splitlines() if line.startswith("| final held-out loss"))
  assert final_row == "| final held-out loss | " + " | ".join(f"{finals[n]:.4f}" for n in MODELS) + " |"
  for step in (2, 4):
    row = next(line for line in report.splitlines() if line.startswith(f"| step {step} |"))
    expected = [f"{read_metrics(str(out / 'runs' / n), 'eval')[step]['loss']:.4f}" for n in MODELS]
    assert row == f"| step {step} | " + " | ".join(expected) + " |"
  assert "![held-out loss" in report and "plot.png" in report


def test_curves_time_axis_and_throughput(bench, tiny_run):
  from glam.train.metrics import read_metrics
  out, _ = tiny_run
  for name in MODELS:
    run_dir = str(out / "runs" / name)
    info = json.loads((out / "runs" / name / "bench.json").read_text())
    curves = bench.read_curves(run_dir, info)
    logged = [row["tokens_per_s"] for row in read_metrics(run_dir, "train").values()]
    assert min(logged) <= curves["tokens_per_s"] <= max(logged)
    assert np.all(np.diff(curves["train_time"]) > 0)
    assert np.all(np.diff(curves["eval_time"]) > 0)
    # compilation is not on the training-time axis: 4 steps take about 4 median steps
    assert curves["train_time"][-1] == pytest.approx(4 * curves["median_step_s"], rel=0.5)


def test_plot_is_a_png_with_two_panels(tiny_run):
  import matplotlib.image
  out, _ = tiny_run
  data = (out / "plot.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  height, width = matplotlib.image.imread(str(out / "plot.png")).shape[:2]
  assert width > 1.5 * height  # two panels side by side


def test_rerun_reuses_runs_and_keeps_prose(bench, tiny_run):
  out, argv = tiny_run
  report = out / "report.md"
  report.write_text("# Notes\n\nhand-written analysis\n\n" + report.read_text().split("\n\n", 1)[1] + "\ntail\n")
  metrics = out / "runs" / "ec" / "metrics.jsonl"
  before = metrics.read_text()
  assert bench.main(argv) == 0
  assert metrics.read_text() == before  # not retrained
  text = report.read_text()
  assert text.startswith("# Notes\n\nhand-written analysis\n") and text.endswith("tail\n")
  assert text.count(bench.BEGIN) == 1 and "| final held-out loss" in text


def test_bad_input_is_named(bench, tmp_path):
  occupied = tmp_path / "ec"
  occupied.mkdir()
  (occupied / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="holds another run"):
    bench.run_model("ec", str(occupied), [])
  with pytest.raises(SystemExit):
    bench.parse_args(["--models=ec,top3"])
  with pytest.raises(SystemExit):
    bench.parse_args(["--targets=low"])


def test_crossing_and_interpolation(bench):
  steps, losses = np.array([10.0, 20.0, 30.0]), np.array([3.0, 2.0, 1.5])
  assert bench.first_crossing(steps, losses, 2.5) == pytest.approx(15.0)
  assert bench.first_crossing(steps, losses, 3.5) == 10.0
  assert bench.first_crossing(steps, losses, 1.0) is None
  assert bench.loss_at(steps, losses, 25.0) == pytest.approx(1.75)
  assert bench.loss_at(steps, losses, 31.0) is None
