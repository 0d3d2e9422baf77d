"""TfdsTask on a registered TFDS dataset (super_glue/rte) with TFDS's mock data: nothing is downloaded."""
import json

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from glam.data.instructions import ClassLabelFields, InstructionMixture, TfdsTask  # noqa: E402


def test_tfds_task_with_label_names_and_flan_templates(tmp_path):
  templates = tmp_path / "templates.json"
  templates.write_text(json.dumps({"rte": [{"input": "{premise}\nDoes it follow that {hypothesis}?\n{options_}",
                                            "target": "{answer}"}]}))
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    task = TfdsTask("rte", "super_glue/rte", preprocess=ClassLabelFields(["yes", "no"]),
                    data_dir=str(tmp_path), max_examples=4)
  assert task.num_examples == 4
  fields = [task.fields(i) for i in range(4)]
  for f in fields:
    assert {"premise", "hypothesis", "label", "idx"} <= set(f)
    assert f["answer"] == ["yes", "no"][int(f["label"])] and f["options_"] == "OPTIONS:\n- yes\n- no"
  mixture = InstructionMixture([task], templates_path=str(templates))
  for i in range(8):
    example = mixture.document(i)
    match = [f for f in fields if example.inputs.startswith(f["premise"] + "\nDoes it follow that ")]
    assert match and example.targets == match[0]["answer"] and example.inputs.endswith("- no")
