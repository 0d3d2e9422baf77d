"""The training loop: build, restore, then step / log / evaluate / checkpoint until done.

Read top to bottom it is the algorithm: every piece it calls is a small module of its own.
"""
import functools
import os
import signal
import sys
import time
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glam import config as glam_config
from glam.data.pipeline import LmPipeline, eval_batches
from glam.data.sources import source_from_spec
from glam.data.synthetic import SyntheticCorpus
from glam.data.vocab import get_vocabulary
from glam.kernels.matmul import describe_backend
from glam.models.lm import DecoderLM
from glam.models.summary import abstract_model, count_parameters, flops_per_token
from glam.train.checkpoint import Checkpointer
from glam.train.init_checkpoint import init_from_checkpoint
from glam.train.layer_layout import per_layer_layout
from glam.parallel.distributed import gather_process_states
from glam.parallel.mesh import check_batch_divides, make_mesh
from glam.parallel.sharding import abstract_with_shardings
from glam.parallel.train_state import constrain_outputs, global_batch, on_mesh, place_state, train_state_shardings
from glam.train.flops import measure_matmul_peak
from glam.train.distill import check_distillation, load_teacher, place_teacher
from glam.train.freezing import freeze_updates
from glam.train.metrics import MetricWriter
from glam.train.optimizers import make_optimizer
from glam.train.progress import Progress
from glam.train.routing_log import append_routing, split_routing_metrics
from glam.train.step import DEFAULT_LOG_EVERY, make_eval_step, make_train_step

CHECKPOINT_SUBDIR = "checkpoints"


HELD_OUT_SEED_OFFSET = 1_000_003


def held_out_source(data: str, eval_data: str | None):
  """The evaluation source: `eval_data` if given; for "auto", the synthetic corpus (same domains)
  with another seed when training on it, and nothing for other data (name it explicitly)."""
  if eval_data != "auto":
    return source_from_spec(eval_data) if eval_data else None
  source = source_from_spec(data)
  if isinstance(source, SyntheticCorpus):
    return SyntheticCorpus(seed=source.seed + HELD_OUT_SEED_OFFSET, domains=source.domain_names)
  return None


class StopRequested:
  """Turns SIGTERM / SIGINT into a flag the loop checks, so it can checkpoint before exiting."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def __bool__(self):
    return self.signal is not None


def data_state_key(process_index: int) -> str:
  # Each process owns its own row slots, so input positions are kept per process.
  # (Multi-host saving of every process's entry is the distributed issue's work.)
  return f"process_{process_index}"


def build_model(model_factory: Callable, seed: int) -> tuple[nnx.GraphDef, dict]:
  graphdef, state = nnx.split(model_factory(rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def check_vocab_fits(vocab_size: int, vocab) -> None:
  glam_config.check(vocab_size >= vocab.size, "DecoderLM.vocab_size", vocab_size,
                    f"smaller than the vocabulary ({vocab.size} ids, {vocab.fingerprint})")


@gin.configurable(denylist=["model_dir"])
def train(model_dir: str, *, num_steps: int = 1000, batch_size: int = 16, seq_len: int = 128,
          data: str = "synthetic", eval_data: str | None = "auto", vocab_path: str | None = None,
          seed: int = 0, data_seed: int = 0, log_every: int = DEFAULT_LOG_EVERY, eval_every: int = 200,
          num_eval_batches: int = 4, grad_accum_steps: int = 1, z_loss: float = 0.0,
          model: Callable = DecoderLM, measure_peak: bool = True, progress_bar: bool = True,
          stop_after: int | None = None, init_checkpoint: str | None = None,
          init_allow_missing: tuple = (), distill_from: str | None = None,
          distill_weight: float = 0.0) -> dict:
  """Trains `model` on `data` in `model_dir`, resuming from its latest checkpoint if any.

  Args:
    num_steps: total optimizer steps (a resumed run counts from its checkpoint).
    batch_size: global rows per step; seq_len: tokens per row (documents are packed).
    data: a source spec: "synthetic", "synthetic:arithmetic,copy", "tfds:NAME[:SPLIT]", or a file glob.
    eval_data: held-out spec; "auto" = the synthetic corpus with another seed (none for other data).
    vocab_path: a SentencePiece model, or None for bytes.
    seed: parameter init and dropout; data_seed: document order.
    log_every / eval_every: steps between metric writes / evaluations.
    grad_accum_steps: micro-batches per update (batch_size must divide by it).
    z_loss: output-logit z-loss coefficient (0 = off; praxis GLaM uses 1e-4).
    measure_peak: time a matmul at start so that model-FLOP utilisation can be reported.
    stop_after: stop (with a checkpoint) after this many steps of *this* run; for tests and schedulers.
    init_checkpoint: start from this run's / checkpoint's parameters (fresh optimizer and step) when
      model_dir has no checkpoint yet (default None); init_allow_missing: regexes of parameter
      paths that may be absent from it and keep their fresh init (glam/train/init_checkpoint.py).
    distill_from: a previous-stage run directory; its frozen model's next-token distribution
      regularises this one: + distill_weight * KL(p_old || p_new) (glam/train/distill.py).
    distill_weight: lambda; 0 (default) = no distillation. Both or neither must be set, so a stage
      config never drops its distillation silently (check_distillation). configs/runs/lifelong_stage.gin
      binds 1.0: Lifelong-MoE's value is not in our sources (specs/moe-papers.md section 4); 1.0 weighs
      the KL like the LM loss, as in Learning without Forgetting (Li & Hoiem 2017).
  Returns the last train metrics and the final eval results.
  """
  glam_config.check(num_steps > 0, "train.num_steps", num_steps, "must be positive")
  glam_config.check(batch_size % grad_accum_steps == 0, "train.grad_accum_steps", grad_accum_steps,
                    f"must divide train.batch_size={batch_size}")
  check_distillation(distill_from, distill_weight)
  os.makedirs(model_dir, exist_ok=True)
  process_index, process_count = jax.process_index(), jax.process_count()

  # 1. Data and vocabulary.
  vocab = get_vocabulary(vocab_path)
  source = source_from_spec(data)
  pipeline = LmPipeline(source, vocab, batch_size, seq_len, seed=data_seed,
                        process_index=process_index, process_count=process_count)
  eval_source = held_out_source(data, eval_data)
  eval_set = (eval_batches(eval_source, vocab, batch_size, seq_len, num_batches=num_eval_batches)
              if eval_source is not None and num_eval_batches > 0 else [])
  domains = eval_source.domain_names if eval_source is not None else pipeline.domain_names

  # 2. Model and optimizer (the parameters live in a plain dict so that they checkpoint as-is).
  graphdef, params = build_model(model, seed)
  model_info = abstract_model(model, seed)
  check_vocab_fits(model_info.vocab_size, vocab)
  optimizer = freeze_updates(make_optimizer(), model_info)  # freeze.patterns / first_experts
  state = {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}
  # Shardings from the parameters' logical axes (configs/mesh/*.gin; default: one device).
  mesh = make_mesh()
  check_batch_divides(batch_size, mesh)
  if process_index == 0:
    print(f"glam: float32 matmuls on {describe_backend(jnp.float32)}", file=sys.stderr)
  shardings = train_state_shardings(state, model_info, mesh)
  state = place_state(state, shardings)
  eval_set = [global_batch(b, mesh, process_local=False) for b in eval_set]

  # 3. Resume from the latest good checkpoint, if there is one.
  checkpointer = Checkpointer(os.path.join(model_dir, CHECKPOINT_SUBDIR))
  metadata = {"vocab": vocab.fingerprint, "vocab_size": vocab.size}
  if checkpointer.latest_step() is not None:
    restored = checkpointer.restore(abstract_with_shardings(state, shardings))  # onto this run's mesh
    if restored.metadata and restored.metadata.get("vocab") not in (None, vocab.fingerprint):
      raise ValueError(f"{model_dir}: the checkpoint was trained with vocabulary {restored.metadata['vocab']}, "
                       f"this run uses {vocab.fingerprint}; set train.vocab_path to the original vocabulary")
    state = restored.state
    saved_position = restored.data_state.get(data_state_key(process_index))
    if saved_position is not None:  # None: written by `glam experts grow --reset_data` (new data)
      pipeline.restore(saved_position)
    print(f"glam: resumed from {model_dir} at step {restored.step}", file=sys.stderr)
  elif init_checkpoint:  # fine-tuning: another run's parameters, a fresh optimizer and step
    state = place_state(init_from_checkpoint(state, init_checkpoint, vocab.fingerprint, optimizer,
                                             init_allow_missing), shardings)
  config_text = glam_config.operative_config() or glam_config.config_str()
  glam_config.save_text(os.path.join(model_dir, "config.gin"), glam_config.config_str())

  # Lifelong-MoE: the frozen previous-stage model, an input of every step (never updated).
  teacher = load_teacher(distill_from, model_info.vocab_size) if distill_from else None

  # Unrolled blocks train with one array per layer; checkpoints stay stacked (glam/models/per_layer.py).
  layout = per_layer_layout(model_info, optimizer, state, shardings)
  step_shardings, to_checkpoint = shardings, lambda state: state
  if layout is not None:
    state = on_mesh(mesh, layout.to_per_layer)(state)
    step_shardings, to_checkpoint = layout.shardings, layout.to_stacked

  # 4. Compile the pure steps once.
  train_step = on_mesh(mesh, jax.jit(constrain_outputs(
      make_train_step(graphdef, optimizer, seed=seed, z_loss=z_loss, grad_accum_steps=grad_accum_steps,
                      distill=None if teacher is None else (teacher[0], distill_weight),
                      norms_every=log_every, last_step=num_steps),
      mesh, step_shardings), donate_argnums=(0,)))
  if teacher is not None:
    teacher_params, distill_step = place_teacher(*teacher, mesh), train_step
    train_step = lambda state, batch: distill_step(state, batch, teacher_params)
  eval_step = on_mesh(mesh, jax.jit(constrain_outputs(make_eval_step(graphdef, len(domains)), mesh)))
  flops = flops_per_token(model_info, seq_len)["train"]
  peak = measure_matmul_peak() if measure_peak else None
  start_step = int(state["step"])
  # On resume, TensorBoard hides the killed run's events past the checkpoint.
  writer = MetricWriter(model_dir, process_index=process_index, purge_step=start_step + 1 if start_step else None)
  if start_step == 0:
    counts = count_parameters(model_info)
    writer.write_scalars(0, {f"params/{k}": v for k, v in counts.items()}, prefix="model")

  # 5. The loop.
  metrics, eval_results, step = {}, {}, start_step
  progress = Progress(start_step, num_steps, enabled=progress_bar and process_index == 0)
  with StopRequested() as stop:
    last_time, last_step = time.perf_counter(), start_step
    while step < num_steps:
      batch = global_batch(next(pipeline), mesh)  # this process's rows -> one global array
      state, step_metrics = train_step(state, batch)
      step += 1
      if step % log_every == 0 or step == num_steps:
        fetched = jax.device_get(step_metrics)
        metrics = {k: float(np.mean(v)) for k, v in fetched.items() if not k.startswith("routing/")}
        routing_scalars, routing_vectors = split_routing_metrics(fetched)
        elapsed = time.perf_counter() - last_time
        tokens_per_s = batch_size * seq_len * (step - last_step) / max(elapsed, 1e-9)
        metrics["tokens_per_s"] = tokens_per_s
        if peak:
          metrics["mfu"] = flops * tokens_per_s / peak
        drops = [v for k, v in routing_scalars.items() if k.endswith("/dropped_fraction")]
        if drops:
          metrics["dropped_fraction"] = float(np.mean(drops))  # mean over MoE layers
        writer.write_scalars(step, metrics)
        if routing_scalars:
          writer.write_scalars(step, routing_scalars, prefix="routing")
          if process_index == 0:
            append_routing(model_dir, step, routing_vectors)
        progress.update(step, metrics)
        last_time, last_step = time.perf_counter(), step
      if eval_set and (step % eval_every == 0 or step == num_steps):
        eval_results = evaluate(eval_step, state["params"], eval_set, domains)
        writer.write_scalars(step, eval_results, prefix="eval")
        progress.write(f"step {step}: eval loss {eval_results['loss']:.4f}")
      stopping = bool(stop) or (stop_after is not None and step - start_step >= stop_after)
      if checkpointer.should_save(step) or step == num_steps or stopping:
        checkpointer.save(step, on_mesh(mesh, to_checkpoint)(state),
                          gather_process_states(data_state_key(process_index), pipeline.state()), config_text,
                          force=True, metadata=metadata)
      if stopping:
        break
  progress.close()
  checkpointer.wait_until_finished()
  checkpointer.close()
  writer.close()
  if stop:
    print(f"glam: stopped by signal {stop.signal} at step {step}; checkpoint saved", file=sys.stderr)
    sys.exit(128 + stop.signal)
  return {"step": step, "train": metrics, "eval": eval_results}


def evaluate(eval_step, params, batches, domains) -> dict[str, float]:
  """Token-weighted loss and accuracy per domain and overall."""
  sums = None
  for batch in batches:
    out = jax.device_get(eval_step(params, batch))
    sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
  tokens = np.maximum(sums["tokens"], 1)
  results = {"loss": float(sums["nll"].sum() / tokens.sum()),
             "accuracy": float(sums["correct"].sum() / tokens.sum())}
  for i, name in enumerate(domains):
    if sums["tokens"][i] > 0:
      results[f"loss/{name}"] = float(sums["nll"][i] / tokens[i])
      results[f"accuracy/{name}"] = float(sums["correct"][i] / tokens[i])
  results["perplexity"] = float(np.exp(min(results["loss"], 50.0)))
  return results
