"""SuperGLUE evaluation throughput (examples/s): rank classification and generation, batched
against one example per model call, on small models (--model demo: configs/models/dense_tiny.gin;
micro: the tests' 2-block d_model-32 model).

  python scripts/bench_superglue_eval.py [--model demo|micro] [--tasks rte,copa,wic] [--examples 64]
      [--data_dir DIR] [--max_length 512] [--batch_size 16] [--max_batch_tokens N]

Per task, examples come from --data_dir (FewGLUE or official layout: validation then train) when
it is there, else made-up RTE-shaped ones. Compilation is excluded: every setting runs once to warm
up, then batched and one-at-a-time runs alternate and the fastest of --repeats each counts (the
machine may be shared; the minimum is the least disturbed). "batched" is --batch_size examples and
at most --max_batch_tokens tokens per call (evaluate_superglue's defaults), "one" is one example
per call. Prints one JSON line per task: examples per wall-clock second and per CPU second of
this process.
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
from glam.eval.superglue.scoring import DEFAULT_MAX_BATCH_TOKENS
from glam.eval.superglue.tasks import parse_tasks
from glam.models.lm import DecoderLM

MODELS = {
    "demo": [],  # configs/models/dense_tiny.gin as it is: d_model 128, 4 blocks, ~1M parameters
    "micro": ["DecoderLM.d_model = 32", "DecoderLM.num_blocks = 2", "Attention.num_heads = 2",  # the tests' model
              "Attention.head_dim = 16", "FeedForward.d_ff = 64"],
}
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superglue_fewshot")


def task_examples(task, data_dir: str, count: int) -> tuple[list[dict], str]:
  if data_dir and os.path.isdir(os.path.join(data_dir, task.directory)):
    examples = read_jsonl_split(task, data_dir, "validation").examples
    examples += read_jsonl_split(task, data_dir, "train").examples
    return (examples * (count // len(examples) + 1))[:count], os.path.normpath(data_dir)
  if task.name != "rte":
    raise SystemExit(f"--tasks={task.name}: no {task.directory}/ under --data_dir={data_dir}")
  words = "the committee said on tuesday that profits rose in the first quarter of the year".split()
  return [{"idx": i, "premise": " ".join(words[i % 5:] * 3), "hypothesis": " ".join(words[:6 + i % 4]),
           "label": i % 2} for i in range(count)], "made-up"


def timed_pair(batched, single, repeats: int) -> dict:
  """Wall-clock and CPU seconds (all threads of this process) of the fastest of `repeats` runs of
  each, alternating, so that a change in the machine's load hits both alike; the first runs
  compile and are not timed. On a shared machine the CPU seconds are the steadier measure."""
  batched(), single()
  times = {name: {"wall": [], "cpu": []} for name in ("batched", "one")}
  for _ in range(repeats):
    for name, run in (("batched", batched), ("one", single)):
      wall, cpu = time.perf_counter(), time.process_time()
      run()
      times[name]["wall"].append(time.perf_counter() - wall)
      times[name]["cpu"].append(time.process_time() - cpu)
  return {name: {clock: min(spent) for clock, spent in clocks.items()} for name, clocks in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tasks", default="rte,copa,wic")
  parser.add_argument("--examples", type=int, default=64, help="per task (the data repeat if fewer)")
  parser.add_argument("--data_dir", default=DEFAULT_DATA)
  parser.add_argument("--max_length", type=int, default=512)
  parser.add_argument("--max_new_tokens", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=16, help="examples per model call when batched")
  parser.add_argument("--max_batch_tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                      help="tokens per model call when batched (evaluate_superglue.max_batch_tokens)")
  parser.add_argument("--model", default="demo", choices=sorted(MODELS))
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting; the fastest counts")
  args = parser.parse_args()

  config.parse(["configs/models/dense_tiny.gin"], MODELS[args.model])
  with gin.unlock_config():
    model = DecoderLM(rngs=nnx.Rngs(0))
  vocab = ByteVocabulary()
  parameters = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  for task in parse_tasks(args.tasks):
    examples, source = task_examples(task, args.data_dir, args.examples)
    common = dict(shots=0, seed=0, max_length=args.max_length, prefix_lm=False, progress=None)

    def rank(batch_size, max_batch_tokens):
      return lambda: rank_task(model, vocab, task, examples, [], batch_size=batch_size, length_normalised=True,
                               max_batch_tokens=max_batch_tokens, **common)

    def generate(batch_size, max_batch_tokens):
      return lambda: generate_task(model, vocab, task, examples, [], batch_size=batch_size,
                                   max_new_tokens=args.max_new_tokens, max_batch_tokens=max_batch_tokens, **common)

    result = {"model": args.model, "parameters": parameters, "task": task.name, "data": source,
              "examples": len(examples), "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
              "max_length": args.max_length, "max_new_tokens": args.max_new_tokens}
    for name, make in (("rank", rank), ("generate", generate)):
      seconds = timed_pair(make(args.batch_size, args.max_batch_tokens), make(1, args.max_batch_tokens), args.repeats)
      for clock, unit in (("wall", "s"), ("cpu", "cpu_s")):
        batched, single = (len(examples) / seconds[way][clock] for way in ("batched", "one"))
        result[f"{name}_examples_per_{unit}_batched"] = round(batched, 2)
        result[f"{name}_examples_per_{unit}_one"] = round(single, 2)
        result[f"{name}_{clock}_speedup"] = round(batched / single, 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
