"""Config machinery: a declarative schema of every key, `FILE.py:ARG` loading with dotted overrides,
one-line errors naming the key, and the resume diff.

A schema is a nested dict of `Key`s (default, which fixes the type; bounds; choices; whether the key
may change when a workdir is resumed). Each stage owns the schema of its config (stages/*.py
`SCHEMA`), built from the shared sections below and those of the modules that read them (model.py,
data/config.py, data/tasks.py). `defaults(schema)` is the config every experiment file starts from;
`check(cfg, schema)` types and bounds every key before anything runs.

ml_collections.config_flags is not used for loading: it reads overrides from sys.argv through absl's
global flags and reports a failing config file as a multi-line traceback, while gpt_jax parses its
commands with argparse, accepts `FILE.py:ARG` values for whole sections (`--config.data=...`) and
reports every bad key as one line, before anything is built.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
from typing import Any

import ml_collections

from gpt_jax.errors import ConfigError

# --- the schema -----------------------------------------------------------------------------------

_BOUNDS = re.compile(r"^\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*$")
_SIDE = re.compile(r"^\s*(>=|>|<=|<)\s*(\S+)\s*$")


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key. `default` fixes its type (an int key takes ints, a float key ints or floats);
  `bounds` is "> 0", ">= 1", "< 1" or an interval "[0, 1)"; `choices` lists the allowed values;
  `resumable` keys may differ when a workdir is resumed (they change how, not what, is trained)."""

  default: Any
  bounds: str = ""
  choices: tuple = ()
  resumable: bool = False

  def describe(self) -> str:
    return f"one of {self.choices}" if self.choices else (self.bounds.strip() or "any value")

  def limits(self) -> tuple[float, bool, float, bool]:
    """(low, low included, high, high included)."""
    if not self.bounds:
      return -math.inf, True, math.inf, True
    m = _BOUNDS.match(self.bounds)
    if m:
      return float(m[2]), m[1] == "[", float(m[3]), m[4] == "]"
    m = _SIDE.match(self.bounds)
    if not m:
      raise ValueError(f"bad bounds {self.bounds!r}")
    op, x = m[1], float(m[2])
    if op.startswith(">"):
      return x, op == ">=", math.inf, True
    return -math.inf, True, x, op == "<="


@dataclasses.dataclass(frozen=True)
class Entries:
  """A section of named entries that share one schema (e.g. data.sources: name -> source)."""

  schema: dict
  default: dict = dataclasses.field(default_factory=dict)  # name -> {key: value} overrides


def defaults(schema: dict) -> ml_collections.ConfigDict:
  """The config of `schema`'s defaults."""
  out = {}
  for name, spec in schema.items():
    if isinstance(spec, Key):
      out[name] = spec.default
    elif isinstance(spec, Entries):
      out[name] = {n: {**defaults(spec.schema).to_dict(), **e} for n, e in spec.default.items()}
    else:
      out[name] = defaults(spec).to_dict()
  return ml_collections.ConfigDict(out)


def _type_ok(value, default) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, int | float) and not isinstance(value, bool)
  return isinstance(value, type(default))


# Every int key fits JAX's default integer: counters (the step, the skipped steps) are int32 on the
# devices, and a seed of 2**32 or more would silently become another seed in jax.random.key.
INT_LIMIT = 2**31


def check_value(path: str, value, spec: Key) -> None:
  """ConfigError naming `path` unless `value` has the key's type, is finite (a float) or a 32-bit
  integer (an int), and is within its bounds."""
  if not _type_ok(value, spec.default):
    raise ConfigError(f"{path}: expected {type(spec.default).__name__}, got {value!r}")
  if spec.choices and value not in spec.choices:
    raise ConfigError(f"{path}: must be one of {spec.choices}, got {value!r}")
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"{path}: must be a finite number, got {value!r}")
  if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
    raise ConfigError(f"{path}: must be a 32-bit integer (below 2**31 in size), got {value!r}")
  if spec.bounds and isinstance(value, int | float):
    lo, lo_in, hi, hi_in = spec.limits()
    if (value < lo or (value == lo and not lo_in)) or (value > hi or (value == hi and not hi_in)):
      shown = spec.bounds.strip()
      raise ConfigError(f"{path}: must be {'in ' if shown[0] in '[(' else ''}{shown}, got {value!r}")


def check(cfg, schema: dict, prefix: str = "") -> None:
  """ConfigError for the first key of `cfg` that is unknown to `schema`, missing, of the wrong type,
  not finite or out of bounds (the message names the key)."""
  have = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  for name in have:
    if name not in schema:
      raise ConfigError(f"{prefix}{name}: unknown config key")
  for name, spec in schema.items():
    path = f"{prefix}{name}"
    if name not in have:
      raise ConfigError(f"{path}: missing from the config")
    value = have[name]
    if isinstance(spec, Key):
      if isinstance(value, dict):
        raise ConfigError(f"{path}: expected {type(spec.default).__name__}, got a section")
      check_value(path, value, spec)
    elif not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a section, got {value!r}")
    elif isinstance(spec, Entries):
      for entry, sub in value.items():
        if not isinstance(sub, dict):
          raise ConfigError(f"{path}.{entry}: expected a section, got {sub!r}")
        check(sub, spec.schema, f"{path}.{entry}.")
    else:
      check(value, spec, f"{path}.")


def resumable_keys(schema: dict, prefix: str = "") -> list[str]:
  """The dotted keys (with `*` for an entry name) that may change on resume."""
  out = []
  for name, spec in schema.items():
    if isinstance(spec, Key):
      out += [prefix + name] if spec.resumable else []
    elif isinstance(spec, Entries):
      out += resumable_keys(spec.schema, f"{prefix}{name}.*.")
    else:
      out += resumable_keys(spec, f"{prefix}{name}.")
  return out


def subset(section: dict, drop=(), **replace) -> dict:
  """A schema section without the keys in `drop`, with some keys' specs replaced."""
  return {k: replace.get(k, v) for k, v in section.items() if k not in drop}


# --- the shared sections ----------------------------------------------------------------------------

TRAIN = {
  "steps": Key(100, "> 0", resumable=True),
  "global_batch": Key(16, "> 0"),
  "seq_len": Key(256, "> 0"),
  "grad_accum": Key(1, ">= 1"),
  "seed": Key(0, ">= 0"),
  "nonfinite": Key("stop", choices=("stop", "skip"), resumable=True),  # on a non-finite loss/gradient
  "log_every": Key(10, "> 0", resumable=True),
  "eval_every": Key(50, "> 0", resumable=True),
  "eval_batches": Key(4, ">= 0", resumable=True),
  "checkpoint_every": Key(50, "> 0", resumable=True),
  "keep_checkpoints": Key(3, ">= 1", resumable=True),
  "async_checkpoint": Key(True, resumable=True),
  "progress_bar": Key(True, resumable=True),
  "init_from": Key(""),  # a run directory (or an imported Hugging Face model) to start from
  # Accept checkpoint steps that lack their integrity record but carry orbax's commit marker
  # (commit_success.txt), writing the record; without it such a workdir is refused, never overwritten.
  "trust_orbax_commit": Key(False, resumable=True),
}

OPTIM = {
  "lr_peak": Key(1e-3, ">= 0"),
  "lr_end_ratio": Key(0.1, "[0, 1]", resumable=True),
  "warmup_steps": Key(10, ">= 0"),
  "decay_steps": Key(0, ">= 0", resumable=True),  # 0: decay over the run's steps
  "schedule": Key("cosine", choices=("cosine", "constant")),
  "weight_decay": Key(0.1, ">= 0"),
  "b1": Key(0.9, "[0, 1)"),
  "b2": Key(0.95, "[0, 1)"),
  "eps": Key(1e-8, "> 0"),
  "grad_clip_norm": Key(1.0, ">= 0"),  # 0: no clipping
}

MESH = {  # -1: the devices left over by the other axes
  "data": Key(-1, ">= -1", resumable=True),
  "fsdp": Key(1, ">= -1", resumable=True),
  "tensor": Key(1, ">= -1", resumable=True),
}

METRICS = {
  "tensorboard": Key(True, resumable=True),
  "peak_flops": Key(0.0, ">= 0", resumable=True),  # per device; 0: the table in metrics.py
}


def stage_schema(stage: str, **sections) -> dict:
  """The schema of a stage's config: its name, the shared train/optim/mesh/metrics sections (each
  replaceable by a keyword) and the stage's own sections."""
  base = {
    "stage": Key(stage, choices=(stage,)),
    "train": TRAIN,
    "optim": OPTIM,
    "mesh": MESH,
    "metrics": METRICS,
  }
  return {**base, **sections}


# --- loading `FILE.py:ARG` and overrides ---------------------------------------------------------------


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 300 else text[:300] + "..."


def load_file(spec: str, what: str = "--config"):
  """get_config(ARG) (or get_config()) of `path/to/file.py[:ARG]`; ConfigError naming `what` and the
  file for a missing file, a file that does not import, one without get_config, or a get_config that
  raises (e.g. an unknown preset)."""
  path, _, arg = str(spec).partition(":")
  if not path.endswith(".py"):
    raise ConfigError(f"{what}: expected FILE.py or FILE.py:ARG, got {spec!r}")
  if not os.path.isfile(path):
    raise ConfigError(f"{what}: file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location(f"_gpt_jax_cfg_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{what}: {path} line {e.lineno}: syntax error ({e.msg})") from None
  except Exception as e:  # noqa: BLE001 - whatever the file raises becomes one line naming it
    raise ConfigError(f"{what}: {path} failed to import: {type(e).__name__}: {_one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{what}: {path} has no get_config() function")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except ConfigError as e:
    raise ConfigError(f"{what}: {spec}: {e}") from None
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"{what}: {spec}: {type(e).__name__}: {_one_line(e)}") from None
  if not isinstance(cfg, ml_collections.ConfigDict | dict):
    raise ConfigError(f"{what}: {spec}: get_config returned {type(cfg).__name__}, expected a ConfigDict")
  return ml_collections.ConfigDict(cfg)


def load(spec: str, overrides: list[str] | dict | None = None) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py:ARG`, applies overrides and locks the config (unknown keys then fail).

  overrides: {"train.steps": 10} or ["train.steps=10"]; strings are parsed as Python literals where
  possible. A whole section may be replaced by another file's config: {"data": "FILE.py:ARG"}.
  """
  cfg = load_file(spec)
  cfg.lock()
  apply_overrides(cfg, overrides or {})
  return cfg


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text


def override(cfg: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets dotted `key` of a (locked) config; ConfigError naming it when it does not exist or the value
  has another type. A section takes a ConfigDict / dict, or a `FILE.py:ARG` string naming one."""
  parent, _, leaf = key.rpartition(".")
  node, walked = cfg, []
  for part in parent.split(".") if parent else []:
    walked.append(part)
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"{key}: {'.'.join(walked[:-1])} is a value, not a section")
    if part not in node:
      raise ConfigError(f"{key}: unknown config key ({'.'.join(walked)!r} does not exist)")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    raise ConfigError(f"{key}: {parent} is a value, not a section")
  if leaf not in node:
    raise ConfigError(f"{key}: unknown config key")
  old = node[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    if isinstance(value, str):
      value = load_file(value, what=key)
    if not isinstance(value, dict | ml_collections.ConfigDict):
      raise ConfigError(f"{key}: expected a section (or FILE.py:ARG), got {value!r}")
    value = ml_collections.ConfigDict(value)
  elif old is not None and not isinstance(value, type(old)):
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    else:
      raise ConfigError(f"{key}: expected {type(old).__name__}, got {value!r}")
  with cfg.unlocked():
    node[leaf] = value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> None:
  items = overrides.items() if isinstance(overrides, dict) else (o.split("=", 1) for o in overrides)
  for key, value in items:
    override(cfg, key, _literal(value) if isinstance(value, str) else value)


def preset(presets: dict, name: str, where: str) -> dict:
  """presets[name]; ConfigError naming the known presets for an unknown one."""
  if name not in presets:
    raise ConfigError(f"{where}: unknown preset {name!r}; known: {', '.join(presets)}")
  return presets[name]


def experiment(cfg, presets: dict, name: str, where: str, *, model_from: str = "", take=("model",)):
  """An experiment file's get_config(name): `cfg` (a stage's default config) with preset `name`
  applied. A preset is {"model": NAME, "dotted.key": value, ...}; with `model_from` (another experiment
  file, FILE.py), the keys or sections `take` come from that file's preset NAME (a later stage's model
  is exactly its starting run's)."""
  keys = dict(preset(presets, name, where))
  model = keys.pop("model", None)
  if model_from:
    source = load_file(f"{model_from}:{model}")
    for key in take:
      value = source
      for part in key.split("."):
        value = value[part]
      override(cfg, key, value)
  apply_overrides(cfg, keys)
  return cfg


# --- diffs and the resume rule ----------------------------------------------------------------------


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


def _matches(key: str, pattern: str) -> bool:
  kp, pp = key.split("."), pattern.split(".")
  return len(kp) == len(pp) and all(p in ("*", k) for k, p in zip(kp, pp))


def check_resume(saved: dict, current: dict, resumable, what: str = "workdir") -> list[str]:
  """Raises ConfigError listing the differing keys that may not change on resume (all but the
  `resumable` patterns); returns the keys that changed and may."""
  diffs = config_diff(saved, current)
  refused = [
    f"{k} ({old!r} -> {new!r})" for k, old, new in diffs if not any(_matches(k, p) for p in resumable)
  ]
  if refused:
    raise ConfigError(
      f"{what} was made with a different config; these keys may not change on resume: "
      + "; ".join(refused)
      + " (use a new --workdir, or restore the old values)"
    )
  return [k for k, _, _ in diffs]


# --- checks shared by the stages' validate() ---------------------------------------------------------


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
  for a, s in sizes.items():
    if s == 0:
      raise ConfigError(f"mesh.{a}: must be a positive size or -1, got 0")
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"mesh: at most one of data, fsdp, tensor may be -1, got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if -1 not in sizes.values() and fixed != n_devices:
    raise ConfigError(f"mesh: data*fsdp*tensor = {fixed} ({sizes}) but there are {n_devices} devices")
  if -1 in sizes.values() and n_devices % fixed:
    raise ConfigError(f"mesh: {n_devices} devices cannot be split into {sizes}")
  free = n_devices // fixed
  return (sizes["data"] if sizes["data"] != -1 else free) * (sizes["fsdp"] if sizes["fsdp"] != -1 else free)


def check_batch(name: str, rows: int, grad_accum: int, shards: int, *, unit: int = 1) -> None:
  """`rows` splits into grad_accum microbatches of whole units (e.g. comparison pairs) that divide over
  the data-parallel shards; ConfigError naming `name` otherwise."""
  if rows % (grad_accum * unit):
    extra = f" x {unit} (rows per unit)" if unit > 1 else ""
    raise ConfigError(f"{name}: {rows} must be a multiple of train.grad_accum={grad_accum}{extra}")
  micro = rows // grad_accum
  if micro % shards:
    raise ConfigError(
      f"{name}: {rows} (/{grad_accum} microbatches = {micro}) is not divisible by the {shards} "
      "data-parallel shards (mesh.data*mesh.fsdp)"
    )


def check_train(cfg, n_devices: int) -> None:
  """The shared training keys against each other and the device count (types and bounds are the
  schema's): the context fits the position table, the batch splits over microbatches and shards, and
  the schedule's warmup ends before its decay."""
  t, m = cfg.train, cfg.model
  if t.seq_len > m.max_seq_len:
    raise ConfigError(
      f"train.seq_len: {t.seq_len} is longer than the model's position table (model.max_seq_len={m.max_seq_len})"
    )
  check_batch("train.global_batch", int(t.global_batch), int(t.grad_accum), data_shards(cfg, n_devices))
  check_schedule(cfg.optim, int(t.steps))


def check_schedule(o, total_steps: int) -> None:
  """The cosine schedule's warmup ends before its decay (optim.decay_steps, 0 = total_steps)."""
  decay = int(o.decay_steps) or int(total_steps)
  if o.schedule == "cosine" and int(o.warmup_steps) >= decay:
    raise ConfigError(f"optim.warmup_steps: {o.warmup_steps} must be smaller than the decay steps ({decay})")
