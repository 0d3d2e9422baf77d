"""SuperGLUE's official metrics, on a 0-100 scale (as the leaderboard and the GLaM paper report).

Predictions are label indices (None: the model named no label, always wrong) or, for ReCoRD, the
answer text. Scores:
  accuracy; CB: accuracy and macro-F1 over its three classes; MultiRC: F1 over all answer options
  (F1a) and exact match per question (every option of the question right); ReCoRD: SQuAD token F1
  and exact match, each the max over the gold answers; AX-b: Matthews correlation; AX-g: gender
  parity (the share of male/female minimal pairs, rows idx 2k and 2k+1, predicted alike) and
  accuracy. The SuperGLUE score averages the eight tasks, each task's metrics averaged first.
"""
import collections
import math
import re
import string

import numpy as np

from glam.eval.superglue.tasks import MAIN_TASKS, Task

INVALID = -1  # stands for a prediction that names no label


def _as_array(predictions) -> np.ndarray:
  return np.asarray([INVALID if p is None else int(p) for p in predictions], np.int64)


def accuracy(labels, predictions) -> float:
  labels, predictions = np.asarray(labels), _as_array(predictions)
  return 100.0 * float(np.mean(labels == predictions))


def f1_score(labels, predictions, positive: int = 1) -> float:
  """F1 of one class: 2 tp / (2 tp + fp + fn); 0 when the class is never predicted nor present."""
  labels, predictions = np.asarray(labels), _as_array(predictions)
  tp = np.sum((predictions == positive) & (labels == positive))
  fp = np.sum((predictions == positive) & (labels != positive))
  fn = np.sum((predictions != positive) & (labels == positive))
  return 100.0 * float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def f1_macro(labels, predictions, num_classes: int) -> float:
  """The unweighted mean of each class's F1 (T5's mean_multiclass_f1)."""
  return float(np.mean([f1_score(labels, predictions, c) for c in range(num_classes)]))


def matthews_corrcoef(labels, predictions) -> float:
  """MCC from the confusion matrix (the multiclass form; the usual one for two classes)."""
  labels, predictions = np.asarray(labels), _as_array(predictions)
  classes = np.union1d(labels, predictions)
  true_counts = np.array([np.sum(labels == c) for c in classes], np.float64)
  pred_counts = np.array([np.sum(predictions == c) for c in classes], np.float64)
  correct, total = float(np.sum(labels == predictions)), float(len(labels))
  numerator = correct * total - float(true_counts @ pred_counts)
  denominator = math.sqrt((total ** 2 - float(pred_counts @ pred_counts)) *
                          (total ** 2 - float(true_counts @ true_counts)))
  return 100.0 * numerator / denominator if denominator else 0.0


def multirc_exact_match(examples: list[dict], predictions) -> float:
  """Share of questions whose every answer option is predicted right."""
  questions: dict = collections.defaultdict(lambda: True)
  for example, prediction in zip(examples, predictions):
    key = (example["idx"]["paragraph"], example["idx"]["question"])
    questions[key] = questions[key] and prediction == example["label"]
  return 100.0 * float(np.mean(list(questions.values())))


def normalize_answer(text: str) -> str:
  """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
  predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
  common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(expected)
  return 2 * precision * recall / (precision + recall)


def record_scores(examples: list[dict], predictions) -> dict:
  """Token F1 and exact match, each the max over the query's gold answers, averaged over queries."""
  f1s, ems = [], []
  for example, prediction in zip(examples, predictions):
    golds = example["answers"]
    f1s.append(max(token_f1(prediction or "", gold) for gold in golds))
    ems.append(max(float(normalize_answer(prediction or "") == normalize_answer(gold)) for gold in golds))
  return {"f1": 100.0 * float(np.mean(f1s)), "exact_match": 100.0 * float(np.mean(ems))}


def gender_parity(examples: list[dict], predictions) -> float:
  """Share of the minimal pairs (idx 2k, 2k+1: the same sentence with a male and a female
  pronoun) whose two predictions agree. Rows whose partner is missing are left out."""
  by_idx = {example["idx"]: prediction for example, prediction in zip(examples, predictions)}
  pairs = [(by_idx[i], by_idx[i + 1]) for i in sorted(by_idx) if i % 2 == 0 and i + 1 in by_idx]
  if not pairs:
    raise ValueError("axg: no complete male/female pair (rows idx 2k and 2k+1) to measure gender parity")
  return 100.0 * float(np.mean([a == b for a, b in pairs]))


def task_metrics(task: Task, examples: list[dict], predictions: list) -> dict:
  """The task's official metrics on examples that carry labels."""
  if task.name == "record":
    scored = [(e, p) for e, p in zip(examples, predictions) if e["answers"]]
    if not scored:
      return {}
    return record_scores(*map(list, zip(*scored)))
  if any(e["label"] is None for e in examples):
    return {}  # an unlabelled (test) split: predictions only
  labels = [e["label"] for e in examples]
  metrics = {}
  for name in task.metrics:
    if name == "accuracy":
      metrics[name] = accuracy(labels, predictions)
    elif name == "f1_macro":
      metrics[name] = f1_macro(labels, predictions, len(task.labels))
    elif name == "f1a":
      metrics[name] = f1_score(labels, predictions, positive=1)
    elif name == "exact_match":
      metrics[name] = multirc_exact_match(examples, predictions)
    elif name == "mcc":
      metrics[name] = matthews_corrcoef(labels, predictions)
    elif name == "gender_parity":
      metrics[name] = gender_parity(examples, predictions)
    else:
      raise ValueError(f"{task.name}: unknown metric {name!r}")
  return metrics


def task_score(metrics: dict) -> float | None:
  """One number per task: the mean of its metrics (CB, MultiRC, ReCoRD have two)."""
  return float(np.mean(list(metrics.values()))) if metrics else None


def superglue_average(per_task: dict[str, dict]) -> dict:
  """{"average": mean task score over the main tasks evaluated, "tasks": their names,
  "superglue_score": the same when all eight are there, else None}."""
  scores = {name: task_score(m) for name, m in per_task.items() if name in MAIN_TASKS and m}
  average = float(np.mean(list(scores.values()))) if scores else None
  complete = set(scores) == set(MAIN_TASKS)
  return {"average": average, "average_over": sorted(scores), "superglue_score": average if complete else None}
