"""SuperGLUE evaluation throughput (examples/s): rank classification and generation, batched
against one example per model call, on small models (--model demo: configs/models/dense_tiny.gin;
micro: the tests' 2-block d_model-32 model).

  python scripts/bench_superglue_eval.py [--model demo|micro] [--examples 32] [--data_dir DIR] [--max_length 512]

Uses RTE from --data_dir when it is there (FewGLUE or official layout), else made-up RTE-shaped
examples. Compilation is excluded: every setting runs once to warm up, then the fastest of
--repeats timed runs counts.
Prints one JSON line.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gin
import jax
from flax import nnx

from glam import config
from glam.data.vocab import ByteVocabulary
from glam.eval.superglue.readers import read_jsonl_split
from glam.eval.superglue.runner import generate_task, rank_task
from glam.eval.superglue.tasks import TASKS
from glam.models.lm import DecoderLM

MODELS = {
    "demo": [],  # configs/models/dense_tiny.gin as it is: d_model 128, 4 blocks, ~1M parameters
    "micro": ["DecoderLM.d_model = 32", "DecoderLM.num_blocks = 2", "Attention.num_heads = 2",  # the tests' model
              "Attention.head_dim = 16", "FeedForward.d_ff = 64"],
}
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superglue_fewshot")


def rte_examples(data_dir: str, count: int) -> tuple[list[dict], str]:
  task = TASKS["rte"]
  if data_dir and os.path.isdir(os.path.join(data_dir, task.directory)):
    examples = read_jsonl_split(task, data_dir, "validation").examples
    examples += read_jsonl_split(task, data_dir, "train").examples
    return (examples * (count // len(examples) + 1))[:count], data_dir
  words = "the committee said on tuesday that profits rose in the first quarter of the year".split()
  return [{"idx": i, "premise": " ".join(words[i % 5:] * 3), "hypothesis": " ".join(words[:6 + i % 4]),
           "label": i % 2} for i in range(count)], "made-up"


def timed(run, repeats: int) -> float:
  """The fastest of `repeats` runs (this machine is shared: the minimum is the least disturbed)."""
  run()  # compile every shape it needs
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--examples", type=int, default=64)
  parser.add_argument("--data_dir", default=DEFAULT_DATA)
  parser.add_argument("--max_length", type=int, default=512)
  parser.add_argument("--max_new_tokens", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=16, help="examples per model call when batched")
  parser.add_argument("--model", default="demo", choices=sorted(MODELS))
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the fastest counts")
  args = parser.parse_args()

  config.parse(["configs/models/dense_tiny.gin"], MODELS[args.model])
  with gin.unlock_config():
    model = DecoderLM(rngs=nnx.Rngs(0))
  vocab, task = ByteVocabulary(), TASKS["rte"]
  examples, source = rte_examples(args.data_dir, args.examples)
  options = len(task.labels)
  common = dict(shots=0, seed=0, max_length=args.max_length, prefix_lm=False, progress=None)

  def rank(examples_per_call):
    return lambda: rank_task(model, vocab, task, examples, [], batch_size=examples_per_call * options,
                             length_normalised=True, **common)

  def generate(examples_per_call):
    return lambda: generate_task(model, vocab, task, examples, [], batch_size=examples_per_call,
                                 max_new_tokens=args.max_new_tokens, **common)

  result = {"model": args.model, "parameters": sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))),
            "task": "rte", "data": source,
            "examples": len(examples), "batch_size": args.batch_size, "max_length": args.max_length, "max_new_tokens": args.max_new_tokens}
  for name, make in (("rank", rank), ("generate", generate)):
    batched = len(examples) / timed(make(args.batch_size), args.repeats)
    single = len(examples) / timed(make(1), args.repeats)
    result[f"{name}_examples_per_s_batch{args.batch_size}"] = round(batched, 2)
    result[f"{name}_examples_per_s_batch1"] = round(single, 2)
    result[f"{name}_speedup"] = round(batched / single, 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
