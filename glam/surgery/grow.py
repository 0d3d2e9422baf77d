"""Lifelong-MoE expert growth: E experts -> E + N in every MoE layer, written as a new run.

Everything with an expert axis grows consistently: stacked expert weights, router kernel columns
(and router biases), the optimizer statistics of those parameters, and the stored config
(`MoeLayer.num_experts`). Step, data position and metadata are carried over.

New experts are initialised by `init`:
  copy        expert E+i copies expert i mod E, with its router column and optimizer statistics;
  noisy_copy  the same plus Gaussian noise, `noise` times each copied tensor's standard deviation
              (Lifelong-MoE's initialisation is not in the sources we have; a noisy copy is one
              summary's reading, specs/moe-papers.md section 4);
  random      a fresh initialisation (the model's own initialisers), zero optimizer statistics;
  preserve    the grown model computes the old model's outputs. DECISION: a linear router cannot
              give a new expert zero probability for every input, so preserve switches to the
              Biased*Router classes (glam/surgery/router_bias.py): new router columns are 0 and
              their bias is -M, with M above the largest possible logit spread
              (max|norm scale| * sqrt(d_model) * max column norm, x2 for jitter, + 120), so their
              softmax probability is exactly 0 in float32: top-k picks, renormalised or not, and
              expert-choice scores are unchanged. Capacity: CapacityEinsum's capacity is
              cf * k * tokens / E and expert choice's n * c / E, so preserve multiplies every
              capacity factor by (E+N)/E to keep each expert's slots (up to float rounding of the
              product). New expert weights are copies; their outputs get gate 0. Since their
              probability is exactly 0, so is the gradient reaching the new columns: preserve
              checks equivalence, use noisy_copy to train the new experts.
"""
import math
import re

import gin
import jax
import numpy as np

from glam.config import ConfigError
from glam.surgery import runs

INITS = ("copy", "noisy_copy", "random", "preserve")
ROUTER_REFERENCE = re.compile(r"@((?:[\w.]+/)*)(TokenChoiceRouter|ExpertChoiceRouter)\b")
CAPACITY_LINE = re.compile(r"^((?:[\w.]+/)*(?:ExpertChoiceRouter|CapacityEinsum)\.(?:eval_)?capacity_factor)"
                           r"\s*=\s*([-+0-9.eE]+)\s*$", re.M)
CAP_LINE = re.compile(r"^((?:[\w.]+/)*ExpertChoiceRouter\.max_experts_per_token)\s*=\s*(\d+)\s*$", re.M)
PRESERVE_MARGIN = 120.0  # exp(-120) underflows to exactly 0 in float32 (and bfloat16)


def moe_layers(model) -> dict[str, int]:
  """MoE sub-layer path ('blocks/moe_1') -> experts, from parameters with an expert axis."""
  layers = {}
  for path, shape, axes, _ in runs.parameter_rows(model):
    if "expert" in axes and path.endswith("experts/wi"):
      layers[path.rsplit("/experts/", 1)[0]] = shape[axes.index("expert")]
  return layers


def grown_config(text: str, old: int, new: int, preserve: bool) -> str:
  """The stored config with num_experts raised, and for preserve biased routers and capacities scaled."""
  lines = [text.rstrip(), "", f"# glam experts grow: {old} -> {new} experts" + (" (preserve)" if preserve else "")]
  if preserve:
    text = ROUTER_REFERENCE.sub(lambda m: f"@{m.group(1)}Biased{m.group(2)}", text)
    ratio = new / old
    seen = set(m.group(1) for m in CAPACITY_LINE.finditer(text))
    text = CAPACITY_LINE.sub(lambda m: f"{m.group(1)} = {float(m.group(2)) * ratio!r}", text)
    # capped expert choice: the cap must stay >= the scaled capacity factor (experts per token)
    text = CAP_LINE.sub(lambda m: f"{m.group(1)} = {math.ceil(int(m.group(2)) * ratio)}", text)
    lines = [text.rstrip(), "", lines[-1]]
    from glam.moe.dispatch import CapacityEinsum
    from glam.moe.routers import ExpertChoiceRouter
    import inspect
    defaults = {"CapacityEinsum.capacity_factor": CapacityEinsum.capacity_factor,
                "CapacityEinsum.eval_capacity_factor": CapacityEinsum.eval_capacity_factor,
                "ExpertChoiceRouter.capacity_factor":
                    inspect.signature(ExpertChoiceRouter.__init__).parameters["capacity_factor"].default}
    lines += [f"{name} = {value * ratio!r}" for name, value in defaults.items() if name not in seen]
  lines.append(f"MoeLayer.num_experts = {new}")
  return "\n".join(lines) + "\n"


def _source_indices(old: int, add: int) -> np.ndarray:
  return np.arange(add) % old


def _grow_array(old: np.ndarray, fresh: np.ndarray, axis: int, init: str, rng: np.random.Generator,
                noise: float, kind: str) -> np.ndarray:
  """old [.., E, ..] -> [.., E+N, ..]; fresh is the newly initialised [.., E+N, ..] array.
  kind: "weight" (experts), "router" (kernel), "bias", "opt" (optimizer statistics)."""
  num_old, add = old.shape[axis], fresh.shape[axis] - old.shape[axis]
  copies = np.take(old, _source_indices(num_old, add), axis=axis)
  fresh_part = np.take(fresh, np.arange(num_old, num_old + add), axis=axis)
  if init == "random" or (init == "preserve" and kind == "opt"):
    part = fresh_part
  elif init == "preserve" and kind == "router":
    part = np.zeros_like(fresh_part)
  elif init == "noisy_copy" and kind in ("weight", "router"):
    scale = noise * (float(np.std(old)) or 1.0)
    part = copies + rng.normal(0.0, scale, copies.shape).astype(copies.dtype)
  else:
    part = copies
  return np.concatenate([old, part.astype(old.dtype)], axis=axis)


def preserve_bias_offset(params: dict, layer: str) -> np.ndarray:
  """-M per scanned layer [layers]: below every reachable logit of an old expert by PRESERVE_MARGIN."""
  norm_scale = np.asarray(params[f"{layer}_norm/scale"], np.float64)  # [layers, d_model]
  kernel = np.asarray(params[f"{layer}/router/kernel"], np.float64)  # [layers, d_model, experts]
  d_model = kernel.shape[-2]
  reach = np.max(np.abs(norm_scale), axis=-1) * np.sqrt(d_model) * np.max(np.linalg.norm(kernel, axis=-2), axis=-1)
  old_bias = params.get(f"{layer}/router/bias")
  lowest = np.min(np.asarray(old_bias), axis=-1) if old_bias is not None else 0.0
  return np.minimum(lowest, 0.0) - 2.0 * reach - PRESERVE_MARGIN


def grow(source_dir: str, target_dir: str, add: int, init: str = "noisy_copy", noise: float = 0.01,
         seed: int = 0, reset_data: bool = False, bindings=()) -> dict:
  """Writes target_dir with a grown copy of source_dir's latest checkpoint; returns a summary."""
  if init not in INITS:
    raise ValueError(f"--init={init!r}: expected one of {list(INITS)}")
  if add < 1:
    raise ValueError(f"--add={add}: must be >= 1")
  runs.check_target(target_dir, source_dir)
  source = runs.read_run(source_dir, bindings=bindings)
  layers = moe_layers(source.model)
  if not layers:
    raise ValueError(f"--from={source_dir}: the model has no MoE layers (no parameter with an expert axis); "
                     "nothing to grow")
  counts = sorted(set(layers.values()))
  if len(counts) != 1:
    raise ValueError(f"--from={source_dir}: MoE layers have different expert counts {layers}; grow needs one count")
  old = counts[0]
  new = old + add
  expert_axis = runs.expert_axis_size()
  if new % expert_axis:
    raise ConfigError(f"--add={add}: {old}+{add}={new} experts is not divisible by the mesh's expert axis of "
                      f"size {expert_axis} (mesh_shape.expert); e.g. --add={(-old) % expert_axis or expert_axis}")

  text = grown_config(source.config_text, old, new, preserve=init == "preserve")
  runs.parse_config_text(text, f"{source_dir} (grown config)", bindings)
  fresh, model = runs.fresh_state(seed_offset=1 + seed)
  grown_layers = moe_layers(model)
  if set(grown_layers.values()) != {new} or set(grown_layers) != set(layers):
    raise ValueError(f"grown model has experts {grown_layers}, expected {new} in every MoE layer of {sorted(layers)}: "
                     "a block-spec override sets num_experts per sub-layer; bind MoeLayer.num_experts instead")

  rng = np.random.default_rng(seed)
  axes = runs.axes_by_path(model)
  old_params, fresh_params = runs.flat(source.state["params"]), runs.flat(jax.device_get(fresh["params"]))
  params = {}
  for path, value in fresh_params.items():
    kind = "bias" if path.endswith("router/bias") else "router" if path.endswith("router/kernel") else "weight"
    if path not in old_params:  # a router bias that preserve introduces
      layer = path.rsplit("/router/", 1)[0]
      bias = np.zeros_like(value)
      if init == "preserve":
        bias[..., old:] = preserve_bias_offset(old_params, layer)[..., None]
      params[path] = bias
    elif old_params[path].shape == value.shape:
      params[path] = np.asarray(old_params[path])
    else:
      params[path] = _grow_array(np.asarray(old_params[path]), np.asarray(value), axes[path].index("expert"),
                                 init, rng, noise, kind)
      if init == "preserve" and kind == "bias":
        params[path][..., old:] = preserve_bias_offset(old_params, path.rsplit("/router/", 1)[0])[..., None]

  old_opt, fresh_opt = runs.flat(source.state["opt_state"]), runs.flat(jax.device_get(fresh["opt_state"]))
  opt, reset = {}, []
  for path, value in fresh_opt.items():
    previous = old_opt.get(path)
    if previous is None or np.shape(previous) == np.shape(value):
      opt[path] = np.asarray(value if previous is None else previous)
      continue
    differing = [i for i, (a, b) in enumerate(zip(np.shape(previous), np.shape(value))) if a != b]
    if (np.ndim(previous) == np.ndim(value) and len(differing) == 1
        and (np.shape(previous)[differing[0]], np.shape(value)[differing[0]]) == (old, new)):
      opt[path] = _grow_array(np.asarray(previous), np.asarray(value), differing[0], init, rng, noise, "opt")
    else:  # e.g. Adafactor now factors a router that it did not factor before
      opt[path] = np.asarray(value)
      reset.append(path)

  state = {"step": source.state["step"], "params": runs.unflat_like(fresh["params"], params),
           "opt_state": runs.unflat_like(fresh["opt_state"], opt)}
  data_state = {} if reset_data else source.data_state
  metadata = {**source.metadata, "grown_from": source_dir, "grown_experts": [old, new], "grow_init": init}
  written = runs.write_run(target_dir, source.step, state, data_state, text, metadata)
  gin.clear_config()
  return {"checkpoint": written, "step": source.step, "moe_layers": sorted(layers), "experts": [old, new],
          "init": init, "optimizer_state_reset": reset}
