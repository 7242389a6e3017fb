"""The whole recipe in one command: tokenizer + pretraining, SFT, reward model, PPO.

Each stage runs in its own subfolder of the pipeline workdir, and each stage's checkpoint feeds the
next (`train.init_from`, `ppo.sft_workdir`, `ppo.rm_workdir` are filled in here). A stage that
finished leaves a `DONE` marker and is skipped on re-runs; an interrupted stage resumes from its
newest checkpoint. The report (report.md + PNG plots) is rewritten after every stage.
"""

from __future__ import annotations

import importlib
import json
import os
import time

import ml_collections

from gpt_jax import config as config_lib
from gpt_jax.errors import ConfigError, GptJaxError

STAGE_ORDER = ("pretrain", "sft", "rm", "ppo")
DONE = "DONE"


def stage_dirs(workdir: str) -> dict[str, str]:
  return {name: os.path.join(workdir, name) for name in STAGE_ORDER}


def _stages(cfg) -> list[str]:
  names = [s.strip() for s in str(cfg.stages).split(",") if s.strip()]
  for n in names:
    if n not in STAGE_ORDER:
      raise ConfigError(f"stages: unknown stage {n!r}; known: {', '.join(STAGE_ORDER)}")
  if names != [s for s in STAGE_ORDER if s in names]:
    raise ConfigError(f"stages: must be in recipe order {', '.join(STAGE_ORDER)}, got {cfg.stages!r}")
  return names


def wire(cfg, workdir: str) -> None:
  """Points every stage at the previous stages' workdirs."""
  dirs = stage_dirs(workdir)
  with cfg.unlocked():
    for name in ("sft", "rm", "ppo"):  # one model shape for the whole recipe: the pretrained one
      if name in cfg and "model" in cfg[name]:
        cfg[name].model = ml_collections.ConfigDict(cfg.pretrain.model.to_dict())
    cfg.sft.train.init_from = dirs["pretrain"]
    if "rm" in cfg:
      cfg.rm.train.init_from = dirs["sft"]
    if "ppo" in cfg:
      cfg.ppo.ppo.sft_workdir = dirs["sft"]
      cfg.ppo.ppo.rm_workdir = dirs["rm"]


def check_workdir_config(cfg, workdir: str, *, force: bool = False) -> None:
  """Refuses a pipeline workdir made by a different config, naming the keys that differ."""
  path = os.path.join(workdir, "pipeline_config.json")
  current = config_lib.to_dict(cfg)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if not force:
      for name in _stages(cfg):
        if name in saved and name in current:
          config_lib.check_resume(
            saved[name], current[name], what=f"pipeline workdir {workdir} (stage {name})"
          )
      other = [
        k
        for k, _, _ in config_lib.config_diff(
          {k: v for k, v in saved.items() if k not in STAGE_ORDER},
          {k: v for k, v in current.items() if k not in STAGE_ORDER},
        )
      ]
      if other:
        raise ConfigError(
          f"pipeline workdir {workdir} was made with a different config: {', '.join(other)} differ"
        )
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(current, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def run(cfg, workdir: str, log_fn=print, *, force: bool = False) -> dict:
  """Runs the stages in order, skipping finished ones; returns {stage: seconds it took this time}."""
  from gpt_jax import report

  names = _stages(cfg)
  wire(cfg, workdir)
  check_workdir_config(cfg, workdir, force=force)
  dirs = stage_dirs(workdir)
  timings = _read_timings(workdir)
  for name in names:
    stage_dir = dirs[name]
    if os.path.exists(os.path.join(stage_dir, DONE)):
      log_fn(f"[pipeline] {name}: done already ({stage_dir})")
      continue
    log_fn(f"[pipeline] {name}: running in {stage_dir}")
    module = importlib.import_module(f"gpt_jax.stages.{name}")
    t0 = time.time()
    try:
      module.run(cfg[name], stage_dir, log_fn=log_fn)
    except GptJaxError as e:
      raise type(e)(f"pipeline stage {name!r} failed (earlier stages are intact in {workdir}): {e}") from e
    timings[name] = timings.get(name, 0.0) + time.time() - t0
    _write_timings(workdir, timings)
    with open(os.path.join(stage_dir, DONE), "w") as f:
      f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    report.write(workdir, cfg, log_fn=log_fn)
  report.write(workdir, cfg, log_fn=log_fn)
  return timings


def _read_timings(workdir: str) -> dict:
  path = os.path.join(workdir, "timings.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _write_timings(workdir: str, timings: dict) -> None:
  with open(os.path.join(workdir, "timings.json"), "w") as f:
    json.dump(timings, f, indent=2)
