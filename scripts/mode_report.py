"""MoDE against full fine-tuning: target-domain and retention loss, with parameter counts.

  .venv/bin/python scripts/mode_report.py --data=synthetic [--workdir=runs/mode_report]
  .venv/bin/python scripts/mode_report.py --data=real      # ../shared/data: shakespeare + wiki + c4

1. a backbone (configs/models/dense_tiny.gin) trains on the backbone domain;
2. per target domain: one MoDE expert (configs/runs/mode_expert.gin: backbone frozen) and, as the
   baseline, full fine-tuning of the whole backbone (train.init_checkpoint, nothing frozen), with
   the same steps and data;
3. `glam mode compose` joins the experts; a short run on the mixture trains only the gate
   (configs/runs/mode_compose.gin);
4. every model is evaluated on held-out text of every domain: "target" is the loss on the domain
   a model was adapted to, "retention" the loss on the backbone's domain.
Prints a table and one JSON line per model, then a summary JSON line.
"""
import argparse
import json
import os
import shutil
import sys

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glam import cli  # noqa: E402
from glam.data.pipeline import eval_batches  # noqa: E402
from glam.data.sources import TextFiles  # noqa: E402
from glam.data.synthetic import SyntheticCorpus  # noqa: E402
from glam.models.summary import count_parameters  # noqa: E402
from glam.train.loading import load_trained  # noqa: E402
from glam.train.step import make_eval_step  # noqa: E402
from glam.train.trainer import HELD_OUT_SEED_OFFSET, evaluate  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
REAL_FILES = {"shakespeare": "tinyshakespeare/input.txt", "wiki": "corpus_extra/wiki_demo.txt",
              "c4": "corpus_extra/c4_demo.jsonl"}
HELD_OUT_FRACTION = 0.1  # the last 10% of each real file's documents are held out


def split_real(workdir: str) -> dict[str, tuple[str, object]]:
  """Writes train / held-out files per real domain: {domain: (train spec, held-out source)}."""
  domains = {}
  for name, relative in REAL_FILES.items():
    path = os.path.join(SHARED, relative)
    if not os.path.exists(path):
      raise SystemExit(f"mode_report: {path} not found (the real-text benchmark needs ../shared/data)")
    texts = TextFiles(path).texts
    cut = len(texts) - max(1, int(len(texts) * HELD_OUT_FRACTION))
    folder = os.path.join(workdir, "data", name)
    os.makedirs(folder, exist_ok=True)
    for part, rows in (("train", texts[:cut]), ("heldout", texts[cut:])):
      with open(os.path.join(folder, f"{part}.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    domains[name] = (os.path.join(folder, "train.jsonl"),
                     TextFiles(os.path.join(folder, "heldout.jsonl"), domain=name))
  return domains


def synthetic_domains() -> dict[str, tuple[str, object]]:
  names = ("sentences", "arithmetic", "copy")  # the first is the backbone's domain
  return {n: (f"synthetic:{n}", SyntheticCorpus(seed=HELD_OUT_SEED_OFFSET, domains=(n,))) for n in names}


def glam(*args) -> None:
  code = cli.main([str(a) for a in args])
  if code != 0:
    raise SystemExit(f"mode_report: glam {' '.join(map(str, args))} exited {code}")


def evaluate_dir(model_dir: str, domains: dict, args) -> dict:
  loaded = load_trained(model_dir)
  graphdef, params = nnx.split(loaded.model)
  eval_step = jax.jit(make_eval_step(graphdef, 1))
  losses = {}
  for name, (_, source) in domains.items():
    batches = eval_batches(source, loaded.vocab, args.batch_size, args.seq_len, num_batches=args.eval_batches)
    losses[name] = evaluate(eval_step, params, batches, (name,))["loss"]
  counts = count_parameters(loaded.model)
  experts = nnx.to_pure_dict(nnx.state(loaded.model)).get("domain_experts", {})
  size = lambda tree: int(sum(leaf.size for leaf in jax.tree.leaves(tree)))
  return {"losses": losses, "total_parameters": counts["total"], "expert_parameters": size(experts),
          "gate_parameters": size(experts.get("gate", {}))}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
  parser.add_argument("--workdir", default="runs/mode_report")
  parser.add_argument("--backbone_steps", type=int, default=300)
  parser.add_argument("--expert_steps", type=int, default=150)
  parser.add_argument("--compose_steps", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--eval_batches", type=int, default=4)
  args = parser.parse_args(argv)
  workdir = os.path.join(args.workdir, args.data)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  domains = split_real(workdir) if args.data == "real" else synthetic_domains()
  backbone_domain, targets = list(domains)[0], list(domains)[1:]
  common = ["--gin_file=configs/runs/pretrain.gin", f"--gin.train.batch_size={args.batch_size}",
            f"--gin.train.seq_len={args.seq_len}", "--gin.train.num_eval_batches=0",
            "--gin.train.measure_peak=False", "--gin.train.progress_bar=False", "--gin.train.log_every=50",
            "--gin.Checkpointer.keep_last=1"]
  run = lambda name: os.path.join(workdir, name)
  data = lambda domain: f"--gin.train.data='{domains[domain][0]}'"

  glam("train", *common, "--gin_file=configs/models/dense_tiny.gin", data(backbone_domain),
       f"--gin.train.num_steps={args.backbone_steps}", f"--model_dir={run('backbone')}")
  init = f"--gin.train.init_checkpoint='{run('backbone')}'"
  for domain in targets:
    glam("train", *common, "--gin_file=configs/models/mode_tiny.gin", "--gin_file=configs/runs/mode_expert.gin",
         data(domain), init, f"--gin.train.num_steps={args.expert_steps}", f"--model_dir={run('expert_' + domain)}")
    glam("train", *common, "--gin_file=configs/models/dense_tiny.gin", data(domain), init,
         f"--gin.train.num_steps={args.expert_steps}", f"--model_dir={run('finetune_' + domain)}")
  glam("mode", "compose", f"--backbone={run('backbone')}",
       "--experts=" + ",".join(run("expert_" + d) for d in targets), f"--to={run('composed')}")
  mixture = ",".join(domains) if args.data == "synthetic" else None
  mixed = (f"--gin.train.data='synthetic:{mixture}'" if mixture else
           f"--gin.train.data='{os.path.join(workdir, 'data', '*', 'train.jsonl')}'")
  glam("train", *common, "--gin_file=configs/models/mode_tiny.gin", "--gin_file=configs/runs/mode_compose.gin",
       mixed, f"--gin.MoDELM.num_domains={len(targets)}", f"--gin.train.init_checkpoint='{run('composed')}'",
       f"--gin.train.num_steps={args.compose_steps}", f"--model_dir={run('mode')}")

  models = {"backbone": None, **{f"expert_{d}": d for d in targets}, **{f"finetune_{d}": d for d in targets},
            "composed": "all", "mode": "all"}
  rows = {}
  print(f"{'model':<22} {'trained params':>14} " + " ".join(f"{d:>12}" for d in domains))
  for name, target in models.items():
    result = evaluate_dir(run(name), domains, args)
    # Parameters the run trained: an expert (and its gate), everything (backbone, fine-tuning),
    # nothing (compose), the gate (the composition run).
    trained = {"expert": result["expert_parameters"], "composed": 0, "mode": result["gate_parameters"]}.get(
        name.split("_")[0], result["total_parameters"])
    row = {"model": name, "target": target, "trained_parameters": trained, **result}
    rows[name] = row
    print(f"{name:<22} {str(trained):>14} " + " ".join(f"{result['losses'][d]:12.4f}" for d in domains))
    print(json.dumps(row))
  summary = {"data": args.data, "backbone_domain": backbone_domain, "steps": {
      "backbone": args.backbone_steps, "expert": args.expert_steps, "compose": args.compose_steps},
      "batch_size": args.batch_size, "seq_len": args.seq_len}
  for d in targets:
    for method in ("expert", "finetune"):
      losses = rows[f"{method}_{d}"]["losses"]
      summary[f"{method}/{d}/target"] = losses[d]
      summary[f"{method}/{d}/retention"] = losses[backbone_domain]
    summary[f"mode/{d}/target"] = rows["mode"]["losses"][d]
  summary["mode/retention"] = rows["mode"]["losses"][backbone_domain]
  summary["backbone/retention"] = rows["backbone"]["losses"][backbone_domain]
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
