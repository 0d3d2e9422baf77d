"""The other `glam` sub-commands, driven in-process as a user would call them, and bad input."""
import json
import os
import shutil

import pytest

from cli_helpers import TINY_RUN
from glam.cli import main


def last_json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("run") / "model")
  assert main(["train", *TINY_RUN, "--gin.train.num_steps=30", "--gin.train.eval_every=30", "--gin.train.log_every=7",
               "--gin.train.num_eval_batches=3", f"--model_dir={model_dir}"]) == 0
  return model_dir


def test_train_reports_eval_per_domain(trained):
  with open(os.path.join(trained, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if r["prefix"] == "eval"]
  assert evals and evals[-1]["step"] == 30
  domains = {k.split("/")[1] for k in evals[-1] if k.startswith("loss/")}
  assert len(domains) >= 3 and domains <= {"arithmetic", "copy", "sentences", "kv_recall", "reverse"}
  train_rows = [r for r in rows if r["prefix"] == "train"]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]
  # the step computes the norm metrics only on the steps the trainer logs: every 7th and the last
  assert [r["step"] for r in train_rows] == [7, 14, 21, 28, 30]
  assert all(0 < r["grad_norm"] < float("inf") and 0 < r["param_norm"] < float("inf") for r in train_rows)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(trained))


def test_eval_matches_training_eval_and_accepts_other_data(trained, capsys, tmp_path):
  assert main(["eval", f"--model_dir={trained}", "--num_batches=3"]) == 0
  result = last_json(capsys)
  with open(os.path.join(trained, "metrics.jsonl")) as f:
    final_eval = [json.loads(line) for line in f if '"eval"' in line][-1]
  assert result["step"] == 30
  assert result["loss"] == pytest.approx(final_eval["loss"], rel=1e-5)  # same held-out batches
  assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-5)
  data = tmp_path / "notes.jsonl"
  data.write_text("\n".join(json.dumps({"text": f"note number {i} says hello"}) for i in range(20)))
  assert main(["eval", f"--model_dir={trained}", f"--data={data}", "--num_batches=1"]) == 0
  assert set(k for k in last_json(capsys) if k.startswith("loss/")) == {"loss/text"}


def test_generate_greedy_is_deterministic_and_sampling_seeded(trained, capsys):
  args = ["generate", f"--model_dir={trained}", "--prompt=12+3=", "--prompt=copy: ab | ", "--max_new_tokens=8"]
  assert main(args) == 0
  first = capsys.readouterr().out
  assert main(args) == 0
  assert capsys.readouterr().out == first
  lines = [json.loads(line) for line in first.strip().splitlines()]
  assert [line["prompt"] for line in lines] == ["12+3=", "copy: ab | "]
  sample = args + ["--temperature=1.0", "--top_k=5", "--seed=7"]
  assert main(sample) == 0 and main(sample) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[:2] == out[2:]


def test_model_summary_counts(capsys):
  assert main(["model", "summary", "--gin_file=configs/models/dense_tiny.gin", "--seq_len=128"]) == 0
  summary = last_json(capsys)
  d, f, v, layers, hd = 128, 512, 384, 4, 4 * 32
  expected = layers * (4 * d * hd + 3 * d * f + 2 * d) + 2 * v * d + d
  assert summary["total"] == summary["activated"] == expected


def test_vocab_train_then_train_with_it(tmp_path, capsys):
  prefix = str(tmp_path / "spm")
  assert main(["vocab", "train", "--input=synthetic", f"--model_prefix={prefix}", "--vocab_size=200",
               "--max_documents=2000"]) == 0
  assert last_json(capsys)["model"] == prefix + ".model"
  model_dir = str(tmp_path / "spm_run")
  assert main(["train", *TINY_RUN, "--gin.train.num_steps=2", f"--gin.train.vocab_path='{prefix}.model'",
               f"--model_dir={model_dir}"]) == 0
  # The same directory with another vocabulary: refused, the checkpoint untouched.
  code = main(["train", *TINY_RUN, "--gin.train.num_steps=3", f"--model_dir={model_dir}"])
  assert code == 2 and "vocabulary" in capsys.readouterr().err
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["2"]


def test_model_dir_with_another_model_shape_names_the_parameters(trained, tmp_path, capsys):
  copy = str(tmp_path / "copy")
  shutil.copytree(trained, copy)
  code = main(["train", *TINY_RUN, "--gin.FeedForward.d_ff=48", "--gin.train.num_steps=40", f"--model_dir={copy}"])
  err = capsys.readouterr().err
  assert code == 2 and "ffn_1/wi" in err and "48" in err and "64" in err


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  model_dir = str(tmp_path / "run")
  assert main(["train", *TINY_RUN, "--gin.train.num_steps=4", "--gin.Checkpointer.save_interval_steps=2",
               f"--model_dir={model_dir}"]) == 0
  latest = os.path.join(model_dir, "checkpoints", "4")
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  assert main(["train", *TINY_RUN, "--gin.train.num_steps=4", "--gin.Checkpointer.save_interval_steps=2",
               f"--model_dir={model_dir}"]) == 0
  err = capsys.readouterr().err
  assert "skipped unreadable checkpoint step 4" in err or "skipped unreadable checkpoint [4]" in err, err
  assert "using step 2 instead" in err and "resumed from" in err and "at step 2" in err
  assert main(["eval", f"--model_dir={model_dir}", "--num_batches=1"]) == 0  # step 4 was written anew
  assert last_json(capsys)["step"] == 4


@pytest.mark.parametrize("args,message", [
    (["--gin_file=missing.gin"], "--gin_file=missing.gin: not found"),
    (["--gin.DecoderLM.width=3"], "parameter named 'width'"),
    (["--gin.train.data='/nonexistent/*.jsonl'"], "no files match"),
    (["--gin.DecoderLM.vocab_size=100"], "DecoderLM.vocab_size=100: smaller than the vocabulary"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
  code = main(["train", *TINY_RUN, *args, f"--model_dir={tmp_path / 'run'}"])
  assert code == 2
  assert message in capsys.readouterr().err


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"text": "fine"}\n{"text": broken\n')
  code = main(["train", *TINY_RUN, f"--gin.train.data='{data}'", f"--model_dir={tmp_path / 'run'}"])
  assert code == 2 and "bad.jsonl:2" in capsys.readouterr().err
