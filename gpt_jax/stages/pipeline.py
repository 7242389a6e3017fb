"""The whole recipe in one command: tokenizer + pretraining, SFT, reward model, and the post-training
methods (DPO, PPO, GRPO), then the report.

`stages` lists the pipeline's entries in recipe order; each entry is a nested config whose `stage` key
names its stage (so one stage may run twice under two names, e.g. GRPO on the grader and GRPO on the
reward model). Each entry runs in its own subfolder of the pipeline workdir and starts from the
earlier entries' runs (`train.init_from`, `<rl>.sft_workdir`, `<rl>.rm_workdir` and DPO's comparisons
are filled in here); every entry has the pretrained model's shape and SFT's task space. An entry that
finished leaves a `DONE` marker and is skipped on re-runs; an interrupted one resumes from its newest
checkpoint. Every entry's config is checked before the first one starts. The report (report.md + PNG
plots) is rewritten after every entry.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from gpt_jax import config as config_lib
from gpt_jax import files
from gpt_jax import stages as stages_lib
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, GptJaxError

STAGE_ORDER = stages_lib.ORDER
DONE = "DONE"
PIPELINE_CONFIG = "pipeline_config.json"  # the pipeline's keys and each finished entry's config as it ran


def entries(cfg) -> dict[str, str]:
  """{entry name: its stage} of cfg.stages, in order; ConfigError for an unknown entry or stage, or an
  order the recipe cannot run (a stage before the one it starts from)."""
  names = [s.strip() for s in str(cfg.stages).split(",") if s.strip()]
  out = {}
  for n in names:
    if n not in cfg or not isinstance(cfg[n], ml_collections.ConfigDict) or "stage" not in cfg[n]:
      raise ConfigError(f"stages: {n!r} has no config section with a `stage` key")
    if cfg[n].stage not in STAGE_ORDER:
      raise ConfigError(f"{n}.stage: unknown stage {cfg[n].stage!r}; known: {', '.join(STAGE_ORDER)}")
    out[n] = str(cfg[n].stage)
  ranks = [STAGE_ORDER.index(stage) for stage in out.values()]
  if ranks != sorted(ranks):
    raise ConfigError(f"stages: must be in recipe order {', '.join(STAGE_ORDER)}, got {cfg.stages!r}")
  for needed in ("pretrain", "sft"):
    if needed not in out.values() and any(
      STAGE_ORDER.index(s) > STAGE_ORDER.index(needed) for s in out.values()
    ):
      raise ConfigError(f"stages: the recipe needs a {needed} entry before {', '.join(out)}")
  return out


def stage_dirs(workdir: str, cfg) -> dict[str, str]:
  return {name: os.path.join(workdir, name) for name in entries(cfg)}


def _first(found: dict[str, str], stage: str) -> str | None:
  return next((name for name, s in found.items() if s == stage), None)


def wire(cfg, workdir: str) -> None:
  """Points every entry at the earlier entries' runs; one model shape (the pretrained one) and one task
  space (SFT's) for the whole recipe."""
  found = entries(cfg)
  dirs = {name: os.path.join(workdir, name) for name in found}
  pre, sft, rm = (_first(found, s) for s in ("pretrain", "sft", "rm"))
  with cfg.unlocked():
    for name, stage in found.items():
      c = cfg[name]
      if stage != "pretrain":
        c.model = ml_collections.ConfigDict(cfg[pre].model.to_dict())
      if stage not in ("pretrain", "sft") and "tasks" in c:
        for key in tasks_lib.SPACE_KEYS:
          c.tasks[key] = cfg[sft].tasks[key]
      if stage == "sft":
        c.train.init_from = dirs[pre]
      elif stage in ("rm", "dpo"):
        c.train.init_from = dirs[sft]
      elif stage in ("ppo", "grpo"):
        c[stage].sft_workdir = dirs[sft]
        if rm is not None and (stage == "ppo" or not c.grpo.rm_workdir):
          c[stage].rm_workdir = dirs[rm]
      if stage == "dpo" and rm is not None:
        # DPO learns from the reward model's comparisons: its files, or the same embedded pairs.
        for key in ("data_path", "eval_path", "eval_fraction", "rambling_fraction"):
          c.dpo[key] = cfg[rm].rm[key]
        for key in ("seed", "train", "eval"):
          c.tasks[key] = cfg[rm].tasks[key]


def _is_entry(value) -> bool:
  """True for a pipeline entry's section (a stage config: it has a `stage` key)."""
  return isinstance(value, dict | ml_collections.ConfigDict) and "stage" in value


def _read_pipeline_config(path: str) -> dict:
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"pipeline workdir: {path} is unreadable ({type(e).__name__}); delete it") from None
  if not isinstance(saved, dict):
    raise ConfigError(f"pipeline workdir: {path} is not a JSON object; delete it")
  return saved


def _changes(ran: dict, current: dict, schema: dict) -> list[str]:
  """`key (old -> new)` for each key of a stage's config that differs from the config it ran with (a
  key added to the schema since then, at its default, is no change)."""
  default = config_lib.flatten(config_lib.to_dict(config_lib.defaults(schema)))
  return [
    f"{k} ({old!r} -> {new!r})"
    for k, old, new in config_lib.config_diff(ran, current)
    if not (old == "<absent>" and k in default and default[k] == new)
  ]


def check_workdir_config(cfg, workdir: str, *, force: bool = False, log_fn=print) -> dict:
  """Refuses a pipeline workdir made by a different config; returns (and writes as
  pipeline_config.json) the record of what ran: the pipeline's own keys and the config of each
  finished stage as it ran (`run` adds each stage once it finished).

  A finished stage (DONE) is not run again: its config is compared with the one its newest checkpoint
  recorded (else its config.json, else pipeline_config.json's), and any difference is refused; with
  `force` the finished stage is kept as it is, its recorded config stays, and the keys that were not
  applied are logged. A stage still to run checks its own workdir when it starts (its resumable keys
  may change). The keys outside the stages (`stages`) must be the same unless `force`.
  """
  from gpt_jax import runs

  path = os.path.join(workdir, PIPELINE_CONFIG)
  current = config_lib.to_dict(cfg)
  saved = _read_pipeline_config(path) if os.path.exists(path) else {}
  found = entries(cfg)
  record = {k: v for k, v in current.items() if k not in found and not _is_entry(v)}
  dirs = stage_dirs(workdir, cfg)
  for name, stage in found.items():
    if not os.path.exists(os.path.join(dirs[name], DONE)):
      continue
    ran = runs.saved_config(dirs[name])[0] or saved.get(name) or current[name]
    record[name] = ran
    changes = _changes(ran, current[name], stages_lib.module(stage).SCHEMA)
    if not changes:
      continue
    if not force:
      raise ConfigError(
        f"pipeline workdir {workdir}: stage {name} finished with another config: {'; '.join(changes)} "
        f"(restore the old values; or delete {dirs[name]}/{DONE} to go on with these, where the stage "
        "allows it; or pass --force to keep the finished stage as it is)"
      )
    log_fn(f"[pipeline] {name}: finished with another config, kept as it is (--force): {'; '.join(changes)}")
  if saved and not force:
    own = lambda d: {k: v for k, v in d.items() if not _is_entry(v) and k != "eval_tasks"}
    other = [k for k, _, _ in config_lib.config_diff(own(saved), own(current))]
    if other:
      raise ConfigError(
        f"pipeline workdir {workdir} was made with a different config: {', '.join(other)} differ"
      )
  _write_record(workdir, record)
  return record


def _write_record(workdir: str, record: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  files.write_atomic(
    os.path.join(workdir, PIPELINE_CONFIG), json.dumps(record, indent=2, sort_keys=True).encode()
  )


def run(cfg, workdir: str, log_fn=print, *, force: bool = False) -> dict:
  """Runs the entries in order, skipping finished ones; returns {entry: seconds it took this time}."""
  from gpt_jax import report

  unknown = [k for k in cfg if k not in ("stage", "stages", "eval_tasks") and not _is_entry(cfg[k])]
  if unknown:
    raise ConfigError(
      f"{unknown[0]}: unknown config key (a pipeline config has stage, stages and its entries' sections)"
    )
  found = entries(cfg)
  wire(cfg, workdir)
  for name, stage in found.items():  # every entry's config is checked before the first one starts
    try:
      stages_lib.module(stage).validate(cfg[name])
    except GptJaxError as e:
      raise type(e)(f"{name}.{e}" if str(e).split(":")[0].count(" ") == 0 else f"{name}: {e}") from None
  from gpt_jax.eval import run as eval_run

  eval_run.check_tasks(cfg.get("eval_tasks", ""), cfg)  # evaluation changes no stage: not a workdir key
  record = check_workdir_config(cfg, workdir, force=force, log_fn=log_fn)
  dirs = stage_dirs(workdir, cfg)
  timings = _read_timings(workdir)
  for name, stage in found.items():
    stage_dir = dirs[name]
    if os.path.exists(os.path.join(stage_dir, DONE)):
      log_fn(f"[pipeline] {name}: done already ({stage_dir})")
      continue
    log_fn(f"[pipeline] {name}: running in {stage_dir}")
    module = stages_lib.module(stage)
    # A resumed stage adds to the time of its interrupted run; one whose folder is gone starts over.
    before = timings.get(name, 0.0) if os.path.isdir(stage_dir) else 0.0
    t0 = time.time()
    try:
      module.run(cfg[name], stage_dir, log_fn=log_fn)
    except GptJaxError as e:
      raise type(e)(f"pipeline stage {name!r} failed (earlier stages are intact in {workdir}): {e}") from e
    timings[name] = before + time.time() - t0
    _write_timings(workdir, timings)
    with open(os.path.join(stage_dir, DONE), "w") as f:
      f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    record[name] = config_lib.to_dict(cfg[name])
    _write_record(workdir, record)
    report.write(workdir, cfg, log_fn=log_fn)
  # eval.json (the report's evaluation table): every model the pipeline made, on the same tasks.
  models = [name for name, stage in found.items() if stage != "rm"]
  eval_run.evaluate_pipeline(workdir, cfg.get("eval_tasks", ""), names=models, log_fn=log_fn)
  report.write(workdir, cfg, log_fn=log_fn)
  return timings


def _read_timings(workdir: str) -> dict:
  path = os.path.join(workdir, "timings.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _write_timings(workdir: str, timings: dict) -> None:
  files.write_atomic(os.path.join(workdir, "timings.json"), json.dumps(timings, indent=2).encode())
