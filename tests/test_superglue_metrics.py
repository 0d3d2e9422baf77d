"""SuperGLUE metrics against hand-computed values and scikit-learn."""
import numpy as np
import pytest

from glam.eval.superglue import metrics
from glam.eval.superglue.tasks import TASKS

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_accuracy_and_invalid_predictions_count_as_wrong():
  assert metrics.accuracy([1, 0, 1, 1], [1, 0, 0, None]) == 50.0


def test_cb_macro_f1_hand_computed():
  # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 1, fp 0, fn 0 -> 1; class 2: tp 0, fp 1, fn 1 -> 0.
  labels, predictions = [0, 0, 1, 2], [0, 2, 1, 0]
  assert metrics.f1_macro(labels, predictions, 3) == pytest.approx(100 * (0.5 + 1 + 0) / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_and_mcc_match_scikit_learn(seed):
  rng = np.random.default_rng(seed)
  labels, predictions = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
  assert metrics.f1_macro(labels, predictions, 3) == pytest.approx(
      100 * sklearn_metrics.f1_score(labels, predictions, average="macro", labels=[0, 1, 2]))
  binary_labels, binary_predictions = labels % 2, predictions % 2
  assert metrics.f1_score(binary_labels, binary_predictions) == pytest.approx(
      100 * sklearn_metrics.f1_score(binary_labels, binary_predictions))
  assert metrics.matthews_corrcoef(binary_labels, binary_predictions) == pytest.approx(
      100 * sklearn_metrics.matthews_corrcoef(binary_labels, binary_predictions))
  # an invalid prediction (None) is a third class for MCC, as scikit-learn sees a -1
  with_invalid = [None if i % 7 == 0 else int(p) for i, p in enumerate(binary_predictions)]
  assert metrics.matthews_corrcoef(binary_labels, with_invalid) == pytest.approx(
      100 * sklearn_metrics.matthews_corrcoef(binary_labels, [-1 if p is None else p for p in with_invalid]))


def test_mcc_hand_computed_and_degenerate():
  # tp 2, tn 1, fp 1, fn 0: (2*1 - 1*0) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 2 / sqrt(3*2*2*1)
  assert metrics.matthews_corrcoef([1, 1, 0, 0], [1, 1, 1, 0]) == pytest.approx(100 * 2 / np.sqrt(12))
  assert metrics.matthews_corrcoef([1, 0, 1], [1, 1, 1]) == 0.0  # one predicted class: defined as 0


def multirc_example(paragraph, question, answer, label):
  return {"idx": {"paragraph": paragraph, "question": question, "answer": answer}, "label": label}


def test_multirc_f1a_over_all_answers_and_exact_match_per_question():
  examples = [multirc_example(0, 0, 0, 1), multirc_example(0, 0, 1, 0),  # question 0: both right
              multirc_example(0, 1, 2, 1), multirc_example(0, 1, 3, 1),  # question 1: one wrong
              multirc_example(1, 0, 4, 0)]                               # paragraph 1's question 0: right
  predictions = [1, 0, 1, 0, 0]
  result = metrics.task_metrics(TASKS["multirc"], examples, predictions)
  # over all answers: tp 2, fp 0, fn 1 -> F1 = 4 / 5
  assert result["f1a"] == pytest.approx(80.0)
  assert result["f1a"] == pytest.approx(100 * sklearn_metrics.f1_score([e["label"] for e in examples], predictions))
  assert result["exact_match"] == pytest.approx(100 * 2 / 3)


def test_record_token_f1_and_exact_match_max_over_answers():
  examples = [{"idx": {"passage": 0, "query": 0}, "answers": ["Barack Obama", "Obama"], "label": None},
              {"idx": {"passage": 0, "query": 1}, "answers": ["the United States"], "label": None}]
  # 1: "obama" matches the second answer exactly; 2: "United Kingdom" vs "united states": 1 of 2 tokens
  result = metrics.task_metrics(TASKS["record"], examples, ["Obama.", "United Kingdom"])
  assert result["exact_match"] == pytest.approx(50.0)
  assert result["f1"] == pytest.approx(100 * (1.0 + 0.5) / 2)
  assert metrics.normalize_answer("The  U.S.  Army!") == "us army"


def test_axg_gender_parity_over_pairs_and_accuracy():
  examples = [{"idx": i, "label": label} for i, label in enumerate([0, 0, 1, 1, 0, 0])]
  result = metrics.task_metrics(TASKS["axg"], examples, [0, 0, 1, 0, 1, 1])
  assert result["gender_parity"] == pytest.approx(100 * 2 / 3)  # pairs (0,1) (4,5) agree, (2,3) not
  assert result["accuracy"] == pytest.approx(50.0)


def test_superglue_average_averages_two_metric_tasks_first():
  per_task = {name: {"accuracy": 60.0} for name in ("boolq", "copa", "rte", "wic", "wsc")}
  per_task.update(cb={"accuracy": 80.0, "f1_macro": 40.0}, multirc={"f1a": 70.0, "exact_match": 30.0},
                  record={"f1": 90.0, "exact_match": 70.0}, axb={"mcc": 10.0})
  result = metrics.superglue_average(per_task)
  expected = (5 * 60 + 60 + 50 + 80) / 8  # AX-b stays out
  assert result["superglue_score"] == pytest.approx(expected) and result["average"] == pytest.approx(expected)
  partial = metrics.superglue_average({"boolq": {"accuracy": 50.0}, "cb": {"accuracy": 70.0, "f1_macro": 30.0}})
  assert partial["superglue_score"] is None and partial["average"] == pytest.approx(50.0)
  assert partial["average_over"] == ["boolq", "cb"]


def test_unlabelled_split_has_no_metrics():
  assert metrics.task_metrics(TASKS["rte"], [{"idx": 0, "label": None}], [1]) == {}
