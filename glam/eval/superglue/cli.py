"""`glam eval superglue`: SuperGLUE evaluation of a trained checkpoint (the command eval-superglue).

  glam eval superglue --checkpoint=RUN_DIR[/checkpoints/STEP] --tasks=all --shots=0 --data_dir=DIR
  glam eval superglue --checkpoint=RUN_DIR --tasks=rte,cb --tfds --mode=generate

Further settings are gin bindings of `evaluate_superglue` (glam/eval/superglue/runner.py), e.g.
--gin.evaluate_superglue.batch_size=32 or --gin.evaluate_superglue.length_normalised=False.
"""
import json
import os


def add_commands(commands) -> dict:
  parser = commands.add_parser("eval-superglue", help="SuperGLUE: rank classification or generation "
                               "(spelt `glam eval superglue`)")
  parser.add_argument("--checkpoint", required=True,
                      help="a run directory (its latest checkpoint) or a checkpoint step directory")
  parser.add_argument("--tasks", default="all",
                      help="comma-separated: boolq,cb,copa,multirc,record,rte,wic,wsc,axb,axg, or "
                           "all (the eight and both diagnostics), superglue (the eight), diagnostics")
  parser.add_argument("--shots", type=int, default=0, help="demonstrations from the train split")
  parser.add_argument("--data_dir", default=None,
                      help="folder in the official release layout (BoolQ/val.jsonl, ...) or FewGLUE's "
                           "(BoolQ/dev32.jsonl, ...)")
  parser.add_argument("--tfds", action="store_true", help="read TFDS super_glue/* instead of --data_dir")
  parser.add_argument("--tfds_data_dir", default=None, help="TFDS data folder (default: TFDS's own)")
  parser.add_argument("--split", default="validation", choices=["validation", "test", "train"])
  parser.add_argument("--mode", default="rank", choices=["rank", "generate"],
                      help="rank: log-likelihood of each option (GLaM); generate: greedy T5 targets")
  parser.add_argument("--seed", type=int, default=0, help="draws the few-shot demonstrations")
  parser.add_argument("--max_examples", type=int, default=None, help="only the first N examples per task")
  parser.add_argument("--output_dir", default=None,
                      help="default: RUN_DIR/superglue/<mode>_<shots>shot_<split>")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  return {"eval-superglue": run_superglue}


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
  """A run directory or RUN/checkpoints -> (RUN, None: latest); RUN/checkpoints/STEP -> (RUN, STEP)."""
  from glam.train.trainer import CHECKPOINT_SUBDIR
  path = os.path.normpath(os.path.expanduser(path))
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == CHECKPOINT_SUBDIR:
    return os.path.dirname(parent), int(os.path.basename(path))
  if os.path.basename(path) == CHECKPOINT_SUBDIR and not os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    return parent, None  # RUN/checkpoints: the run's latest
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint={path}: no such directory")
  return path, None


def run_superglue(args, bindings) -> int:
  from glam.eval.superglue import runner  # registers the gin configurable before bindings parse
  from glam.eval.superglue.readers import read_split
  from glam.eval.superglue.tasks import DIAGNOSTICS, parse_tasks
  from glam.train.loading import load_trained

  tasks = parse_tasks(args.tasks)  # an unknown name fails before the model loads
  if args.tfds == bool(args.data_dir):
    raise ValueError("give exactly one of --data_dir=DIR and --tfds")
  model_dir, step = resolve_checkpoint(args.checkpoint)

  def read(task, split):
    return read_split(task, split, data_dir=args.data_dir, use_tfds=args.tfds, tfds_data_dir=args.tfds_data_dir)

  # Every file is read and checked before the model loads. Diagnostics come in separate
  # archives: `all` evaluates them only where they are present.
  optional = DIAGNOSTICS if args.tasks.strip().lower() == "all" else ()
  data = runner.load_task_data(tasks, read, split=args.split, shots=args.shots,
                               max_examples=args.max_examples, skip_missing=optional)
  loaded = load_trained(model_dir, step, bindings)
  output_dir = args.output_dir or os.path.join(model_dir, "superglue",
                                               f"{args.mode}_{args.shots}shot_{args.split}")
  header = (f"SuperGLUE, {args.mode}, {args.shots}-shot, {args.split} split: "
            f"{model_dir} step {loaded.step}")
  summary = runner.evaluate_superglue(
      loaded.model, loaded.vocab, data, output_dir, mode=args.mode, shots=args.shots, seed=args.seed,
      progress_bar=not args.no_progress, header=header)
  with open(os.path.join(output_dir, "results.md")) as f:
    print(f.read())
  print(json.dumps({"output_dir": output_dir, "step": loaded.step, "average": summary["average"],
                    "superglue_score": summary["superglue_score"], "tasks": summary["tasks"]}))
  return 0
