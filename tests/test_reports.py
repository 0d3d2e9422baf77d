"""The report scripts in a test-sized version on the built-in synthetic domains (issue 5):
scripts/lifelong_forgetting.py (Lifelong-MoE forgets less than naive continued training) and
scripts/mode_report.py (MoDE experts + composition retain the backbone's domain better than full
fine-tuning, while training fewer parameters). Both run in-process and read their last JSON line."""
import importlib.util
import json
import math
import os

import pytest

from cli_helpers import REPO


def load_script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def last_json(text):
  lines = [line for line in text.splitlines() if line.startswith("{")]
  assert lines, text[-2000:]
  return json.loads(lines[-1])


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)  # the scripts name gin files relative to the repository root


def test_lifelong_forgets_less_than_naive_continued_training(in_repo, tmp_path, capsys):
  script = load_script("lifelong_forgetting")
  script.main(["--data=synthetic", "--size=test", "--steps1=30", "--steps2=30", "--add=4",
               "--eval_batches=2", f"--out_dir={tmp_path / 'lifelong'}"])
  report = last_json(capsys.readouterr().out)
  assert report["experts"] == [4, 8]
  table = report["table"]
  assert list(table) == ["after stage 1", "stage 2, Lifelong-MoE", "stage 2, naive"]
  domains = ["arithmetic", "copy", "sentences", "reverse"]
  for row in table.values():
    assert sorted(row) == sorted(domains)
    assert all(math.isfinite(loss) for loss in row.values()), row
  old = ["arithmetic", "copy", "sentences"]  # stage 1's domains
  mean = lambda row: sum(table[row][d] for d in old) / len(old)
  # The report's point: after stage 2 on `reverse`, naive training forgot the stage-1 domains;
  # the grown, partly frozen, distilled model much less so.
  assert mean("stage 2, Lifelong-MoE") < mean("stage 2, naive") - 0.2, table
  # Both learned the new domain in stage 2.
  for row in ("stage 2, Lifelong-MoE", "stage 2, naive"):
    assert table[row]["reverse"] < table["after stage 1"]["reverse"] - 0.3, table


def test_mode_retains_the_backbone_domain_better_than_full_finetuning(in_repo, tmp_path, capsys):
  script = load_script("mode_report")
  script.main(["--data=synthetic", f"--workdir={tmp_path / 'mode'}", "--backbone_steps=40",
               "--expert_steps=20", "--compose_steps=10", "--batch_size=8", "--seq_len=32",
               "--eval_batches=2"])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  rows = {row["model"]: row for row in lines if "model" in row}
  summary = lines[-1]
  assert summary["backbone_domain"] == "sentences"
  targets = ["arithmetic", "copy"]
  names = ["backbone", *(f"{m}_{d}" for m in ("expert", "finetune") for d in targets), "composed", "mode"]
  assert list(rows) == names
  for row in rows.values():
    assert sorted(row["losses"]) == sorted(["sentences", *targets])
    assert all(math.isfinite(loss) for loss in row["losses"].values()), row

  # Trained parameters: full fine-tuning trains the whole backbone, an expert (with its gate) less,
  # the composition run only the gate, composing nothing.
  backbone = rows["backbone"]["total_parameters"]
  for d in targets:
    assert rows[f"finetune_{d}"]["trained_parameters"] == backbone
    assert 0 < rows[f"expert_{d}"]["trained_parameters"] < backbone
  assert 0 < rows["mode"]["trained_parameters"] < min(rows[f"expert_{d}"]["trained_parameters"] for d in targets)
  assert rows["mode"]["trained_parameters"] == rows["mode"]["gate_parameters"]
  assert rows["composed"]["trained_parameters"] == 0
  # A composed model's fresh gate passes exactly the backbone.
  for d, loss in rows["backbone"]["losses"].items():
    assert rows["composed"]["losses"][d] == pytest.approx(loss, abs=1e-3), d

  # Each adaptation learned its target domain.
  for d in targets:
    for method in ("expert", "finetune"):
      assert summary[f"{method}/{d}/target"] < rows["backbone"]["losses"][d] - 0.5, (method, d, summary)
  # The report's point: the MoDE model keeps the backbone's domain, full fine-tuning forgets it.
  retention = summary["mode/retention"]
  assert retention < summary["backbone/retention"] + 0.3, summary
  for d in targets:
    assert retention < summary[f"finetune/{d}/retention"] - 0.2, summary
