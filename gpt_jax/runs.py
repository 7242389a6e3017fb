"""Run directories: what one stage leaves for the next, and for chat, export and evaluation.

A run directory is either a stage's workdir

  <run>/config.json                    the config the run started with
  <run>/checkpoints/<step>/{state,extra}  orbax; the extra records the stage and the config
  <run>/tokenizer/ or <run>/hf_tokenizer/  the tokenizer its token ids belong to
  <run>/reward_stats.json              a reward model's score statistics over the SFT model's samples

or a Hugging Face model imported with `import-hf` (model_config.json, state/, hf_tokenizer/).
`open(path)` takes either, or a workdir's checkpoints directory, or one step directory, and says what
is there: the stage that wrote it, the config its newest valid checkpoint was saved with, the model,
the tokenizer, and where the parameters of the model later stages load are. Every stage opens the runs
it starts from here and checks them with the same rules (`check_stage`, `check_model`); no stage
reads another stage's files any other way.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import math
import os
import shutil

import jax

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import distributed, integrity
from gpt_jax import tokenizers as tok_lib
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.model import WEIGHT_NEUTRAL_KEYS, ModelConfig

log = logging.getLogger("gpt_jax")

CONFIG_FILE = "config.json"
REWARD_STATS_FILE = "reward_stats.json"
IMPORT_MODEL_CONFIG = "model_config.json"  # an import-hf directory: this file beside state/
IMPORT_STATE = "state"
IMPORT = "import"
# Where each stage's checkpoint keeps the transformer later stages and inference load (a reward
# model's params are {"trunk", "head"}; an RL run's {"policy", ...}).
MODEL_ITEM = {
  "pretrain": "params",
  "sft": "params",
  "dpo": "params",
  "rm": "params/trunk",
  "ppo": "params/policy",
  "grpo": "params",
  IMPORT: "params",
}
CHAT_STAGES = ("sft", "rm", "dpo", "ppo", "grpo")  # runs whose model answers in the chat template


@dataclasses.dataclass
class Run:
  """A finished (or checkpointed) run, as the next stage sees it."""

  workdir: str  # the run directory (an import's own directory)
  stage: str  # pretrain | sft | rm | dpo | ppo | grpo | import
  config: dict  # the config its newest valid checkpoint recorded ({"model": ...} for an import)
  checkpoint: str  # what checkpoint.restore_params reads: a checkpoints dir, one step dir, or the import
  step: int | None  # that checkpoint's step (None for an import)
  extra: dict = dataclasses.field(default_factory=dict)  # the checkpoint's whole JSON extra

  @property
  def imported(self) -> bool:
    return self.stage == IMPORT

  @property
  def model(self) -> dict:
    """The config of the model later stages load (an RL run's: its policy's)."""
    return self.config["model"]

  def model_config(self) -> ModelConfig:
    return ModelConfig.from_config(self.model)

  @property
  def model_item(self) -> str:
    return MODEL_ITEM[self.stage]

  @property
  def is_chat(self) -> bool:
    """Finetuned models answer in the chat template; a pretrained (or imported) one continues text."""
    return self.stage in CHAT_STAGES

  def describe(self) -> str:
    at = "" if self.step is None else f", step {self.step}"
    return f"{self.workdir} ({'an import' if self.imported else f'stage {self.stage!r}'}{at})"

  def tokenizer(self):
    """The run's tokenizer (DataError when it has none)."""
    return tok_lib.load(self.workdir)

  def reward_stats(self) -> dict | None:
    """A reward model's reward_stats.json ({"mean", "std", ...}), or None before it was written."""
    return read_reward_stats(self.workdir)

  def fact(self) -> dict:
    """What a run started from this one records about it (checkpoint extra "init"): the run's real
    path, its checkpoint step and its stage."""
    return {"workdir": os.path.realpath(self.workdir), "step": self.step, "stage": self.stage}

  def restore(self, abstract, item: str | None = None):
    """The checkpoint's `item` (default: the model later stages load) placed as `abstract` says."""
    return ckpt_lib.restore_params(self.checkpoint, abstract, item=item or self.model_item)


def is_imported(path: str) -> bool:
  """True for a directory written by import-hf (model_config.json next to state/)."""
  return os.path.isfile(os.path.join(path, IMPORT_MODEL_CONFIG)) and os.path.isdir(
    os.path.join(path, IMPORT_STATE)
  )


def _read_json(path: str, what: str) -> dict:
  try:
    with builtins.open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{what}: {path} is unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{what}: {path} is not a JSON object")
  return out


def write_json(path: str, obj) -> None:
  """Writes `obj` as JSON atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with builtins.open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def open(path: str, what: str = "train.init_from") -> Run:  # noqa: A001 - the module's verb
  """The run at `path`: a workdir, its checkpoints dir, one step dir, or an import. CheckpointError
  naming `what` when the path does not exist or holds no valid checkpoint."""
  p = os.path.abspath(os.path.expanduser(str(path)))
  if not str(path) or not os.path.exists(p):
    raise CheckpointError(
      f"{what}: {p} does not exist" if str(path) else f"{what}: required (a run directory)"
    )
  if is_imported(p):
    model = {
      k: v for k, v in _read_json(os.path.join(p, IMPORT_MODEL_CONFIG), what).items() if not k.startswith("_")
    }
    return Run(p, IMPORT, {"model": model}, p, None)
  if os.path.isdir(os.path.join(p, "state")):  # one step directory: <workdir>/checkpoints/<step>
    ckpt_dir, step, workdir = (
      os.path.dirname(p),
      int(os.path.basename(p)),
      os.path.dirname(os.path.dirname(p)),
    )
    target = p
  else:
    ckpt_dir = os.path.join(p, "checkpoints") if os.path.isdir(os.path.join(p, "checkpoints")) else p
    workdir = p if ckpt_dir != p else os.path.dirname(p)
    step, target = None, ckpt_dir
  with ckpt_lib.Checkpointer(ckpt_dir, create=False) as ck:
    if step is None:
      step = ck.latest_step()
      if step is None:
        raise CheckpointError(f"{what}: {p} holds no valid checkpoint (is it a finished run's directory?)")
    try:
      extra = ck.read_extra(step)
    except CheckpointError as e:
      raise CheckpointError(f"{what}: {e}") from None
  config = extra.get("config")
  if not isinstance(config, dict):
    cfg_path = os.path.join(workdir, CONFIG_FILE)
    config = _read_json(cfg_path, what) if os.path.isfile(cfg_path) else {}
  stage = extra.get("stage") or config.get("stage")
  if stage not in MODEL_ITEM or "model" not in config:
    raise CheckpointError(f"{what}: {p} records no stage and model config (not a gpt_jax run)")
  return Run(workdir, stage, config, target, step, extra)


def check_stage(run: Run, allowed: tuple[str, ...], what: str, hint: str = "") -> None:
  """CheckpointError unless the run was written by one of the `allowed` stages."""
  if run.stage not in allowed:
    names = " or ".join(repr(a) for a in allowed)
    raise CheckpointError(
      f"{what}: {run.workdir} is a run of stage {run.stage!r}, expected {names}"
      + (f"; {hint}" if hint else "")
    )


def derived_model_keys(model: dict) -> dict:
  """The model keys with each "0 = derive it" value (d_ff, head_dim, num_kv_heads) replaced by what it
  derives, so that e.g. an import's num_kv_heads=32 equals a preset's 0 with 32 heads."""
  m = dict(model)
  try:
    d, h = int(m["d_model"]), int(m["num_heads"])
    for key, value in (("d_ff", 4 * d), ("head_dim", d // h), ("num_kv_heads", h)):
      if not int(m.get(key) or 0):
        m[key] = value
  except (KeyError, TypeError, ValueError, ZeroDivisionError):
    pass  # an invalid config: ModelConfig.validate names it
  return m


def model_difference(saved: dict, current: dict) -> tuple[str, object, object] | None:
  """(key, current value, saved value) of a model key that changes the weights (WEIGHT_NEUTRAL_KEYS
  do not), or None. "0 = derive it" equals the value it derives; a key set differently is named before
  one that differs only through another (d_model 64 vs 32 before the d_ff it derives)."""
  a, b = derived_model_keys(saved), derived_model_keys(current)
  keys = [k for k in sorted(set(a) | set(b)) if k not in WEIGHT_NEUTRAL_KEYS and a.get(k) != b.get(k)]
  if not keys:
    return None
  raw = [k for k in keys if saved.get(k) != current.get(k)]
  key = (raw or keys)[0]
  return (key, current.get(key), saved.get(key)) if raw else (key, b.get(key), a.get(key))


def check_model(model: dict, run: Run, role: str) -> None:
  """CheckpointError naming the first model key of this config that differs from the run's model
  (e.g. role "the SFT model": the model must have the run's shape to load its weights)."""
  diff = model_difference(run.model, model)
  if diff is not None:
    key, mine, theirs = diff
    raise CheckpointError(
      f"model.{key}: {mine!r} differs from {theirs!r} in {run.describe()}; the model must have {role}'s shape"
    )


def check_same_tokenizer(a, b, what: str) -> None:
  """DataError unless two tokenizers are the same (sha256 of their files)."""
  if a.sha256() != b.sha256():
    raise DataError(
      f"{what}: tokenizer {b.path} differs from {a.path}; both runs must use the same token ids"
    )


def has_checkpoint(workdir: str) -> bool:
  """True when the workdir holds a valid checkpoint (a run there resumes from it)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return False
  with ckpt_lib.Checkpointer(d, create=False) as ck:
    return ck.latest_step() is not None


def install_tokenizer(src: Run | None, workdir: str, log_fn=print):
  """The workdir's tokenizer: copied from the run it starts from (once) and loaded.

  The project's SentencePiece model goes to <workdir>/tokenizer/, a Hugging Face tokenizer directory to
  <workdir>/hf_tokenizer/, so that tokenizers.load(workdir) reads it back for this stage's
  successors. On a later invocation the copy must still be the source run's (same sha256)."""
  if tok_lib.has_tokenizer(workdir):
    tok = tok_lib.load(workdir)
    if src is not None:
      check_same_tokenizer(src.tokenizer(), tok, "--workdir")
    return tok
  if src is None:
    raise DataError(f"tokenizer: {workdir} has no tokenizer/ nor {tok_lib.HF_TOKENIZER_DIR}/")
  if not tok_lib.has_tokenizer(src.workdir):
    raise DataError(
      f"{src.workdir} has no tokenizer (tokenizer/ or {tok_lib.HF_TOKENIZER_DIR}/); an import needs a Hugging "
      "Face directory with tokenizer.json or tokenizer.model"
    )
  for name in (tok_lib.SENTENCEPIECE_DIR, tok_lib.HF_TOKENIZER_DIR):
    theirs = os.path.join(src.workdir, name)
    if not os.path.isdir(theirs) or jax.process_index() != 0:
      continue
    # Copied whole into a temporary directory, then renamed: its presence marks a finished copy.
    tmp = os.path.join(workdir, f"{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(theirs, tmp)
    os.replace(tmp, os.path.join(workdir, name))
    break
  distributed.barrier("gpt_jax_tokenizer_installed")
  tok = tok_lib.load(workdir)
  log_fn(f"tokenizer ({tok.vocab_size} pieces) copied from {src.workdir}")
  return tok


def read_reward_stats(workdir: str, what: str = "reward_stats") -> dict | None:
  """reward_stats.json of a reward-model run ({"mean", "std", ...}), or None when it is not there;
  DataError when it is malformed."""
  path = os.path.join(workdir, REWARD_STATS_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with builtins.open(path) as f:
      stats = json.load(f)
    mean, std = float(stats["mean"]), float(stats["std"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{what}: {path}: expected {{'mean': float, 'std': float}} ({e})") from None
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise DataError(f"{what}: {path}: mean must be finite and std > 0, got mean={mean}, std={std}")
  return stats


# --- the run's own workdir ---------------------------------------------------------------------------


@dataclasses.dataclass
class Resume:
  """The checkpoint a run in `workdir` resumes from, as that checkpoint recorded it (step None: the
  run starts fresh)."""

  workdir: str
  step: int | None = None
  extra: dict = dataclasses.field(default_factory=dict)

  def check_record(self, record: dict) -> None:
    """CheckpointError naming the first fact of `record` (e.g. {"tokenizer": {"sha256": ...}}) that
    differs from what the checkpoint recorded of it; facts the checkpoint does not record pass."""
    if self.step is None:
      return
    check_record(self.extra, record, f"checkpoint step {self.step} in {self.workdir}")

  def check_tokenizer(self) -> None:
    """check_record of the tokenizer in the workdir (tokenizer/ or hf_tokenizer/), if it holds one:
    before the files made with it are verified or rebuilt."""
    if self.step is not None and tok_lib.has_tokenizer(self.workdir):
      self.check_record(tokenizer_record(tok_lib.load(self.workdir)))


def tokenizer_record(tokenizer) -> dict:
  """What each checkpoint records of the tokenizer its token ids belong to: its kind and hash."""
  return {"tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256()}}


# Why a recorded fact must match, and what to do when it does not.
_FACT_HINTS = {
  "tokenizer": "its token ids belong to the recorded tokenizer: restore that one (or use a new --workdir)",
  "init": "the run resumes from the model it started from: point the key back at that run (or use a new --workdir)",
}


def _shown(key: str, value) -> str:
  if key.endswith("sha256") and isinstance(value, str):
    return repr(value[:12])
  return repr(value)


def check_record(extra: dict, record: dict, where: str) -> None:
  """CheckpointError for the first key of `record`'s facts that differs from the checkpoint `extra`'s
  record of the same fact (the message names the key and both values); a fact (or a key of one) the
  checkpoint does not record passes."""
  for fact, value in record.items():
    if fact not in extra:
      continue
    mine, theirs = config_lib.flatten({fact: value}), config_lib.flatten({fact: extra[fact]})
    for key in sorted(theirs):  # what the checkpoint does not record of a fact (an older one's) passes
      if mine.get(key, "<absent>") != theirs[key]:
        raise CheckpointError(
          f"--workdir: {where} records {key}={_shown(key, theirs.get(key, '<absent>'))}, this run has "
          f"{_shown(key, mine.get(key, '<absent>'))}; {_FACT_HINTS.get(fact, 'use a new --workdir')}"
        )


def latest_checkpoint(ck: ckpt_lib.Checkpointer) -> int | None:
  """The newest valid step of a run's own checkpoints, or None when there are none. CheckpointError
  when step directories exist but none passes its integrity check: starting over would replace them."""
  steps = ck.step_dirs()
  if ck.trust_commit:  # every committed step gets its record, not only the newest
    for step in steps:
      ck.check(step)
  reasons = {}
  for step in reversed(steps):
    reasons[step] = ck.check(step)
    if reasons[step] is None:
      return ck.latest_step()  # warns about the newer invalid steps it skips
  if not steps:
    return None
  committed = [s for s in steps if reasons[s] == integrity.NO_RECORD and ck.committed(s)]
  trust = (
    "set train.trust_orbax_commit=True to accept the steps orbax marked committed "
    f"({', '.join(map(str, committed))}) and write their records, or "
    if committed
    else ""
  )
  raise CheckpointError(
    f"--workdir: no checkpoint in {ck.directory} passes its integrity check ("
    + "; ".join(f"step {s}: {reasons[s]}" for s in steps)
    + f"); starting over would replace them: {trust}move {ck.directory} away (or use a new --workdir) "
    "to start over"
  )


def _config_json(workdir: str) -> tuple[dict | None, str]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.lexists(path):
    return None, ""
  try:
    return _read_json(path, "--workdir"), CONFIG_FILE
  except CheckpointError as e:
    raise ConfigError(f"{e}; delete it or use a new --workdir") from None


def saved_config(workdir: str) -> tuple[dict | None, str]:
  """(the config a resume of this workdir must agree with, where it was read): the newest valid
  checkpoint's recorded config, else config.json of a run that started but never checkpointed."""
  d = os.path.join(workdir, "checkpoints")
  if os.path.isdir(d):
    with ckpt_lib.Checkpointer(d, create=False) as ck:
      step = ck.latest_step()
      if step is not None:
        cfg = ck.read_extra(step).get("config")
        if isinstance(cfg, dict):
          return cfg, f"checkpoint step {step}"
  return _config_json(workdir)


def check_resume(
  workdir: str, cfg, schema: dict, *, steps: int | None = None, steps_key: str = "train.steps"
) -> Resume:
  """The one check of the workdir a stage is about to train in, before anything is written or
  built; returns what its newest valid checkpoint recorded (Resume.check_record compares the facts
  known later, e.g. the tokenizer). Refuses, naming the file or key:

  - a `checkpoints` that is not a directory, and step directories none of which is valid (see
    latest_checkpoint; train.trust_orbax_commit accepts the ones orbax committed);
  - a checkpoint of another stage;
  - every key that differs from the config the checkpoint recorded (else config.json of a run that
    started but never checkpointed), except the schema's resumable keys (which are logged);
  - `steps` (set by `steps_key`) below the checkpoint's step: nothing would be trained.
  """
  d = os.path.join(workdir, "checkpoints")
  if os.path.lexists(d) and not os.path.isdir(d):
    raise CheckpointError(f"--workdir: {d} is not a directory (a run keeps its checkpoints there)")
  resume = Resume(workdir)
  if os.path.isdir(d):
    train = cfg.get("train") or {}
    with ckpt_lib.Checkpointer(d, create=False, trust_commit=bool(train.get("trust_orbax_commit"))) as ck:
      resume.step = latest_checkpoint(ck)
      if resume.step is not None:
        resume.extra = ck.read_extra(resume.step)
  if resume.step is not None:
    check_checkpoint(workdir, resume.step, resume.extra, stage=str(cfg.get("stage")))
  saved, source = resume.extra.get("config"), f"checkpoint step {resume.step}"
  if not isinstance(saved, dict):
    saved, source = _config_json(workdir)
  if saved is not None:
    changed = config_lib.check_resume(
      saved, config_lib.to_dict(cfg), config_lib.resumable_keys(schema), what=f"workdir {workdir} ({source})"
    )
    if changed:
      log.warning("resuming %s with changed keys: %s", workdir, ", ".join(changed))
  if resume.step is not None:
    check_checkpoint(workdir, resume.step, resume.extra, steps=steps, steps_key=steps_key)
  return resume


def check_checkpoint(
  workdir: str, step: int, extra: dict, *, stage: str | None = None, steps=None, steps_key="train.steps"
) -> None:
  """ConfigError unless the checkpoint `step` a run resumes from is of `stage` and not past `steps`
  (the config's `steps_key`): a run of another stage, or one with nothing left to train."""
  if stage is not None and extra.get("stage", stage) != stage:
    raise ConfigError(
      f"--workdir: checkpoint step {step} in {workdir} is of stage {extra['stage']!r}, not {stage!r}; "
      "use a new --workdir"
    )
  if steps is not None and step > steps:
    raise ConfigError(
      f"{steps_key}: {steps} is below the step of the newest checkpoint in {workdir} ({step}); "
      f"set it to at least {step}"
    )


def write_config(workdir: str, cfg) -> None:
  """<workdir>/config.json: the config of a run that has started (written once it is known to start)."""
  write_json(os.path.join(workdir, CONFIG_FILE), config_lib.to_dict(cfg))
