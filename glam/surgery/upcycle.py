"""Sparse upcycling: start an MoE model from a dense checkpoint.

The MoE model (its gin files, parsed over the dense run's stored config) must have the same
sequence of sub-layers as the dense one once both are unrolled over their blocks, except that an
MoE sub-layer may stand where the dense model has a dense FFN: e.g. a dense model of 4 x
("attn", "ffn") and a GLaM of 2 x ("attn", "moe", "attn", "ffn"). Attention, norms, embeddings and
dense FFNs are copied from the same position; every expert of an MoE sub-layer starts as a copy of
the dense FFN at that position (its activation and width must match: MoeLayer.activation =
FeedForward.activation, MoeLayer.d_ff = FeedForward.d_ff); routers start fresh. Step 0, fresh
optimizer state, input from the beginning.

With top-k routing and renormalised gates (k >= 2, TokenChoiceRouter.renormalize) the gates of a
token sum to 1 over identical experts, so the upcycled model reproduces the dense logits, as long
as no token is dropped: CapacityEinsum drops assignments beyond capacity, so equality holds in
evaluation when eval_capacity_factor >= num_experts / k (capacity then covers every token), or
with Dropless(). Switch (k=1) and expert choice scale each output by an unnormalised probability
and do not reproduce the dense model.
"""
import gin
import jax
import numpy as np

from glam import config as glam_config
from glam.models.blocks import parse_block_spec
from glam.surgery import runs


def unrolled(model) -> list[tuple[int, str, str]]:
  """(block, sub-layer name, kind) for every sub-layer in execution order."""
  entries = parse_block_spec(model.block_spec)
  return [(block, f"{kind}_{i}", kind) for block in range(model.num_blocks) for i, (kind, _) in enumerate(entries)]


def check_experts(model, gin_files) -> None:
  """The MoE model must have MoE sub-layers, each with an expert count the mesh's expert axis divides."""
  from glam.surgery.grow import moe_layers  # pylint: disable=import-outside-toplevel  (grow imports runs too)
  layers = moe_layers(model)
  if not layers:
    raise ValueError(f"upcycle: the model of --gin_file={','.join(gin_files)} has no MoE sub-layers "
                     "(no parameter with an expert axis); give an MoE model, e.g. configs/models/glam_tiny.gin")
  expert_axis = runs.expert_axis_size()
  bad = {layer: count for layer, count in layers.items() if count % expert_axis}
  if bad:
    raise glam_config.ConfigError(f"upcycle: num_experts {bad} is not divisible by the mesh's expert axis of "
                                  f"size {expert_axis} (mesh_shape.expert); set MoeLayer.num_experts to a multiple")


def upcycle(source_dir: str, target_dir: str, gin_files, bindings=(), search_paths=(), seed: int = 0) -> dict:
  if not gin_files:
    raise ValueError("glam experts upcycle: give the MoE model with --gin_file")
  runs.check_target(target_dir, source_dir)
  source = runs.read_run(source_dir)
  dense = source.model

  runs.parse_config_text(source.config_text, source_dir)
  paths = list(search_paths) + glam_config.default_search_paths()
  for name in gin_files:
    path = glam_config.resolve_gin_file(name, paths)
    glam_config.parse_one(lambda: gin.parse_config_file(path), f'"{path}"')
  for item in bindings:
    glam_config.parse_one(lambda: gin.parse_config(item), f"binding {item!r}")
  fresh, model = runs.fresh_state(seed_offset=seed)
  config_text = gin.config_str()
  check_experts(model, gin_files)

  source_layers, target_layers = unrolled(dense), unrolled(model)
  if len(source_layers) != len(target_layers):
    raise ValueError(f"upcycle: the dense model has {len(source_layers)} sub-layers "
                     f"({dense.num_blocks} x {[k for k, _ in parse_block_spec(dense.block_spec)]}), the MoE model "
                     f"{len(target_layers)} ({model.num_blocks} x {[k for k, _ in parse_block_spec(model.block_spec)]})")
  old = runs.flat(source.state["params"])
  new = {path: np.array(value) for path, value in runs.flat(jax.device_get(fresh["params"])).items()}
  filled = set()
  for position, ((s_block, s_name, s_kind), (t_block, t_name, t_kind)) in enumerate(zip(source_layers, target_layers)):
    if s_kind != t_kind and (s_kind, t_kind) != ("ffn", "moe"):
      raise ValueError(f"upcycle: sub-layer {position} is {s_kind!r} in the dense model but {t_kind!r} in the MoE "
                       "model; only a dense 'ffn' may become 'moe'")
    pairs = [(f"blocks/{s_name}_norm/scale", f"blocks/{t_name}_norm/scale")]
    if s_kind == t_kind:
      prefix = f"blocks/{t_name}/"
      pairs += [(f"blocks/{s_name}/{p[len(prefix):]}", p) for p in new if p.startswith(prefix)]
    else:
      ffn, experts = getattr(dense.blocks, s_name), getattr(model.blocks, t_name).experts
      if ffn.activation != experts.activation:
        raise ValueError(f"upcycle: {s_name} uses FeedForward.activation={ffn.activation!r} but the experts of "
                         f"{t_name} use MoeLayer.activation={experts.activation!r}; they must match")
      for weight in ("wi", "wi_gate", "wo"):
        source_path, target_path = f"blocks/{s_name}/{weight}", f"blocks/{t_name}/experts/{weight}"
        if source_path not in old:
          continue
        dense_weight = np.asarray(old[source_path][s_block])  # [d_model, d_ff] or [d_ff, d_model]
        if new[target_path].shape[2:] != dense_weight.shape:
          raise ValueError(f"upcycle: {target_path} has expert shape {new[target_path].shape[2:]}, the dense "
                           f"{source_path} {dense_weight.shape}: set MoeLayer.d_ff to the dense FeedForward.d_ff")
        new[target_path][t_block] = dense_weight[None]  # every expert a copy: [experts, ...]
        filled.add((target_path, t_block))
      filled.update((p, t_block) for p in new if p.startswith(f"blocks/{t_name}/router/"))
    for source_path, target_path in pairs:
      new[target_path][t_block] = np.asarray(old[source_path][s_block])
      filled.add((target_path, t_block))
  for path in new:
    if not path.startswith("blocks/"):
      if path not in old or np.shape(old[path]) != new[path].shape:
        raise ValueError(f"upcycle: {path} differs between the dense and the MoE model "
                         f"({np.shape(old.get(path))} vs {new[path].shape}); keep d_model and vocab_size")
      new[path] = np.asarray(old[path])
  missing = sorted({p for p in new if p.startswith("blocks/")} - {p for p, _ in filled})
  if missing:
    raise ValueError(f"upcycle: no dense source for {missing}")

  state = {"step": np.int32(0), "params": runs.unflat_like(fresh["params"], new), "opt_state": fresh["opt_state"]}
  metadata = {**source.metadata, "upcycled_from": source_dir}
  written = runs.write_run(target_dir, 0, state, {}, config_text, metadata)
  gin.clear_config()
  moe = sorted({name for _, name, kind in target_layers if kind == "moe"})
  return {"checkpoint": written, "moe_sublayers": moe, "sublayers": len(target_layers)}
