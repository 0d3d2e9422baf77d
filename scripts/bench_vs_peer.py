"""glam against Hugging Face Mixtral (PyTorch, CPU): train-step tokens/s at the same shape, back to back.

  python scripts/bench_vs_peer.py --peer_python=/path/to/peer-venv/bin/python [--peer_script=../shared/bench/peer_hf_mixtral.py]

Shape (../shared/bench/README.md): 4 layers, d_model 512, 8 heads, RMSNorm, rotary; every layer's
FFN is an MoE of 8 SwiGLU experts (d_ff 1024), top-2, dropless, load-balancing loss 0.01; vocab
8192 untied; batch 8 x 256; float32; AdamW. Both MFUs use this machine's matmul peak, measured here.
"""
import argparse
import functools
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gin
import jax
import numpy as np
from flax import nnx

from bench_common import random_batch, time_steps
from glam import config
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model, flops_per_token
from glam.train.flops import measure_matmul_peak
from glam.train.optimizers import adamw, make_optimizer
from glam.train.step import make_train_step

SHAPE = ["DecoderLM.vocab_size = 8192", "DecoderLM.d_model = 512", "DecoderLM.num_blocks = 4",
         "DecoderLM.block = ('attn', 'moe')", "DecoderLM.tie_embeddings = False",
         "Attention.num_heads = 8", "Attention.head_dim = 64", "Attention.position = 'rotary'",
         "MoeLayer.num_experts = 8", "MoeLayer.d_ff = 1024", "MoeLayer.activation = 'swiglu'",
         "MoeLayer.router = @TokenChoiceRouter", "TokenChoiceRouter.k = 2",
         "MoeLayer.load_balance_weight = 0.01", "MoeLayer.z_loss_weight = 0.0",
         "MoeLayer.group_size = 2048"]
DISPATCHERS = {"dropless": "MoeLayer.dispatcher = @Dropless()",  # auto: the padded layout on CPU
               "dropless_blocked": "MoeLayer.dispatcher = @Dropless()\nDropless.implementation = 'blocked'",
               "capacity_1.25": "MoeLayer.dispatcher = @CapacityEinsum()\nCapacityEinsum.capacity_factor = 1.25"}


def glam_tokens_per_s(dispatcher: str, batch: int, seq_len: int, steps: int):
  config.parse([], SHAPE + [DISPATCHERS[dispatcher]])
  with gin.unlock_config():
    model = DecoderLM(rngs=nnx.Rngs(0))
    info = abstract_model(DecoderLM)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  optimizer = make_optimizer(optimizer=functools.partial(adamw, learning_rate=1e-4), skip_nonfinite=False)
  train_state = {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}
  step = jax.jit(make_train_step(graphdef, optimizer), donate_argnums=(0,))
  _, step_s, _ = time_steps(step, train_state, random_batch(batch, seq_len, 8192), steps)
  return batch * seq_len / step_s, flops_per_token(info, seq_len)["train"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--peer_python", required=True, help="python of a venv with torch and transformers")
  parser.add_argument("--peer_script", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                            "bench", "peer_hf_mixtral.py"))
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args()
  peak = measure_matmul_peak()
  peer = subprocess.run([args.peer_python, args.peer_script, "--steps", str(args.steps)],
                        capture_output=True, text=True, check=True).stdout
  peer_tps = float(re.search(r"tokens_per_s=([0-9.]+)", peer).group(1))
  for dispatcher in DISPATCHERS:
    tps, flops = glam_tokens_per_s(dispatcher, 8, 256, args.steps)
    print(json.dumps({"dispatcher": dispatcher, "glam_tokens_per_s": round(tps), "peer_tokens_per_s": round(peer_tps),
                      "glam_over_peer": round(tps / peer_tps, 3), "glam_mfu": round(flops * tps / peak, 4),
                      "peer_mfu": round(flops * peer_tps / peak, 4), "matmul_peak_tflops": round(peak / 1e12, 4),
                      "peer_output": peer.strip()}), flush=True)


if __name__ == "__main__":
  main()
