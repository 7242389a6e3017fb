"""Shared config helpers: the common config skeleton, loading `FILE:ARG` specs, validation with
one-line errors naming the key, and the resume check (which keys may change between runs)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any

import ml_collections

from gpt_jax.errors import ConfigError

# Keys that may differ when a workdir is resumed; every other key must match the saved config.
MUTABLE_KEYS = (
  "train.steps",
  "train.log_every",
  "train.eval_every",
  "train.eval_batches",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoint",
  "train.nonfinite",
  "train.progress_bar",
  "optim.decay_steps",
  "optim.lr_end_ratio",
  "metrics.",
  "mesh.",
  "model.scan_layers",
  "model.remat_policy",
  "model.attention_impl",
  "data.num_workers",
  "data.progress",
  "data.verify_hash",
  "sft.eval_samples",
  "sft.max_new_tokens",
  "sft.sample_batch",
)


def base_config(stage: str) -> ml_collections.ConfigDict:
  """The keys every training stage shares, with CPU-friendly defaults."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.train = ml_collections.ConfigDict(
    dict(
      steps=100,
      global_batch=16,
      seq_len=256,
      grad_accum=1,
      seed=0,
      nonfinite="stop",  # stop | skip: what to do on a non-finite loss or gradient
      log_every=10,
      eval_every=50,
      eval_batches=4,
      checkpoint_every=50,
      keep_checkpoints=3,
      async_checkpoint=True,
      progress_bar=True,
      init_from="",  # a checkpoint (workdir, or imported Hugging Face dir) to start from
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      lr_peak=1e-3,
      lr_end_ratio=0.1,
      warmup_steps=10,
      decay_steps=0,  # 0: decay over train.steps
      schedule="cosine",  # cosine | constant
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip_norm=1.0,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, peak_flops=0.0))
  return c


def model_config_dict(preset_name: str, **overrides) -> ml_collections.ConfigDict:
  """A model preset as a ConfigDict with every ModelConfig key (so the locked config accepts overrides)."""
  import dataclasses

  from gpt_jax import model

  cfg = model.preset(preset_name, **overrides)
  return ml_collections.ConfigDict(dataclasses.asdict(cfg))


def stage_config(stage: str, model_from: str) -> ml_collections.ConfigDict:
  """base_config(stage) with the model of the config `model_from` (`FILE:ARG`, e.g. the pretraining
  preset an SFT preset finetunes): a later stage's model is exactly its starting checkpoint's."""
  cfg = base_config(stage)
  cfg.model = ml_collections.ConfigDict(load(model_from).model.to_dict())
  return cfg


def load(spec: str, overrides: list[str] | dict | None = None) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py:ARG` (get_config(ARG)), applies overrides, and locks the config.

  overrides: {"train.steps": 10} or ["train.steps=10"]; values in strings are parsed as Python literals
  where possible. Unknown keys raise ConfigError.
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"--config: file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location(f"_gpt_jax_cfg_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except (ValueError, KeyError) as e:  # e.g. an unknown preset name
    raise ConfigError(f"--config: {e}") from None
  cfg = ml_collections.ConfigDict(cfg)
  cfg.lock()
  apply_overrides(cfg, overrides or {})
  return cfg


def _literal(text: str) -> Any:
  import ast

  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> None:
  items = overrides.items() if isinstance(overrides, dict) else (o.split("=", 1) for o in overrides)
  for key, value in items:
    value = _literal(value) if isinstance(value, str) else value
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else []:
      if part not in node:
        raise ConfigError(f"{key}: unknown config key ({part!r} does not exist)")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"{key}: unknown config key")
    old = node[leaf]
    if old is not None and not isinstance(value, type(old)):
      if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      else:
        raise ConfigError(f"{key}: expected {type(old).__name__}, got {value!r}")
    with cfg.unlocked():
      node[leaf] = value


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def to_dict(cfg) -> dict:
  return json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else json.loads(json.dumps(cfg))


def config_diff(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every flattened key that differs."""
  a, b = flatten(saved), flatten(current)
  return [
    (k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
  ]


def check_resume(saved: dict, current: dict, what: str = "workdir") -> list[str]:
  """Raises ConfigError listing the differing keys that may not change on resume; returns the
  keys that changed and may."""
  diffs = config_diff(saved, current)
  mutable = lambda k: any(k == m or (m.endswith(".") and k.startswith(m)) for m in MUTABLE_KEYS)
  refused = [f"{k} ({old!r} -> {new!r})" for k, old, new in diffs if not mutable(k)]
  if refused:
    raise ConfigError(
      f"{what} was made with a different config; these keys may not change on resume: "
      + "; ".join(refused)
      + " (use a new --workdir, or restore the old values)"
    )
  return [k for k, _, _ in diffs]


# --- checks shared by the stages' validate() (each raises a ConfigError naming `<section>.<key>`) ---


def check_at_least(section, name: str, bounds: dict[str, float]) -> None:
  """Every key of `bounds` is at least its bound."""
  for key, lo in bounds.items():
    if section[key] < lo:
      raise ConfigError(f"{name}.{key}: must be >= {lo}, got {section[key]}")


def check_room_for_prompt(section, name: str, key: str, max_seq_len: int, reserve: int = 0) -> None:
  """A generation length (`key` new tokens plus `reserve`) leaves at least one position for a prompt."""
  if int(section[key]) + reserve >= max_seq_len:
    raise ConfigError(
      f"{name}.{key}: {section[key]} leaves no room for a prompt in model.max_seq_len={max_seq_len}"
    )


def data_shards(cfg, n_devices: int) -> int:
  """The number of data-parallel shards (mesh.data * mesh.fsdp, -1 filled in from the device count)
  that every batch's rows are split over; ConfigError when the mesh does not fit the devices."""
  sizes = {a: int(cfg.mesh[a]) for a in ("data", "fsdp", "tensor")}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if -1 not in sizes.values() and fixed != n_devices:
    raise ConfigError(f"mesh: data*fsdp*tensor = {fixed} ({sizes}) but there are {n_devices} devices")
  if -1 in sizes.values() and (fixed <= 0 or n_devices % fixed):
    raise ConfigError(f"mesh: {n_devices} devices cannot be split into {sizes}")
  free = n_devices // fixed
  return (sizes["data"] if sizes["data"] != -1 else free) * (sizes["fsdp"] if sizes["fsdp"] != -1 else free)


def validate_train(cfg, n_devices: int) -> None:
  """Checks the shared training keys against each other and the device count (one-line errors)."""
  t, m = cfg.train, cfg.model
  if t.steps <= 0:
    raise ConfigError(f"train.steps: must be positive, got {t.steps}")
  if t.global_batch <= 0:
    raise ConfigError(f"train.global_batch: must be positive, got {t.global_batch}")
  if t.seq_len <= 0:
    raise ConfigError(f"train.seq_len: must be positive, got {t.seq_len}")
  if t.seq_len > m.max_seq_len:
    raise ConfigError(
      f"train.seq_len: {t.seq_len} is longer than the model's position table (model.max_seq_len={m.max_seq_len})"
    )
  if t.grad_accum <= 0 or t.global_batch % t.grad_accum:
    raise ConfigError(
      f"train.grad_accum: {t.grad_accum} must be positive and divide train.global_batch={t.global_batch}"
    )
  batch_shards = data_shards(cfg, n_devices)
  micro = t.global_batch // t.grad_accum
  if micro % batch_shards:
    raise ConfigError(
      f"train.global_batch: {t.global_batch} (/{t.grad_accum} microbatches = {micro}) is not divisible by the "
      f"{batch_shards} data-parallel shards (mesh.data*mesh.fsdp)"
    )
  if t.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.nonfinite: must be 'stop' or 'skip', got {t.nonfinite!r}")
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    if t[key] <= 0:
      raise ConfigError(f"train.{key}: must be positive, got {t[key]}")
  if t.eval_batches < 0:
    raise ConfigError(f"train.eval_batches: must be >= 0, got {t.eval_batches}")
  validate_optim(cfg.optim, t.steps)


def validate_optim(o, total_steps: int) -> None:
  """Checks the optim section (one-line errors naming `optim.<key>`); `total_steps` is what the
  schedule decays over when optim.decay_steps is 0."""
  if o.lr_peak < 0:
    raise ConfigError(f"optim.lr_peak: must be >= 0, got {o.lr_peak}")
  if not 0 <= o.lr_end_ratio <= 1:
    raise ConfigError(f"optim.lr_end_ratio: must be in [0, 1], got {o.lr_end_ratio}")
  if o.warmup_steps < 0 or o.decay_steps < 0:
    raise ConfigError("optim.warmup_steps/decay_steps: must be >= 0")
  decay = o.decay_steps or total_steps
  if o.schedule == "cosine" and o.warmup_steps >= decay:
    raise ConfigError(f"optim.warmup_steps: {o.warmup_steps} must be smaller than the decay steps ({decay})")
  if o.schedule not in ("cosine", "constant"):
    raise ConfigError(f"optim.schedule: must be 'cosine' or 'constant', got {o.schedule!r}")
  if o.weight_decay < 0 or o.grad_clip_norm < 0:
    raise ConfigError("optim.weight_decay/grad_clip_norm: must be >= 0")
  if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
    raise ConfigError(f"optim.b1/b2: must be in [0, 1), got {o.b1}, {o.b2}")
