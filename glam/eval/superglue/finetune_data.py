"""SuperGLUE as text-to-text fine-tuning tasks for glam.data.instructions.InstructionMixture.

Each task's training split, cast to (input, target) pairs by prompts.text_to_text_training_pairs
(the T5 cast that `glam eval superglue --mode=generate` decodes against), becomes an ExampleTask
whose pairs are used as they are (no templates). configs/runs/superglue_finetune.gin mixes them.
"""
import gin

from glam.eval.superglue.prompts import text_to_text_training_pairs
from glam.eval.superglue.readers import read_split
from glam.eval.superglue.tasks import parse_tasks


@gin.configurable
def superglue_text_to_text_tasks(tasks: str = "superglue", data_dir: str | None = None,
                                 use_tfds: bool = False, tfds_data_dir: str | None = None,
                                 split: str = "train", max_examples: int | None = None) -> list:
  """One ExampleTask of (input, target) pairs per SuperGLUE task.

  Args:
    tasks: as `--tasks` of `glam eval superglue` (default "superglue": the eight tasks; the
      diagnostics have no training split).
    data_dir: folder in the official release or FewGLUE layout; or use_tfds=True for TFDS
      super_glue/* (tfds_data_dir: TFDS's data folder, default TFDS's own).
    split: the split to learn from (default "train").
    max_examples: at most this many pairs per task (default None: all).
  """
  from glam.data.instructions import ExampleTask
  selected = [task for task in parse_tasks(tasks) if not task.diagnostic]
  result = []
  for task in selected:
    def pairs(task=task):
      examples = read_split(task, split, data_dir=data_dir, use_tfds=use_tfds,
                            tfds_data_dir=tfds_data_dir).examples
      return [pair for example in examples for pair in text_to_text_training_pairs(task, example)]
    result.append(ExampleTask(task.name, pairs, max_examples=max_examples))
  return result
