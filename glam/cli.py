"""The `glam` command. T5X-style flags: --gin_file (repeatable), --gin.NAME=VALUE, --gin_search_path.

  glam train    --gin_file=configs/runs/pretrain.gin --gin_file=configs/models/dense_tiny.gin --model_dir=DIR
  glam eval     --model_dir=DIR [--data=SPEC]        loss / perplexity per domain
  glam generate --model_dir=DIR --prompt=TEXT        greedy or sampled continuation (KV cache)
  glam vocab train --input=SPEC --model_prefix=P --vocab_size=N
  glam model summary --gin_file=...                  parameter counts and FLOPs per token
  glam report routing --model_dir=DIR                PNG heatmap of expert load per MoE layer
  glam experts grow --from=RUN --to=DIR --add=N      Lifelong-MoE growth; `experts upcycle`: dense -> MoE
  glam demo                                          a small model on the built-in corpus, end to end

Environment: the command restarts itself once so that glibc's malloc uses transparent huge pages
(9-17% faster CPU steps; GLAM_HUGE_PAGES=0 turns it off; glam/train/huge_pages.py).
GLAM_RETAIN_HOST_MEMORY=1 keeps freed host memory in the process, so long CPU runs stop
page-faulting XLA's per-step temporaries (slower compiles; see README, "The glam command").
On one CPU device float32 matmuls, and the experts' whole FFN, run on oneMKL (Intel CPUs) or OpenBLAS
(others) through custom calls compiled on first use into GLAM_KERNEL_CACHE (default
~/.cache/glam/kernels; another CBLAS library: GLAM_CBLAS_LIBRARY; OpenBLAS's kernels:
GLAM_OPENBLAS_CORETYPE; XLA's own dots: --gin.matmul.backend="'xla'"; README, "CBLAS matmuls"). JAX_COMPILATION_CACHE_DIR=DIR lets a rerun load its compiled programs from DIR.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; later files win)")
  parser.add_argument("--gin_search_path", action="append", default=[], help="folder to look for gin files in")
  parser.add_argument("--gin_bindings", action="append", default=[], help="a binding NAME=VALUE (repeatable)")


def split_gin_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Pulls `--gin.NAME=VALUE` flags out of argv (argparse cannot declare them)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      bindings.append(arg[len("--gin."):])
    elif arg.startswith("--gin."):
      raise SystemExit(f"glam: {arg}: expected --gin.NAME=VALUE")
    else:
      rest.append(arg)
  return rest, bindings


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="glam", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)

  train = commands.add_parser("train", help="train (or resume) a model")
  gin_arguments(train)
  train.add_argument("--model_dir", required=True, help="run directory: checkpoints, config, metrics")
  train.add_argument("--dry_run", action="store_true",
                     help="print the mesh, each parameter's sharding and per-device memory; allocate nothing")

  evaluate = commands.add_parser("eval", help="loss / perplexity of a trained model")
  evaluate.add_argument("--model_dir", required=True)
  evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  evaluate.add_argument("--data", default=None, help="source spec (default: the run's held-out data)")
  evaluate.add_argument("--num_batches", type=int, default=8)
  evaluate.add_argument("--batch_size", type=int, default=None)
  evaluate.add_argument("--seq_len", type=int, default=None)
  evaluate.add_argument("--output", default=None, help="also write the results as JSON here")

  generate = commands.add_parser("generate", help="continue prompts with a trained model")
  generate.add_argument("--model_dir", required=True)
  generate.add_argument("--step", type=int, default=None)
  generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
  generate.add_argument("--max_new_tokens", type=int, default=64)
  generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  generate.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
  generate.add_argument("--seed", type=int, default=0)

  vocab = commands.add_parser("vocab", help="SentencePiece vocabularies")
  vocab_commands = vocab.add_subparsers(dest="vocab_command", required=True)
  vocab_train = vocab_commands.add_parser("train", help="train a SentencePiece model on a source")
  vocab_train.add_argument("--input", required=True, help="source spec: a file glob, tfds:NAME, synthetic")
  vocab_train.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
  vocab_train.add_argument("--vocab_size", type=int, required=True)
  vocab_train.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char", "word"])
  vocab_train.add_argument("--max_documents", type=int, default=100_000)

  model = commands.add_parser("model", help="inspect a model config")
  model_commands = model.add_subparsers(dest="model_command", required=True)
  summary = model_commands.add_parser("summary", help="parameter counts and FLOPs per token")
  gin_arguments(summary)
  summary.add_argument("--seq_len", type=int, default=None, help="for attention FLOPs (default: train.seq_len)")
  summary.add_argument("--per_parameter", action="store_true", help="list every parameter's shape and axes")
  summary.add_argument("--mesh", action="store_true",
                       help="also the sharding on the gin-configured mesh and per-device memory (as train --dry_run)")

  report = commands.add_parser("report", help="plots from a run directory")
  report_commands = report.add_subparsers(dest="report_command", required=True)
  routing = report_commands.add_parser("routing", help="PNG heatmap of expert load per MoE layer over steps")
  routing.add_argument("--model_dir", required=True)
  routing.add_argument("--output", default=None, help="PNG path (default MODEL_DIR/routing.png)")

  demo = commands.add_parser("demo", help="train a small model on the built-in corpus, evaluate, generate")
  demo.add_argument("--model_dir", default="runs/demo")
  gin_arguments(demo)
  parser.commands = commands  # extension modules add their command groups here
  return parser


# Command groups that live beside the code they drive. Each module defines
# `add_commands(commands) -> {command name: handler(args, bindings) -> exit code}`, importing
# its heavy dependencies inside the handlers so that `glam --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = ("glam.surgery.cli", "glam.surgery.mode_cli", "glam.eval.superglue.cli")


def extension_handlers(commands) -> dict:
  import importlib
  handlers = {}
  for name in COMMAND_MODULES:
    handlers.update(importlib.import_module(name).add_commands(commands))
  return handlers


def spell_subcommand(rest: list[str]) -> list[str]:
  """`glam eval superglue ...` is parsed as the command `eval-superglue`: plain `glam eval` keeps
  its own flags, so evaluation suites are separate commands with a two-word spelling."""
  if len(rest) >= 2 and rest[0] == "eval" and not rest[1].startswith("-"):
    return [f"eval-{rest[1]}"] + rest[2:]
  return rest


def parse_gin(args, bindings) -> None:
  from glam import config
  config.parse(args.gin_file, list(args.gin_bindings) + bindings, args.gin_search_path)


def run_train(args, bindings) -> int:
  from glam.train.trainer import train
  parse_gin(args, bindings)
  if args.dry_run:
    from glam.parallel.plan import print_plan
    return print_plan()
  from glam.parallel.distributed import initialize_distributed
  initialize_distributed()  # multi-process runs (launch/*.sh); a no-op otherwise
  result = train(args.model_dir)
  print(json.dumps({"step": result["step"], **{f"eval/{k}": v for k, v in result["eval"].items()}}))
  return 0


def run_eval(args, bindings) -> int:
  from glam.eval.lm_eval import evaluate_run
  results = evaluate_run(args.model_dir, data=args.data, num_batches=args.num_batches,
                         batch_size=args.batch_size, seq_len=args.seq_len, step=args.step, bindings=bindings)
  print_eval_table(results)
  if args.output:
    from glam.config import save_text
    save_text(args.output, json.dumps(results, indent=1))
  print(json.dumps(results))
  return 0


def print_eval_table(results: dict) -> None:
  domains = sorted(k.split("/", 1)[1] for k in results if k.startswith("loss/"))
  print(f"{'domain':<14} {'loss':>8} {'ppl':>9} {'accuracy':>9}")
  for name in domains:
    loss = results[f"loss/{name}"]
    print(f"{name:<14} {loss:8.4f} {min(2.718281828 ** loss, 1e9):9.3f} {results[f'accuracy/{name}']:9.3f}")
  print(f"{'all':<14} {results['loss']:8.4f} {results['perplexity']:9.3f} {results['accuracy']:9.3f}")


def run_generate(args, bindings) -> int:
  from glam.models.decode import generate
  from glam.train.loading import load_trained
  loaded = load_trained(args.model_dir, args.step, bindings)
  prompts = [loaded.vocab.encode(p) for p in args.prompt]
  outputs = generate(loaded.model, prompts, args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, seed=args.seed, eos_id=loaded.vocab.eos_id)
  for prompt, ids in zip(args.prompt, outputs):
    print(json.dumps({"prompt": prompt, "continuation": loaded.vocab.decode(ids)}))
  return 0


def run_vocab_train(args, bindings) -> int:
  from glam.data.sources import source_from_spec
  from glam.data.vocab import train_sentencepiece
  source = source_from_spec(args.input)
  count = args.max_documents if source.num_documents is None else min(source.num_documents, args.max_documents)
  path = train_sentencepiece((source.document(i).text for i in range(count)), args.model_prefix,
                             args.vocab_size, model_type=args.model_type)
  print(json.dumps({"model": path, "vocab_size": args.vocab_size, "documents": count}))
  return 0


def run_model_summary(args, bindings) -> int:
  import gin
  from glam.models.lm import DecoderLM
  from glam.models.summary import abstract_model, count_parameters, flops_per_token, parameter_rows
  from glam.train.loading import binding
  parse_gin(args, bindings)
  factory = binding("train.model", DecoderLM)
  seq_len = args.seq_len or binding("train.seq_len", 128)
  with gin.unlock_config():
    model = abstract_model(factory)
  if args.per_parameter:
    for path, shape, axes, count in parameter_rows(model):
      print(f"{path:<40} {str(shape):<24} {str(axes):<44} {count:>14,}")
  counts = count_parameters(model)
  flops = flops_per_token(model, seq_len)
  print(f"total parameters:      {counts['total']:>16,}")
  print(f"activated per token:   {counts['activated']:>16,}")
  print(f"embedding parameters:  {counts['embedding']:>16,}")
  print(f"train FLOPs per token: {flops['train']:>16,.0f}  (seq_len {seq_len})")
  print(json.dumps({**counts, "train_flops_per_token": flops["train"], "seq_len": seq_len}))
  if args.mesh:
    from glam.parallel.plan import print_plan
    return print_plan()
  return 0


def run_report(args, bindings) -> int:
  from glam.report.routing import plot_routing
  path = plot_routing(args.model_dir, args.output)
  print(json.dumps({"routing_plot": path}))
  return 0


def run_demo(args, bindings) -> int:
  from glam.demo import demo
  args.gin_file = ["configs/runs/demo.gin"] + args.gin_file
  parse_gin(args, bindings)
  demo(args.model_dir)
  return 0


def main(argv: list[str] | None = None) -> int:
  from glam.train.host_memory import retain_freed_host_memory
  from glam.train.huge_pages import reexec_with_huge_pages
  try:
    if argv is None:  # run as the command, not called from Python: restart with huge-page malloc
      reexec_with_huge_pages()
    retain_freed_host_memory()  # if GLAM_RETAIN_HOST_MEMORY=1; before XLA starts its threads
  except ValueError as error:  # a bad environment variable
    print(f"glam: error: {error}", file=sys.stderr)
    return 2
  argv = sys.argv[1:] if argv is None else argv
  rest, bindings = split_gin_overrides(argv)
  parser = build_parser()
  handlers = {"train": run_train, "eval": run_eval, "generate": run_generate, "demo": run_demo,
              "vocab": run_vocab_train, "model": run_model_summary,
              "report": run_report}
  handlers.update(extension_handlers(parser.commands))
  args = parser.parse_args(spell_subcommand(rest))
  from glam.config import ConfigError
  try:
    return handlers[args.command](args, bindings)
  except (ConfigError, FileNotFoundError, ValueError) as error:
    print(f"glam {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
