"""End to end: tiny pretrain -> SuperGLUE text-to-text fine-tune -> `glam eval superglue`, through the
command line, on JSONL fixtures of every task; bad input fails with a clear message and no files."""
import json
import os

import pytest

from cli_helpers import TINY_RUN, glam
from glam import cli
from test_superglue_data import write_superglue_dir

FEWGLUE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                       "superglue_fewshot")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sg_cli")
  data = write_superglue_dir(root / "data")
  model_dir = str(root / "pretrain")
  glam("train", *TINY_RUN, "--gin.train.num_steps=2", f"--model_dir={model_dir}")
  return {"root": root, "data": data, "model_dir": model_dir}


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_rank_classification_writes_every_output(run, capsys):
  out = str(run["root"] / "rank")
  code = cli.main(["eval", "superglue", f"--checkpoint={run['model_dir']}", "--tasks=all", "--shots=1",
                   f"--data_dir={run['data']}", f"--output_dir={out}", "--gin.evaluate_superglue.batch_size=8",
                   "--gin.evaluate_superglue.max_length=128"])
  stdout, stderr = capsys.readouterr()
  assert code == 0 and "| **SuperGLUE score** |" in stdout
  assert "wsc: 100%|" in stderr and "3/3" in stderr  # the progress bar, over examples
  summary = json.load(open(os.path.join(out, "metrics.json")))
  assert set(summary["tasks"]) == {"boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc", "axb", "axg"}
  assert set(summary["tasks"]["cb"]) == {"accuracy", "f1_macro"} and set(summary["tasks"]["axg"]) == {"gender_parity", "accuracy"}
  assert summary["superglue_score"] is not None and summary["settings"]["shots"] == 1
  counts = {"multirc": 9, "record": 3, "axb": 4, "axg": 4}
  for task in summary["tasks"]:
    rows = read_jsonl(os.path.join(out, f"{task}.predictions.jsonl"))
    assert len(rows) == counts.get(task, 3), task
    for row in rows:
      assert {"idx", "prediction", "label", "scores"} <= set(row)
      assert row["prediction"] == max(row["scores"], key=row["scores"].get)
  wsc = read_jsonl(os.path.join(out, "wsc.predictions.jsonl"))
  correct = sum(r["prediction"] == r["label"] for r in wsc)
  assert summary["tasks"]["wsc"]["accuracy"] == pytest.approx(100 * correct / 3)
  assert open(os.path.join(out, "results.md")).read().count("\n| ") >= 12


def test_finetune_then_generate_from_a_checkpoint_step_directory(run):
  finetuned = str(run["root"] / "finetune")
  glam("train", "--gin_file=configs/runs/superglue_finetune.gin", *TINY_RUN[2:], "--gin.train.num_steps=2",
       "--gin.train.seq_len=128", f"--gin.init_checkpoint='{run['model_dir']}'",
       f"--gin.superglue_text_to_text_tasks.data_dir='{run['data']}'", f"--model_dir={finetuned}")
  out = str(run["root"] / "generate")
  proc = glam("eval", "superglue", f"--checkpoint={finetuned}/checkpoints/2", "--tasks=rte,record,wsc",
              "--mode=generate", f"--data_dir={run['data']}", f"--output_dir={out}", "--no_progress",
              "--gin.evaluate_superglue.max_new_tokens=4", "--gin.evaluate_superglue.max_length=256")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 2 and set(result["tasks"]) == {"rte", "record", "wsc"}
  assert result["superglue_score"] is None  # three tasks: an average, not the SuperGLUE score
  rows = read_jsonl(os.path.join(out, "rte.predictions.jsonl"))
  assert len(rows) == 3 and all("generated" in r and r["label"] in ("entailment", "not_entailment") for r in rows)
  assert sorted(os.listdir(out)) == ["metrics.json", "record.predictions.jsonl", "results.md",
                                     "rte.predictions.jsonl", "wsc.predictions.jsonl"]
  assert json.load(open(os.path.join(out, "metrics.json")))["settings"]["mode"] == "generate"


@pytest.mark.parametrize("flags,message", [
    (["--tasks=rte,superb"], "unknown SuperGLUE task 'superb'; valid tasks: boolq, cb, copa, multirc, record"),
    (["--tasks=cb", "--shots=5"], "--shots=5: larger than the labelled train split of cb (4 examples in"),
    (["--tasks=rte,copa", "--tfds"], "give exactly one of --data_dir=DIR and --tfds"),
    (["--tasks=rte", "--gin.evaluate_superglue.max_batch_tokens=0"],
     "evaluate_superglue.max_batch_tokens=0: must be 1 or more"),
])
def test_bad_flags_fail_before_anything_is_written(run, capsys, flags, message, tmp_path):
  out = tmp_path / "out"
  code = cli.main(["eval", "superglue", f"--checkpoint={run['model_dir']}", f"--data_dir={run['data']}", *flags,
                   f"--output_dir={out}"])
  assert code == 2 and message in capsys.readouterr().err
  assert not out.exists()


def test_bad_row_names_file_line_and_field_and_writes_nothing(run, capsys, tmp_path):
  data = write_superglue_dir(tmp_path / "data")
  with open(os.path.join(data, "RTE", "val.jsonl"), "a") as f:
    f.write(json.dumps({"premise": "p", "hypothesis": "h", "idx": 9, "label": "yes"}) + "\n")
  out = tmp_path / "out"
  code = cli.main(["eval", "superglue", f"--checkpoint={run['model_dir']}", "--tasks=boolq,rte",
                   f"--data_dir={data}", f"--output_dir={out}"])
  err = capsys.readouterr().err
  assert code == 2 and "RTE/val.jsonl:4: field 'label': 'yes' is not a rte label" in err
  assert not out.exists()  # boolq was fine, but nothing is half-written


@pytest.mark.skipif(not os.path.isdir(FEWGLUE), reason="the FewGLUE data folder is not beside the repo")
def test_real_fewglue_files_read_for_every_task():
  from glam.eval.superglue.readers import read_jsonl_split
  from glam.eval.superglue.tasks import MAIN_TASKS, TASKS
  for name in MAIN_TASKS:
    for split in ("train", "validation"):
      assert read_jsonl_split(TASKS[name], FEWGLUE, split).examples


def test_tfds_path_through_the_command(run, tmp_path, capsys):
  tfds = pytest.importorskip("tensorflow_datasets")
  out = tmp_path / "out"
  with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path / "tfds")):
    code = cli.main(["eval", "superglue", f"--checkpoint={run['model_dir']}", "--tasks=rte,axb", "--tfds",
                     f"--tfds_data_dir={tmp_path / 'tfds'}", "--shots=1", f"--output_dir={out}", "--no_progress",
                     "--gin.evaluate_superglue.max_length=64"])
  assert code == 0, capsys.readouterr().err
  summary = json.load(open(out / "metrics.json"))
  assert summary["settings"]["examples"] == {"rte": 3, "axb": 3}
  assert set(summary["tasks"]["axb"]) == {"mcc"} and set(summary["tasks"]["rte"]) == {"accuracy"}
