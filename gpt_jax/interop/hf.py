"""Hugging Face interop: import GPT-2 / LLaMA model directories as gpt_jax checkpoints, export them back.

Import reads one tensor at a time and places it on the mesh as it goes:
  * unstacked params (embeddings, final norm, lm head): `jax.device_put(array, NamedSharding)`, which
    sends each device only its shard;
  * stacked block params (leading L axis): for each layer the HF tensor is read and converted once and
    device_put with the layer's sharding (each device receives its slice); a jitted stack with
    out_shardings then joins the L slices on every device locally. The full (L, ...) array never exists
    on the host nor on any one device: host memory peaks at one layer's tensor, device memory at twice
    the device's shard of one parameter kind. (make_array_from_callback would re-read every tensor once
    per distinct shard; reading each tensor once matters more for checkpoints of hundreds of GB.)

An imported checkpoint is a directory that `checkpoint.restore_params(dir, abstract)` reads directly:
  <dir>/model_config.json   the ModelConfig fields (plus where the weights came from)
  <dir>/state/              orbax PyTree {"params": params}
  <dir>/hf_tokenizer/       the model's tokenizer files, when it has any (tokenizers.load_hf_tokenizer
                            reads them; tokenizers.load_chat_tokenizer puts the chat adapter the stages
                            use around them)
  <dir>/_INTEGRITY.json     size + crc32 of every file (written last, so a partial import never counts)

Export gathers one tensor at a time and writes safetensors files of at most `max_shard_bytes`
(plus model.safetensors.index.json when there are several), the config.json transformers expects,
and optionally a reward head as *ForSequenceClassification (num_labels=1) and the SentencePiece model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from gpt_jax import model as model_lib
from gpt_jax import sharding as sharding_lib
from gpt_jax.errors import CheckpointError, ConfigError
from gpt_jax.interop.hf_config import config_from_hf, hf_arch, hf_config, model_type  # noqa: F401 - re-exported
from gpt_jax.interop.hf_files import TensorFiles
from gpt_jax.interop.hf_weights import Spec, export_tensors, import_specs
from gpt_jax.tokenizers.base import HF_TOKENIZER_DIR
from gpt_jax.tokenizers.hf import TOKENIZER_FILES
from gpt_jax.tokenizers.hf import tokenizer_files as tokenizer_files_in

log = logging.getLogger(__name__)

MODEL_CONFIG = "model_config.json"
STATE = "state"
# The HF tokenizer travels with an import as HF_TOKENIZER_DIR, apart from <dir>/tokenizer/ (the project's
# own SentencePiece models with gpt_jax's special tokens live there; an HF tokenizer generally lacks
# them): stages read it through the chat adapter, tokenizers.hf.ChatTokenizer.


def read_hf_config(model_dir: str) -> dict:
  """Returns the parsed config.json of a Hugging Face model directory."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def check_tensors(files: TensorFiles, specs: list[Spec], cfg: model_lib.ModelConfig) -> None:
  """Raises CheckpointError naming the first tensor that is missing or whose shape disagrees with the config."""
  for spec in specs:
    for layer in range(cfg.num_layers) if spec.stacked else (None,):
      name = spec.name(layer)
      if name not in files:
        raise CheckpointError(f"tensor {name} ({'/'.join(spec.path)}) is missing from {files.model_dir}")
      if files.shape(name) != spec.hf_shape:
        raise CheckpointError(
          f"tensor {name} has shape {files.shape(name)} but config.json implies {spec.hf_shape}"
        )
  used = {s.name(i) for s in specs for i in (range(cfg.num_layers) if s.stacked else (None,))}
  unused = sorted(set(files.names()) - used)
  if unused:  # e.g. attention-mask buffers, rotary inv_freq, a classifier's score head
    log.info("ignoring %d tensors of %s not used by gpt_jax: %s", len(unused), files.model_dir, unused[:8])


@functools.cache
def _stacker(sharding: NamedSharding):
  # Layer slices and the result are sharded alike, so the stack is device-local (no communication).
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def _place_stacked(files: TensorFiles, spec: Spec, shape, dtype, sharding) -> jax.Array:
  """Builds one (L, ...) parameter from L per-layer tensors; each device only ever receives its shard."""
  layers = []
  if isinstance(sharding, NamedSharding):
    layer_spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*layer_spec[1:]))
  for layer in range(shape[0]):
    x = np.asarray(spec.convert(files.read(spec.name(layer)))).astype(dtype)
    if x.shape != tuple(shape[1:]):
      raise CheckpointError(f"tensor {spec.name(layer)} converts to {x.shape}, expected {tuple(shape[1:])}")
    # On a mesh each device receives its slice only; on one device the whole array goes there anyway.
    layers.append(jax.device_put(x, layer_sharding) if isinstance(sharding, NamedSharding) else x)
  if isinstance(sharding, NamedSharding):
    return _stacker(sharding)(*layers)
  return jax.device_put(np.stack(layers), sharding)


def load_hf_params(model_dir: str, cfg: model_lib.ModelConfig, *, mesh=None, axes=None):
  """Returns gpt_jax params (nested dict of jax.Arrays in cfg.param_dtype) read from a Hugging Face directory.

  With `mesh`, every parameter is placed sharded by the logical-axis rules (`axes` defaults to the
  model's own); without, on the first device. Every tensor's presence and shape is checked against
  `cfg` (headers only) before any weight is read.
  """
  files = TensorFiles(model_dir)
  specs = import_specs(cfg)
  check_tensors(files, specs, cfg)
  _, shapes, model_axes = model_lib.abstract(cfg)
  axes = model_axes if axes is None else axes
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict = {}
  for spec in specs:
    shape = tuple(_at(shapes, spec.path).shape)
    if mesh is None:
      sharding = SingleDeviceSharding(jax.local_devices()[0])
    else:
      sharding = NamedSharding(mesh, sharding_lib.logical_to_spec(_at(axes, spec.path), shape, mesh))
    if spec.stacked:
      value = _place_stacked(files, spec, shape, dtype, sharding)
    else:
      x = np.asarray(spec.convert(files.read(spec.name()))).astype(dtype)
      if x.shape != shape:
        raise CheckpointError(f"tensor {spec.name()} converts to {x.shape}, expected {shape}")
      value = jax.device_put(x, sharding)
    _set(params, spec.path, value)
  files.close()
  return params


# --- gpt_jax checkpoint of an import ----------------------------------------------------------------


def _copy_tokenizer(model_dir: str, dest: str) -> None:
  """Copies the HF tokenizer files that exist (load them with tokenizers.load_hf_tokenizer(dest))."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, n))]
  if names:
    os.makedirs(dest, exist_ok=True)
    for n in names:
      shutil.copyfile(os.path.join(model_dir, n), os.path.join(dest, n))


def import_hf(model_dir: str, out_dir: str, *, mesh_cfg=None, **overrides) -> model_lib.ModelConfig:
  """Converts a Hugging Face model directory into a gpt_jax checkpoint directory; returns its ModelConfig.

  mesh_cfg: {"data", "fsdp", "tensor"} sizes (default: fsdp over all devices, so no device holds a
  whole large model). overrides: other ModelConfig keys (e.g. dtype="bfloat16"). Refuses an existing
  non-empty out_dir; writes into <out_dir>.partial and renames it when complete.
  """
  import orbax.checkpoint as ocp

  from gpt_jax import integrity

  cfg = config_from_hf(read_hf_config(model_dir), **overrides)
  check_tensors(TensorFiles(model_dir), import_specs(cfg), cfg)  # headers only: fail before heavy work
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise CheckpointError(f"import output {out_dir} already exists and is not empty; choose a new directory")
  mesh = sharding_lib.make_mesh(mesh_cfg or {"data": 1, "fsdp": -1, "tensor": 1})
  params = load_hf_params(model_dir, cfg, mesh=mesh)
  partial = out_dir + ".partial"
  if jax.process_index() == 0 and os.path.exists(partial):
    shutil.rmtree(partial)  # our own unfinished import from an earlier, interrupted run
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("gpt_jax import_hf: partial dir cleared")
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(os.path.join(partial, STATE), args=ocp.args.PyTreeSave({"params": params}))
  ckptr.close()
  if jax.process_index() == 0:
    meta = {**dataclasses.asdict(cfg), "_source": {"hf_dir": os.path.abspath(model_dir)}}
    with open(os.path.join(partial, MODEL_CONFIG), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    _copy_tokenizer(model_dir, os.path.join(partial, HF_TOKENIZER_DIR))
    integrity.write_record(partial)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(partial, out_dir)
  return cfg


def read_model_config(ckpt_dir: str) -> model_lib.ModelConfig:
  """Returns the ModelConfig stored in an imported checkpoint's model_config.json."""
  path = os.path.join(ckpt_dir, MODEL_CONFIG)
  if not os.path.isfile(path):
    raise CheckpointError(f"{ckpt_dir}: no {MODEL_CONFIG} (not a gpt_jax import of a Hugging Face model)")
  with open(path) as f:
    fields = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
  return model_lib.ModelConfig.from_config(fields)


def load_imported(ckpt_dir: str, mesh=None, **overrides):
  """Returns (ModelConfig, params) of an imported checkpoint, params sharded on `mesh` (else on the first device).

  overrides change compute-only ModelConfig keys (dtype, scan_layers, remat_policy, attention_impl).
  """
  from gpt_jax.checkpoint import restore_params

  cfg = dataclasses.replace(read_model_config(ckpt_dir), **overrides).validate()
  _, shapes, axes = model_lib.abstract(cfg)
  if mesh is None:
    sh = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), shapes)
  else:
    sh = sharding_lib.tree_shardings(mesh, axes, shapes)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sh)
  return cfg, restore_params(ckpt_dir, abstract)


# --- export -------------------------------------------------------------------------------------


def _host(x) -> np.ndarray:
  """Returns a (possibly sharded, possibly multi-process) array gathered on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _reward_getter(cfg, params, reward_head):
  """Returns (get, score_weight_1D, config extras) for export, folding the head's bias where exact.

  Hugging Face's score layer has no bias. GPT-2's final LayerNorm bias feeds only the score in a
  classifier, so adding b * w / |w|^2 to it adds exactly b to the score. LLaMA's RMSNorm has no bias:
  a nonzero b is recorded as config.json "gpt_jax_score_bias" (a constant offset, irrelevant to
  preference comparisons) and a warning is logged.
  """

  def get(path, layer):
    leaf = _at(params, path)
    return _host(leaf if layer is None else leaf[layer])

  if reward_head is None:
    return get, None, {}
  w = _host(reward_head["w"]).reshape(-1).astype(np.float32)
  b = float(_host(reward_head.get("b", 0.0)))
  if w.shape != (cfg.d_model,):
    raise ConfigError(f"reward_head w: shape {w.shape}, expected ({cfg.d_model},)")
  if b == 0.0:
    return get, w, {}
  if hf_arch(cfg) == "gpt2":
    if not np.any(w):
      raise ConfigError("reward_head: w is all zeros, so its bias cannot be folded into the final norm")
    shift = (b * w / np.dot(w, w)).astype(np.float32)

    def get_shifted(path, layer):
      x = get(path, layer)
      return (x.astype(np.float32) + shift).astype(x.dtype) if path == ("final_norm", "bias") else x

    return get_shifted, w, {}
  log.warning(
    "reward head bias %.6g has no place in LlamaForSequenceClassification; saved as gpt_jax_score_bias", b
  )
  return get, w, {"gpt_jax_score_bias": b}


def _write_shards(tensors, out_dir: str, max_shard_bytes: int) -> list[str]:
  """Writes (name, array) pairs into safetensors files of at most max_shard_bytes; returns the file names."""
  from safetensors.numpy import save_file

  groups, current, size, files, weight_map = [], {}, 0, [], {}

  def flush():
    path = os.path.join(out_dir, f".shard-{len(files):05d}.tmp")
    save_file(current, path, metadata={"format": "pt"})  # transformers requires the format key
    files.append(path)
    groups.append(list(current))

  for name, x in tensors:
    x = np.ascontiguousarray(x)
    if current and size + x.nbytes > max_shard_bytes:
      flush()
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
  flush()
  total = sum(os.path.getsize(f) for f in files)
  if len(files) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    weight_map = {t: n for n, group in zip(names, groups) for t in group}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  for tmp, name in zip(files, names):
    os.replace(tmp, os.path.join(out_dir, name))
  return names + (["model.safetensors.index.json"] if weight_map else [])


def export_hf(
  cfg: model_lib.ModelConfig,
  params,
  out_dir: str,
  *,
  tokenizer_model: str | None = None,
  tokenizer_dir: str | None = None,
  reward_head: dict | None = None,
  bos_id: int | None = None,
  eos_id: int | None = None,
  pad_id: int | None = None,
  max_shard_bytes: int = 5 * 10**9,
) -> list[str]:
  """Writes a Hugging Face model directory (config.json + safetensors) of `params`; returns the files written.

  reward_head {"w": (D,), "b": ()} exports *ForSequenceClassification (num_labels=1) without the LM
  head. tokenizer_model: a SentencePiece model file copied as tokenizer.model; tokenizer_dir: a directory
  of Hugging Face tokenizer files (an import's hf_tokenizer/) whose TOKENIZER_FILES are copied. Refuses
  an out_dir that already holds a config.json or weights.
  """
  hf_arch(cfg)  # ConfigError before anything is written if no HF layout fits
  for name in ("config.json", "model.safetensors", "model.safetensors.index.json"):
    if os.path.exists(os.path.join(out_dir, name)):
      raise CheckpointError(f"export output {out_dir} already has {name}; choose a new directory")
  if tokenizer_model is not None and not os.path.isfile(tokenizer_model):
    raise CheckpointError(f"tokenizer model {tokenizer_model} does not exist")
  if tokenizer_dir is not None and tokenizer_model is not None:
    raise ConfigError("export: give tokenizer_model or tokenizer_dir, not both")
  if tokenizer_dir is not None and not tokenizer_files_in(tokenizer_dir):
    raise CheckpointError(f"tokenizer directory {tokenizer_dir} holds none of {TOKENIZER_FILES}")
  get, score_w, extra = _reward_getter(cfg, params, reward_head)
  if jax.process_index() != 0:  # every process joins the gathers above and below; one writes
    for _ in export_tensors(cfg, get, with_lm_head=reward_head is None):
      pass
    return []
  os.makedirs(out_dir, exist_ok=True)
  tensors = export_tensors(cfg, get, with_lm_head=reward_head is None)
  if score_w is not None:
    tensors = _chain(tensors, [("score.weight", score_w[None, :].astype(jnp.dtype(cfg.param_dtype)))])
  written = _write_shards(tensors, out_dir, max_shard_bytes)
  config = {
    **hf_config(cfg, classifier=reward_head is not None, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id),
    **extra,
  }
  if tokenizer_model is not None:
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    written.append("tokenizer.model")
  if tokenizer_dir is not None:
    for name, data in tokenizer_files_in(tokenizer_dir).items():
      with open(os.path.join(out_dir, name), "wb") as f:
        f.write(data)
      written.append(name)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return [*written, "config.json"]


def _chain(*iterables):
  for it in iterables:
    yield from it
