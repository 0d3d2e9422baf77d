"""Forgetting report: Lifelong-MoE against naive continued training, loss per domain after each stage.

  stage 1   train an MoE model on the first domains
  stage 2   lifelong: `glam experts grow` (+N experts, noisy copies) and train on the new domain with
            configs/runs/lifelong_stage.gin (old experts and router columns frozen, KL to stage 1);
            naive: the same stage-1 model trained on the new domain, no growth, freezing or distillation

  .venv/bin/python scripts/lifelong_forgetting.py --data=synthetic --size=test   # a few minutes on CPU
  .venv/bin/python scripts/lifelong_forgetting.py --data=text --steps1=300 --steps2=300

--data=synthetic: stage 1 on arithmetic, copy, sentences; stage 2 on reverse (built-in corpus).
--data=text: stage 1 on tinyshakespeare and wiki_demo.txt, stage 2 on c4_demo.jsonl (../shared/data).
Evaluation reads each domain's first documents (the synthetic corpus: held-out seed); for the text
files those documents may also occur in training. Prints the table and one JSON line.
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glam import cli  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
SETTINGS = {
    "synthetic": {
        "stage1": "synthetic:arithmetic,copy,sentences", "stage2": "synthetic:reverse",
        "eval": {name: f"synthetic:{name}" for name in ("arithmetic", "copy", "sentences", "reverse")}},
    "text": {
        "stage1": f"domains:shakespeare={DATA}/tinyshakespeare/input.txt,wiki={DATA}/corpus_extra/wiki_demo.txt",
        "stage2": f"domains:c4={DATA}/corpus_extra/c4_demo.jsonl",
        "eval": {"shakespeare": f"domains:shakespeare={DATA}/tinyshakespeare/input.txt",
                 "wiki": f"domains:wiki={DATA}/corpus_extra/wiki_demo.txt",
                 "c4": f"domains:c4={DATA}/corpus_extra/c4_demo.jsonl"}},
}
SIZES = {  # test: seconds per stage on a CPU; tiny: configs/models/glam_tiny.gin as it is
    "test": ["DecoderLM.d_model=32", "DecoderLM.num_blocks=1", "Attention.num_heads=2", "Attention.head_dim=16",
             "FeedForward.d_ff=64", "MoeLayer.d_ff=64", "MoeLayer.num_experts=4", "train.batch_size=8",
             "train.seq_len=64"],
    "tiny": ["train.batch_size=16", "train.seq_len=128"],
}
COMMON = ["train.num_eval_batches=0", "train.measure_peak=False", "train.progress_bar=False",
          "train.log_every=50", "Checkpointer.save_interval_steps=100000", "DecoderLM.vocab_size=260",
          "constant_then_rsqrt.warmup_steps=20"]


def glam(*args):
  code = cli.main(list(args))
  if code:
    raise SystemExit(f"glam {' '.join(args)}: exit {code}")


def gin_flags(bindings):
  return [f"--gin.{b}" for b in bindings]


def losses(run_dir, evals, batches):
  from glam.eval.lm_eval import evaluate_run
  held_out = ["SyntheticCorpus.seed=1000003"]  # the trainer's held-out synthetic documents
  return {name: evaluate_run(run_dir, data=spec, num_batches=batches, bindings=held_out)["loss"]
          for name, spec in evals.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", choices=sorted(SETTINGS), default="synthetic")
  parser.add_argument("--size", choices=sorted(SIZES), default="test")
  parser.add_argument("--steps1", type=int, default=60)
  parser.add_argument("--steps2", type=int, default=60)
  parser.add_argument("--add", type=int, default=4, help="experts added for stage 2")
  parser.add_argument("--distill_weight", type=float, default=1.0)
  parser.add_argument("--eval_batches", type=int, default=4)
  parser.add_argument("--out_dir", default="/tmp/glam_lifelong")
  args = parser.parse_args(argv)
  setting = SETTINGS[args.data]
  shutil.rmtree(args.out_dir, ignore_errors=True)
  stage1, lifelong, naive = (os.path.join(args.out_dir, name) for name in ("stage1", "lifelong", "naive"))
  base = gin_flags(COMMON + SIZES[args.size])

  glam("train", "--gin_file=configs/runs/pretrain.gin", "--gin_file=configs/models/glam_tiny.gin", *base,
       f"--gin.train.data='{setting['stage1']}'", f"--gin.train.num_steps={args.steps1}", f"--model_dir={stage1}")
  table = {"after stage 1": losses(stage1, setting["eval"], args.eval_batches)}

  from glam.surgery import runs
  from glam.surgery.grow import grow
  grown = grow(stage1, lifelong, args.add, init="noisy_copy", reset_data=True)
  old_experts = grown["experts"][0]
  total = args.steps1 + args.steps2
  # The model comes from each run's config.gin; only the run settings are given again.
  run_settings = gin_flags(COMMON + [b for b in SIZES[args.size] if b.startswith("train.")])
  stage2 = [*run_settings, f"--gin.train.data='{setting['stage2']}'", f"--gin.train.num_steps={total}"]
  glam("train", "--gin_file=configs/runs/pretrain.gin", f"--gin_file={lifelong}/config.gin",
       "--gin_file=configs/runs/lifelong_stage.gin", f"--gin.OLD_EXPERTS={old_experts}",
       # --distill_weight=0: no teacher (train.distill_from and a zero weight together are refused)
       f"--gin.PREVIOUS_STAGE={repr(stage1) if args.distill_weight else None}",
       f"--gin.train.distill_weight={args.distill_weight}", *stage2,
       f"--model_dir={lifelong}")
  table["stage 2, Lifelong-MoE"] = losses(lifelong, setting["eval"], args.eval_batches)

  source = runs.read_run(stage1)  # the same stage-1 model, the input position reset for the new data
  runs.write_run(naive, source.step, source.state, {}, source.config_text, source.metadata)
  glam("train", "--gin_file=configs/runs/pretrain.gin", f"--gin_file={naive}/config.gin", *stage2,
       f"--model_dir={naive}")
  table["stage 2, naive"] = losses(naive, setting["eval"], args.eval_batches)

  names = list(setting["eval"])
  print(f"\n{'loss per domain':<24}" + "".join(f"{n:>13}" for n in names))
  for row, values in table.items():
    print(f"{row:<24}" + "".join(f"{values[n]:13.4f}" for n in names))
  print(json.dumps({"data": args.data, "size": args.size, "steps": [args.steps1, args.steps2], "add": args.add,
                    "experts": grown["experts"], "table": table}))


if __name__ == "__main__":
  main()
