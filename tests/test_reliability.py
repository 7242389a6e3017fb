"""Reliability: the cases of docs/robustness.md that a careless user runs into, through the CLI.

Each refusal exits with status 2 and exactly one `gpt_jax: error: ...` line naming the key or file (no
traceback), before anything is compiled, and leaves the workdir byte for byte as it was (no file
changed, removed or added). `loop.run` is replaced by a stand-in that makes the loop's own checks and
then raises `Reached`, so that a case which should be accepted shows that it got as far as training.

The runs refused here are stand-ins written by `fake_run`: a workdir as a stage leaves it, whose
checkpoints record what the stage records (stage, config, tokenizer, init run) around small arrays.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading

import numpy as np
import pytest

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import integrity, loop, runs, stages
from gpt_jax import tokenizers as tok_lib
from gpt_jax.__main__ import main
from gpt_jax.config import Entries, Key
from gpt_jax.errors import ConfigError
from gpt_jax.stages import pipeline
from tests.helpers import PIPELINE, REPO, TINY, seed_workdir, snapshot, tiny_config

EXP = os.path.join(REPO, "experiments")
PRETRAIN = f"{EXP}/pretrain.py:tiny"
SFT = f"{EXP}/sft.py:tiny"
PPO = f"{EXP}/ppo.py:tiny"
SMALL_TASKS = {"tasks.train": 200, "tasks.eval": 32, "sft.eval_samples": 8}


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


TINY_ARGS = flags(TINY)


class Reached(Exception):
  """loop.run was called and its own checks passed: `resumed` is the step it would resume from."""

  def __init__(self, resumed):
    super().__init__(f"reached loop.run (resumes from {resumed})")
    self.resumed = resumed


@pytest.fixture
def cli(monkeypatch, capsys):
  """Runs the CLI in-process: cli(*argv) -> (status, stderr text). loop.run raises Reached."""

  def stand_in(cfg, workdir, job, *, log_fn=print):
    trust = bool(cfg.train.get("trust_orbax_commit", False))
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), create=False, trust_commit=trust)
    raise Reached(loop._resume_point(job, ck, workdir))

  monkeypatch.setattr(loop, "run", stand_in)

  def run(*argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = main(list(argv))
    return status, capsys.readouterr().err

  return run


def refused(cli, wd: str, argv: list[str], *expected: str) -> str:
  """Asserts the one-line refusal (status 2, each `expected` text in it) and an unchanged workdir."""
  before = snapshot(wd) if os.path.isdir(wd) else {}
  status, err = cli(*argv)
  lines = [line for line in err.splitlines() if line.startswith("gpt_jax")]
  assert status == 2 and len(lines) == 1 and lines[0].startswith("gpt_jax: error: "), err
  assert "Traceback" not in err, err
  for text in expected:
    assert text in lines[0], lines[0]
  assert (snapshot(wd) if os.path.isdir(wd) else {}) == before  # byte for byte, nothing added
  return lines[0]


def reached(cli, argv: list[str]):
  with pytest.raises(Reached) as e:
    cli(*argv)
  return e.value.resumed


def fake_run(wd: str, cfg, *, prepared: str | None = None, tokenizer_from: str | None = None, record=None):
  """A workdir as a run of cfg's stage leaves it (checkpoints 3 and 6, config.json, metrics.jsonl), the
  tokenizer and shards of `prepared` or the tokenizer of `tokenizer_from`; returns wd."""
  if prepared:
    seed_workdir(prepared, wd)
  elif tokenizer_from:
    shutil.copytree(os.path.join(tokenizer_from, "tokenizer"), os.path.join(wd, "tokenizer"))
  os.makedirs(wd, exist_ok=True)
  if record is None:
    record = runs.tokenizer_record(tok_lib.load(wd)) if tok_lib.has_tokenizer(wd) else {}
  extra = {"stage": cfg.stage, "config": config_lib.to_dict(cfg), **record}
  with ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False) as ck:
    for step in (3, 6):
      ck.save(step, {"params": {"w": np.zeros(4, np.float32)}}, extra={**extra, "loader": {"index": step}})
  runs.write_config(wd, cfg)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 6, "train/loss": 5.0}) + "\n")
  return wd


@pytest.fixture
def pretrained(prepared_dir, tmp_path):
  """A finished tiny pretraining run (steps 3 and 6) of tiny_config()."""
  return fake_run(str(tmp_path / "pretrain"), tiny_config(), prepared=prepared_dir)


def pretrain_argv(wd: str, *extra: str) -> list[str]:
  return ["pretrain", f"--config={PRETRAIN}", f"--workdir={wd}", *TINY_ARGS, *extra]


# --- 1. never train over intact checkpoints ------------------------------------------------------------


def test_checkpoints_without_integrity_records_are_refused_not_overwritten(cli, pretrained):
  ck_dir = os.path.join(pretrained, "checkpoints")
  for step in (3, 6):
    os.remove(os.path.join(ck_dir, str(step), integrity.RECORD_FILE))
  # A half-written save of step 7 too: orbax's manager would clean it up when created.
  os.makedirs(os.path.join(ck_dir, "7.orbax-checkpoint-tmp-1", "state"))
  open(os.path.join(ck_dir, "7.orbax-checkpoint-tmp-1", "state", "x"), "w").close()
  refused(
    cli,
    pretrained,
    pretrain_argv(pretrained, "--config.train.steps=12"),
    f"--workdir: no checkpoint in {ck_dir} passes its integrity check (step 3: no _INTEGRITY.json",
    "starting over would replace them: set train.trust_orbax_commit=True to accept the steps orbax "
    "marked committed (3, 6) and write their records",
    "(or use a new --workdir)",
  )
  # The recovery: trust orbax's commit marker; the records are written and the run resumes from 6.
  assert (
    reached(
      cli, pretrain_argv(pretrained, "--config.train.steps=12", "--config.train.trust_orbax_commit=True")
    )
    == 6
  )
  assert all(integrity.check(os.path.join(ck_dir, str(s))) is None for s in (3, 6))


def test_checkpoints_without_records_nor_commit_marker_are_refused(cli, pretrained):
  ck_dir = os.path.join(pretrained, "checkpoints")
  for step in (3, 6):
    os.remove(os.path.join(ck_dir, str(step), integrity.RECORD_FILE))
    os.remove(os.path.join(ck_dir, str(step), ckpt_lib.COMMIT_MARKER))
  line = refused(
    cli,
    pretrained,
    pretrain_argv(pretrained, "--config.train.trust_orbax_commit=True"),
    "no checkpoint in",
    f"starting over would replace them: move {ck_dir} away",
  )
  assert "trust_orbax_commit" not in line  # it would not help


# --- 2. the resume check compares the checkpoint's own config ------------------------------------------


def test_deleted_config_json_does_not_bypass_the_resume_check(cli, pretrained):
  os.remove(os.path.join(pretrained, "config.json"))
  refused(
    cli,
    pretrained,
    pretrain_argv(
      pretrained, "--config.optim.lr_peak=0.5", "--config.data.seed=3", "--config.optim.weight_decay=0.0"
    ),
    f"workdir {pretrained} (checkpoint step 6) was made with a different config",
    "data.seed (0 -> 3)",
    "optim.lr_peak (0.003 -> 0.5)",
    "optim.weight_decay (0.1 -> 0.0)",
  )


# --- 3. a checkpoint knows its tokenizer -------------------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
  """A SentencePiece model of another corpus (other ids for the same text)."""
  d = str(tmp_path_factory.mktemp("other_tok"))
  docs = [f"def f{i}(x):\n    return x * {i} + {i * i}  # other\n" * 3 for i in range(300)]
  return tok_lib.train_tokenizer(docs, d, vocab_size=300).path


def test_replaced_tokenizer_is_refused_before_its_shards_are_rebuilt(cli, pretrained, other_tokenizer):
  model = os.path.join(pretrained, "tokenizer", "tokenizer.model")
  old = tok_lib.load(pretrained).sha256()
  shutil.copyfile(other_tokenizer, model)
  shutil.rmtree(os.path.join(pretrained, "shards"))  # what the shard check tells the user to do
  refused(
    cli,
    pretrained,
    pretrain_argv(pretrained),
    f"checkpoint step 6 in {pretrained} records tokenizer.sha256='{old[:12]}', this run has "
    f"'{tok_lib.load(pretrained).sha256()[:12]}'",
    "restore that one",
  )


def test_resumed_sft_refuses_another_tokenizer(cli, prepared_dir, other_tokenizer, tmp_path):
  overrides = {"train.init_from": str(tmp_path / "init"), **SMALL_TASKS}
  wd = fake_run(str(tmp_path / "sft"), config_lib.load(SFT, overrides), tokenizer_from=prepared_dir)
  shutil.copyfile(other_tokenizer, os.path.join(wd, "tokenizer", "tokenizer.model"))
  refused(
    cli, wd, ["sft", f"--config={SFT}", f"--workdir={wd}", *flags(overrides)], "records tokenizer.sha256="
  )


# --- 4. every value is checked up front, from the schema ------------------------------------------------


@pytest.mark.parametrize(
  "extra, expected",
  [
    (["--config.optim.eps=-1"], "optim.eps: must be > 0, got -1.0"),
    (["--config.optim.lr_peak=1e999"], "optim.lr_peak: must be a finite number, got inf"),
    (["--config.data.sources.web.weight=1e999"], "data.sources.web.weight: must be a finite number, got inf"),
    (["--config.train.seed=4294967296"], "train.seed: must be a 32-bit integer"),
    (["--config.optim.b2=1.0"], "optim.b2: must be in [0, 1), got 1.0"),
  ],
  ids=["eps_negative", "lr_infinite", "source_weight_infinite", "seed_past_32_bits", "b2_one"],
)
def test_bad_values_are_refused_naming_the_key(cli, pretrained, extra, expected):
  refused(cli, pretrained, pretrain_argv(pretrained, *extra), expected)


def test_nan_from_a_config_file_is_refused(cli, pretrained, tmp_path):
  path = tmp_path / "nan_lr.py"
  path.write_text(
    "from gpt_jax import config as config_lib\n\n\n"
    "def get_config(arg=''):\n"
    f"  cfg = config_lib.load_file({PRETRAIN!r})\n"
    "  cfg.optim.lr_peak = float('nan')\n"
    "  return cfg\n"
  )
  argv = ["pretrain", f"--config={path}", f"--workdir={pretrained}", *TINY_ARGS]
  refused(cli, pretrained, argv, "optim.lr_peak: must be a finite number, got nan")


def _numeric_keys(schema: dict, prefix: str = ""):
  for name, spec in schema.items():
    if isinstance(spec, Key):
      if isinstance(spec.default, int | float) and not isinstance(spec.default, bool):
        yield prefix + name, spec
    elif isinstance(spec, Entries):
      for entry in spec.default:
        yield from _numeric_keys(spec.schema, f"{prefix}{name}.{entry}.")
    else:
      yield from _numeric_keys(spec, f"{prefix}{name}.")


def _bad_values(spec: Key) -> list:
  """Values of the key's type that the schema must refuse: non-finite, past 32 bits, out of bounds."""
  if spec.choices:
    return [max(spec.choices) + 1]
  lo, lo_in, hi, hi_in = spec.limits()
  is_int = isinstance(spec.default, int)
  cast, step = (int, 1) if is_int else (float, 1e-3)
  out = [2**31, -(2**31) - 1] if is_int else [math.nan, math.inf, -math.inf]
  if math.isfinite(lo):
    out.append(cast(lo - step if lo_in else lo))
  if math.isfinite(hi):
    out.append(cast(hi + step if hi_in else hi))
  return out


STAGE_KEYS = [(n, path, spec) for n in stages.ORDER for path, spec in _numeric_keys(stages.module(n).SCHEMA)]


@pytest.mark.parametrize("stage, path, spec", STAGE_KEYS, ids=[f"{n}:{p}" for n, p, _ in STAGE_KEYS])
def test_every_numeric_key_is_bounded_and_checked_first(stage, path, spec):
  """Every int and float key of every stage declares its range, and the stage's validate() refuses a
  value outside it (or a non-finite one, or one past 32 bits) naming the key, before any other check."""
  assert spec.bounds or spec.choices, f"{stage}: {path} has no bounds"
  module = stages.module(stage)
  for value in _bad_values(spec):
    cfg = module.default_config()
    config_lib.override(cfg, path, value)
    with pytest.raises(ConfigError) as e:
      module.validate(cfg)
    assert str(e.value).startswith(f"{path}: must be"), (value, str(e.value))


def test_chat_flags_are_checked_before_the_model_is_loaded(cli, pretrained):
  base = ["chat", f"--workdir={pretrained}", "--prompt=def"]
  refused(cli, pretrained, base + ["--temperature=nan"], "--temperature: must be a finite number, got nan")
  refused(cli, pretrained, base + ["--top_p=0"], "--top_p: must be in (0, 1], got 0.0")
  refused(cli, pretrained, base + ["--seed=-1"], "--seed: must be >= 0, got -1")


def test_describe_checks_the_config(cli, tmp_path):
  wd = str(tmp_path)
  refused(
    cli, wd, ["describe", f"--config={PRETRAIN}", "--config.train.steps=-5"], "train.steps: must be > 0"
  )
  refused(
    cli,
    wd,
    ["describe", f"--config={PIPELINE}:demo", "--config.sft.optim.eps=-1.0"],
    "sft.optim.eps: must be > 0",
  )


# --- 5. no silent no-ops, no wrong pairings -------------------------------------------------------------


def test_steps_below_the_checkpoint_are_refused_before_data_preparation(cli, pretrained, monkeypatch):
  monkeypatch.setattr(data_lib, "prepare", lambda *a, **k: pytest.fail("prepared the data of a refused run"))
  refused(
    cli,
    pretrained,
    pretrain_argv(pretrained, "--config.train.steps=3"),
    f"train.steps: 3 is below the step of the newest checkpoint in {pretrained} (6); set it to at least 6",
  )


def ppo_argv(wd: str, sft_dir: str, rm_dir: str) -> list[str]:
  return ["ppo", f"--config={PPO}", f"--workdir={wd}", f"--config.ppo.sft_workdir={sft_dir}"] + [
    f"--config.ppo.rm_workdir={rm_dir}"
  ]


@pytest.fixture
def rl_runs(prepared_dir, tmp_path):
  """Two SFT runs of the PPO preset's model (A and its copy B) and a reward model started from A."""
  model = {f"model.{k}": v for k, v in config_lib.load(PPO).model.items()}
  sft_cfg = config_lib.load(SFT, {"train.init_from": "x", **model})
  a = fake_run(str(tmp_path / "sft_a"), sft_cfg, tokenizer_from=prepared_dir)
  b = str(tmp_path / "sft_b")
  shutil.copytree(a, b)
  rm_cfg = config_lib.load(f"{EXP}/rm.py:tiny", {"train.init_from": a, **model})
  rm = fake_run(
    str(tmp_path / "rm"),
    rm_cfg,
    tokenizer_from=prepared_dir,
    record={"init": runs.open(a).fact()},
  )
  runs.write_json(os.path.join(rm, runs.REWARD_STATS_FILE), {"mean": 0.0, "std": 1.0})
  pre = fake_run(str(tmp_path / "pretrain"), config_lib.load(PRETRAIN, model), tokenizer_from=prepared_dir)
  return a, b, rm, pre


def test_a_workdir_of_another_stage_is_refused(cli, pretrained, tmp_path):
  model = {k: v for k, v in TINY.items() if k.startswith("model.")}
  overrides = {"train.init_from": "x", "train.seq_len": 64, **model}
  argv = ["sft", f"--config={SFT}", f"--workdir={pretrained}", *flags(overrides)]
  refused(
    cli, pretrained, argv, f"--workdir: checkpoint step 6 in {pretrained} is of stage 'pretrain', not 'sft'"
  )


def test_ppo_refuses_a_pretraining_run_as_its_sft_model(cli, rl_runs, tmp_path):
  _, _, rm, pre = rl_runs
  wd = str(tmp_path / "ppo")
  refused(
    cli,
    wd,
    ppo_argv(wd, pre, rm),
    f"ppo.sft_workdir: {pre} is a run of stage 'pretrain', expected 'sft' or 'dpo'",
  )


def test_ppo_refuses_a_reward_model_made_from_another_sft_run(cli, rl_runs, tmp_path):
  a, b, rm, _ = rl_runs
  wd = str(tmp_path / "ppo")
  refused(
    cli,
    wd,
    ppo_argv(wd, b, rm),
    f"ppo.rm_workdir: the reward model {rm} was trained from {a} (step 6), not from ppo.sft_workdir {b} "
    "(step 6)",
    f"point ppo.sft_workdir at {a}/checkpoints/6",
  )


@pytest.fixture
def finished_pipeline(tmp_path, monkeypatch):
  """A pipeline workdir whose pretraining stage finished (DONE, checkpoints recording its config)."""
  from gpt_jax import report

  monkeypatch.setattr(report, "write", lambda *a, **k: None)  # a report of stand-in runs says nothing
  d = str(tmp_path / "pipe")
  # (no evaluation after the stages: the stand-in run has no tokenizer)
  overrides = {"stages": "pretrain", "eval_tasks": "", **{f"pretrain.{k}": v for k, v in TINY.items()}}
  cfg = config_lib.load(f"{PIPELINE}:demo", overrides)
  pipeline.wire(cfg, d)
  fake_run(os.path.join(d, "pretrain"), cfg.pretrain)
  open(os.path.join(d, "pretrain", pipeline.DONE), "w").close()
  runs.write_json(os.path.join(d, "pipeline_config.json"), config_lib.to_dict(cfg))
  return d, flags(overrides)


def test_pipeline_refuses_a_changed_finished_stage_and_force_keeps_it_as_it_ran(cli, finished_pipeline):
  d, args = finished_pipeline
  argv = [
    "pipeline",
    f"--config={PIPELINE}:demo",
    f"--workdir={d}",
    *args,
    "--config.pretrain.optim.lr_peak=0.5",
  ]
  refused(
    cli,
    d,
    argv,
    f"pipeline workdir {d}: stage pretrain finished with another config: optim.lr_peak (0.003 -> 0.5)",
    "--force to keep the finished stage as it is",
  )
  status, err = cli(*argv, "--force")
  assert status == 0, err
  with open(os.path.join(d, "pipeline_config.json")) as f:
    assert json.load(f)["pretrain"]["optim"]["lr_peak"] == 0.003  # what the finished stage ran with


# --- 6. a failed first run leaves nothing that refuses the corrected one -------------------------------


@pytest.mark.parametrize(
  "bad, expected",
  [
    (
      ["--config.data.sources.web.paths=/nonexistent/corpus.txt", "--config.data.sources.web.format=text"],
      "/nonexistent/corpus.txt",
    ),
    (["--config.model.vocab_size=256"], "model vocab_size 256 is smaller than the tokenizer's 512"),
  ],
  ids=["wrong_source_path", "vocabulary_smaller_than_tokenizer"],
)
def test_failed_first_pretraining_run_does_not_poison_its_workdir(cli, prepared_dir, tmp_path, bad, expected):
  wd = seed_workdir(prepared_dir, str(tmp_path / "wd"))
  refused(cli, wd, pretrain_argv(wd, *bad), expected)
  assert not os.path.exists(os.path.join(wd, "config.json"))
  assert reached(cli, pretrain_argv(wd)) is None  # the corrected run starts


def test_failed_first_sft_run_does_not_poison_its_workdir(cli, pretrained, tmp_path):
  model = {k: v for k, v in TINY.items() if k.startswith("model.")}
  base = {"train.init_from": pretrained, **SMALL_TASKS, **model, "train.seq_len": 64}
  wd = str(tmp_path / "sft")
  argv = ["sft", f"--config={SFT}", f"--workdir={wd}", *flags(base)]
  refused(
    cli, wd, argv + [f"--config.sft.data_path={tmp_path}/missing.jsonl"], "sft.data_path: ", "missing.jsonl"
  )
  assert not os.path.exists(os.path.join(wd, "config.json"))
  assert reached(cli, argv) is None


# --- 7. one line, never a traceback -----------------------------------------------------------------


def _write(path, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def test_broken_config_files_are_one_line(cli, pretrained, tmp_path):
  cases = [
    (_write(tmp_path / "syntax.py", "def get_config(:\n"), "syntax.py line 1: syntax error"),
    (_write(tmp_path / "none.py", "X = 1\n"), "none.py has no get_config() function"),
    (_write(tmp_path / "raises.py", "def get_config(arg=''):\n  return 1 / 0\n"), "ZeroDivisionError"),
    (f"{EXP}/pretrain.py:huge", "unknown preset 'huge'"),
  ]
  for spec, expected in cases:
    refused(
      cli, pretrained, ["pretrain", f"--config={spec}", f"--workdir={pretrained}"], "--config: ", expected
    )
  data_file = _write(
    tmp_path / "data_inf.py",
    "from gpt_jax.data import config as c\n\n\ndef get_config(arg=''):\n"
    "  cfg = c.default_data_config()\n  cfg.sources.web.weight = 1e999\n  return cfg\n",
  )
  refused(
    cli,
    pretrained,
    pretrain_argv(pretrained, f"--config.data={data_file}"),
    "data.sources.web.weight: must be a finite",
  )
  refused(
    cli,
    pretrained,
    pretrain_argv(pretrained, "--config.train.steps.x=1"),
    "train.steps.x: train.steps is a value",
  )


def test_garbage_config_json_and_checkpoints_file_are_one_line(cli, prepared_dir, tmp_path):
  wd = seed_workdir(prepared_dir, str(tmp_path / "garbage"))
  _write(os.path.join(wd, "config.json"), "{not json")
  refused(cli, wd, pretrain_argv(wd), f"{wd}/config.json is unreadable", "delete it or use a new --workdir")
  wd = seed_workdir(prepared_dir, str(tmp_path / "file"))
  _write(os.path.join(wd, "checkpoints"), "not a directory")
  refused(cli, wd, pretrain_argv(wd), f"--workdir: {wd}/checkpoints is not a directory")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_outside_a_training_step_is_one_line(cli, pretrained, monkeypatch, sig):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are installed from the main thread only")
  monkeypatch.setattr(data_lib, "prepare", lambda *a, **k: signal.raise_signal(sig))
  before, handlers = snapshot(pretrained), [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  status, err = cli(*pretrain_argv(pretrained, "--config.train.steps=12"))
  assert status == 128 + int(sig) and "Traceback" not in err, err
  assert [line for line in err.splitlines() if line.startswith("gpt_jax")] == [
    f"gpt_jax: interrupted ({sig.name}) outside a training step; nothing was saved since the newest "
    "checkpoint (rerun the same command to go on)"
  ]
  assert snapshot(pretrained) == before
  assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # the CLI's are gone


# --- 8. messages that name the right thing ------------------------------------------------------------


def test_missing_sft_workdir_is_named_as_the_ppo_key(cli, rl_runs, tmp_path):
  _, _, rm, _ = rl_runs
  wd = str(tmp_path / "ppo")
  refused(
    cli,
    wd,
    ppo_argv(wd, str(tmp_path / "nowhere"), rm),
    f"ppo.sft_workdir: {tmp_path}/nowhere does not exist",
  )


def test_reward_model_as_sft_init_is_named(cli, rl_runs, tmp_path):
  _, _, rm, _ = rl_runs
  wd = str(tmp_path / "sft")
  model = {f"model.{k}": v for k, v in config_lib.load(PPO).model.items()}
  argv = ["sft", f"--config={SFT}", f"--workdir={wd}", *flags({"train.init_from": rm, **model})]
  refused(
    cli,
    wd,
    argv,
    f"train.init_from: {rm} is a run of stage 'rm'",
    "SFT starts from a model without a scalar head",
  )


def test_chat_max_new_tokens_past_the_context_is_refused(cli, pretrained):
  refused(
    cli,
    pretrained,
    ["chat", f"--workdir={pretrained}", "--prompt=def", "--max_new_tokens=100000"],
    "--max_new_tokens: 100000 leaves no room for a prompt in the model's context of 64 tokens (at most 63)",
  )


def test_a_rebuilt_shard_is_named_in_a_warning(prepared_dir, tmp_path, caplog):
  wd = seed_workdir(prepared_dir, str(tmp_path / "wd"))
  shard = os.path.join(wd, "shards", "train", "web", "00000.bin")
  with open(shard, "r+b") as f:
    f.write(b"\xff\xff")
  cfg = tiny_config()
  tokens = cfg.train.global_batch * cfg.train.seq_len
  lines = []
  with caplog.at_level(logging.WARNING, logger="gpt_jax"):
    data_lib.prepare(cfg.data, wd, token_budget=tokens * 6, tokens_per_batch=tokens, log=lines.append)
  assert [r.getMessage() for r in caplog.records if "shard" in r.getMessage()] == [
    f"data: shard {shard} of source 'web' has other bytes than the manifest's sha256; rebuilding it"
  ]
  assert any(line.startswith("data: train/web:") and "(0 verified and kept)" in line for line in lines), lines
  assert snapshot(os.path.join(wd, "shards")) == snapshot(os.path.join(prepared_dir, "shards"))
