"""Evaluate a model on SuperGLUE tasks and write predictions, metrics and a markdown table.

All data is read and checked (fields, labels, --shots against the train split) before the model
runs, and every output file is written atomically after all tasks are scored, so a bad input or
a crash leaves no partial results behind.

Outputs under `output_dir`:
  <task>.predictions.jsonl  one line per example: idx, prediction, label, and per-option scores
                            (rank classification) or the generated text (generation)
  metrics.json              per-task metrics (0-100), the SuperGLUE average, the settings used
  results.md                the same as a markdown table
"""
import json
import os
import sys
from typing import Callable

import gin
import numpy as np
from tqdm.auto import tqdm

from glam.config import save_text
from glam.eval.superglue import metrics as sg_metrics
from glam.eval.superglue import prompts as sg_prompts
from glam.eval.superglue.readers import Split
from glam.eval.superglue.generation import greedy_generate
from glam.eval.superglue.scoring import DEFAULT_MAX_BATCH_TOKENS, score_options
from glam.eval.superglue.tasks import TASKS, Task, label_name

MODES = ("rank", "generate")
# read(task, split) -> Split
ReadSplit = Callable[[Task, str], Split]


def load_task_data(tasks: list[Task], read: ReadSplit, *, split: str, shots: int,
                   max_examples: int | None, skip_missing=()) -> list[tuple[Split, list[dict]]]:
  """(evaluation split, demonstration pool) per task; tasks in `skip_missing` whose files are
  absent are left out with a note on stderr."""
  if shots < 0:
    raise ValueError(f"--shots={shots}: must be 0 or more")
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"--max_examples={max_examples}: must be 1 or more")
  loaded = []
  for task in tasks:
    try:
      evaluation = read(task, split)
    except FileNotFoundError as error:
      if task.name in skip_missing:
        print(f"glam eval superglue: skipping {task.name}: {error}", file=sys.stderr)
        continue
      raise
    if max_examples is not None:
      evaluation = evaluation._replace(examples=evaluation.examples[:max_examples])
    demos: list[dict] = []
    if shots > 0:
      pool = read(TASKS[task.demo_task] if task.demo_task else task, "train")
      demo_task = pool.task
      demos = [e for e in pool.examples if sg_prompts.gold_option(demo_task, e) is not None]
      if shots > len(demos):
        raise ValueError(f"--shots={shots}: larger than the labelled train split of {demo_task.name} "
                         f"({len(demos)} examples in {pool.origin})")
    loaded.append((evaluation, demos))
  if not loaded:
    raise ValueError("no task left to evaluate (every requested diagnostic is missing from the data)")
  return loaded


def draw_demonstrations(pool: list[dict], shots: int, seed: int, number: int) -> list[dict]:
  """`shots` distinct training examples for evaluation example `number`, fixed by (seed, number)."""
  if shots == 0:
    return []
  chosen = np.random.default_rng([seed, number]).choice(len(pool), size=shots, replace=False)
  return [pool[i] for i in chosen]


def rank_task(model, vocab, task: Task, examples, demos, *, shots, seed, batch_size, max_length,
              length_normalised, prefix_lm, progress, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS,
              share_context=True) -> list[dict]:
  demo_task = TASKS[task.demo_task] if task.demo_task and demos else task
  prompts, groups = [], []
  for number, example in enumerate(examples):
    prompt = sg_prompts.rank_prompt(task, example)
    shown = [sg_prompts.demonstration(demo_task, d) for d in draw_demonstrations(demos, shots, seed, number)]
    context = vocab.encode(sg_prompts.few_shot_context(prompt.context, shown))
    prompts.append(prompt)
    groups.append((context, [vocab.encode(option) for option in prompt.options]))
  totals = score_options(model, groups, batch_size=batch_size, max_length=max_length, prefix_lm=prefix_lm,
                         max_batch_tokens=max_batch_tokens, use_cache=share_context, progress=progress)
  results = []
  for example, prompt, (_, options), option_totals in zip(examples, prompts, groups, totals):
    if not prompt.options:  # a ReCoRD passage without candidate entities
      results.append({"prediction": None, "scores": {}})
      continue
    # Options cut to max_length keep their first max_length tokens.
    counts = np.array([min(len(option), max_length) for option in options])
    option_scores = option_totals / counts if length_normalised else option_totals
    best = int(np.argmax(option_scores))
    names = example["entities"] if task.name == "record" else list(task.labels)
    results.append({"prediction": names[best] if task.name == "record" else best,
                    "scores": {name: round(float(s), 6) for name, s in zip(names, option_scores)}})
  return results


def generate_task(model, vocab, task: Task, examples, demos, *, shots, seed, batch_size, max_length,
                  max_new_tokens, prefix_lm, progress, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS) -> list[dict]:
  demo_task = TASKS[task.demo_task] if task.demo_task and demos else task
  prompts = []
  for number, example in enumerate(examples):
    source, _ = sg_prompts.to_text_to_text(task, example)
    shown = ["".join(sg_prompts.to_text_to_text(demo_task, d))
             for d in draw_demonstrations(demos, shots, seed, number)]
    prompts.append([0] + vocab.encode(sg_prompts.few_shot_context(source, shown)))
  outputs = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            max_length=max_length, eos_id=vocab.eos_id, prefix_lm=prefix_lm,
                            max_batch_tokens=max_batch_tokens, progress=progress)
  results = []
  for example, ids in zip(examples, outputs):
    text = vocab.decode(ids)
    results.append({"prediction": sg_prompts.postprocess(task, example, text), "generated": text})
  return results


def prediction_rows(task: Task, examples, results) -> list[dict]:
  rows = []
  for example, result in zip(examples, results):
    prediction = result["prediction"]
    row = {"idx": example["idx"],
           "prediction": prediction if task.name == "record" else label_name(task, prediction),
           "label": example["answers"] if task.name == "record" else label_name(task, example["label"])}
    row.update({k: v for k, v in result.items() if k != "prediction"})
    rows.append(row)
  return rows


def markdown_table(per_task: dict, average: dict, header: str) -> str:
  lines = [header, "", "| task | metric | score |", "|---|---|---:|"]
  for name, values in per_task.items():
    if not values:
      lines.append(f"| {name} | (no labels) | |")
    for metric, value in values.items():
      lines.append(f"| {name} | {metric} | {value:.2f} |")
  if average["average"] is not None:
    label = "SuperGLUE score" if average["superglue_score"] is not None else \
        f"average over {', '.join(average['average_over'])}"
    lines.append(f"| **{label}** | | **{average['average']:.2f}** |")
  return "\n".join(lines) + "\n"


@gin.configurable(denylist=["model", "vocab", "data", "output_dir"])
def evaluate_superglue(model, vocab, data: list[tuple[Split, list[dict]]], output_dir: str, *,
                       mode: str = "rank", shots: int = 0, seed: int = 0, batch_size: int = 16,
                       max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_length: int = 1024,
                       length_normalised: bool = True, share_context: bool = True, prefix_lm: bool = False,
                       max_new_tokens: int = 32, progress_bar: bool = True, header: str = "") -> dict:
  """Scores every task in `data` and writes the outputs (see the module docstring); returns
  metrics.json's dict.

  Args:
    data: (evaluation split, demonstration pool) per task, from `load_task_data`.
    mode: "rank" (log-likelihood of each verbalised option, GLaM's NLU protocol) or "generate"
      (greedy decoding of the T5 target after text-to-text fine-tuning).
    shots: demonstrations per example, drawn from the pool (AX-b/AX-g: RTE's train split) by `seed`.
    batch_size: examples per model call at most (rank: each with all its options).
    max_batch_tokens: tokens per model call at most (a longer example gets a call of its own);
      1024 suits XLA:CPU (see glam/eval/superglue/batching.py); raise it on accelerators.
    max_length: tokens per row; longer contexts lose their beginning. GLaM trained on 1024.
    length_normalised: rank by mean instead of summed token log-probability (GLaM's default).
    share_context: rank mode runs an example's context once into the KV cache and scores each
      option after it. False: each (context, option) is a row of its own, slower, but with
      capacity-limited MoE routing an option's tokens are then routed together with its context's.
    prefix_lm: attend bidirectionally over the prompt (for models fine-tuned as prefix LMs).
    max_new_tokens: generation length (T5 targets are short; ReCoRD entities are the longest).
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: expected one of {', '.join(MODES)}")
  for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens), ("max_length", max_length)):
    if value < 1:
      raise ValueError(f"evaluate_superglue.{name}={value}: must be 1 or more")
  if any(len(demos) < shots for _, demos in data):
    raise ValueError(f"--shots={shots}: more than a task's demonstration pool (use load_task_data)")
  per_task, predictions = {}, {}
  for evaluation, demos in data:
    task, examples = evaluation.task, evaluation.examples
    # The bar counts examples; they are scored shortest first, so its rate rises as it goes.
    bar = tqdm(total=len(examples), desc=task.name, unit="ex", disable=not progress_bar,
               dynamic_ncols=True, file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}, {rate_fmt}]")
    common = dict(shots=shots, seed=seed, batch_size=batch_size, max_length=max_length,
                  max_batch_tokens=max_batch_tokens, prefix_lm=prefix_lm, progress=bar.update)
    if mode == "rank":
      results = rank_task(model, vocab, task, examples, demos, length_normalised=length_normalised,
                          share_context=share_context, **common)
    else:
      results = generate_task(model, vocab, task, examples, demos, max_new_tokens=max_new_tokens, **common)
    bar.close()
    per_task[task.name] = sg_metrics.task_metrics(task, examples, [r["prediction"] for r in results])
    predictions[task.name] = prediction_rows(task, examples, results)
  average = sg_metrics.superglue_average(per_task)
  summary = {"tasks": per_task, **average,
             "settings": {"mode": mode, "shots": shots, "seed": seed,
                          "split": data[0][0].name if data else None,
                          "length_normalised": length_normalised, "share_context": share_context,
                          "max_length": max_length,
                          "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
                          "examples": {name: len(rows) for name, rows in predictions.items()}}}
  for name, rows in predictions.items():
    save_text(os.path.join(output_dir, f"{name}.predictions.jsonl"),
              "".join(json.dumps(row) + "\n" for row in rows))
  save_text(os.path.join(output_dir, "results.md"), markdown_table(per_task, average, header))
  save_text(os.path.join(output_dir, "metrics.json"), json.dumps(summary, indent=1))
  return summary
