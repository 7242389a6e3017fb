"""Bad input through the CLI: each case exits with status 2 and one line `gpt_jax: error: ...` that names
the cause, before any training step is compiled, and every file already in the workdir is left as it was.

`loop.run` (where steps are compiled) is replaced by a failure for every case, so reaching it fails
the test; the workdir is hashed before and after.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import loop
from gpt_jax import workdir as workdir_lib
from gpt_jax.__main__ import main
from tests.helpers import REPO, TINY, seed_workdir, snapshot

PRETRAIN = "--config=" + os.path.join(REPO, "experiments", "pretrain.py") + ":tiny"
SFT = "--config=" + os.path.join(REPO, "experiments", "sft.py") + ":tiny"
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]


@pytest.fixture
def cli(monkeypatch, capsys):
  """Runs the CLI in-process; returns (status, stderr lines); fails the test if training is reached."""

  def no_run(*args, **kwargs):
    raise AssertionError("bad input reached loop.run (compilation and training)")

  monkeypatch.setattr(loop, "run", no_run)

  def run(*argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = main(list(argv))
    return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("gpt_jax")]

  return run


@pytest.fixture
def workdir(prepared_dir, tmp_path):
  """A workdir with the tokenized tiny corpus and the outputs of an earlier run in it."""
  wd = seed_workdir(prepared_dir, str(tmp_path / "wd"))
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "train/loss": 6.0}) + "\n")
  return wd


def _check(cli, wd: str, args: list[str], expected: str, base=(PRETRAIN,)):
  before = snapshot(wd) if os.path.isdir(wd) else {}
  status, err = cli(_command(base[0]), *base, f"--workdir={wd}", *args)
  assert status == 2, err
  assert len(err) == 1 and err[0].startswith("gpt_jax: error: "), err
  assert expected in err[0], err[0]
  after = snapshot(wd) if os.path.isdir(wd) else {}
  assert {k: after.get(k) for k in before} == before  # nothing already written was changed or removed
  return err[0]


def _command(config_flag: str) -> str:
  return "sft" if "sft.py" in config_flag else "pretrain"


# (id, extra CLI args, text the one-line error must contain)
CONFIG_CASES = [
  ("unknown_key", ["--config.train.bogus=1"], "train.bogus: unknown config key"),
  ("unknown_section", ["--config.trian.steps=1"], "trian.steps: unknown config key ('trian' does not exist)"),
  ("wrong_type", ["--config.train.steps=many"], "train.steps: expected int, got 'many'"),
  ("out_of_range", ["--config.optim.lr_end_ratio=2.0"], "optim.lr_end_ratio: must be in [0, 1], got 2.0"),
  ("nonpositive_steps", ["--config.train.steps=0"], "train.steps: must be > 0, got 0"),
  ("bad_choice", ["--config.train.nonfinite=ignore"], "train.nonfinite: must be one of ('stop', 'skip')"),
  (
    "batch_not_divisible",
    ["--config.train.global_batch=12"],
    "train.global_batch: 12 (/1 microbatches = 12) is not divisible by the 8 data-parallel shards",
  ),
  ("mesh_not_dividing", ["--config.mesh.fsdp=3"], "mesh: 8 devices cannot be split into"),
  (
    "mesh_wrong_size",
    ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"],
    "mesh: data*fsdp*tensor = 4",
  ),
  (
    "context_too_long",
    ["--config.train.seq_len=128"],
    "train.seq_len: 128 is longer than the model's position table (model.max_seq_len=64)",
  ),
]


@pytest.mark.parametrize("args, expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(cli, workdir, args, expected):
  _check(cli, workdir, TINY_ARGS + args, expected)


def test_tokenizer_smaller_than_model_vocabulary(cli, workdir):
  # The workdir's tokenizer has 512 pieces; a model with 256 embeddings cannot hold its ids.
  _check(
    cli,
    workdir,
    TINY_ARGS + ["--config.model.vocab_size=256"],
    "model vocab_size 256 is smaller than the tokenizer's 512",
  )


def test_tokenizer_of_another_vocabulary_size(cli, workdir):
  _check(
    cli,
    workdir,
    TINY_ARGS + ["--config.data.tokenizer.vocab_size=1024", "--config.model.vocab_size=1024"],
    "was trained with vocab_size 512, the config asks for 1024",
  )


def _jsonl(path: str, texts: list[str]) -> str:
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")
  return path


def _web_source(path: str) -> list[str]:
  return [
    f"--config.data.sources.web.paths={path}",
    "--config.data.sources.web.format=jsonl",
    "--config.data.sources.web.min_chars=1",
  ]


def test_empty_dataset(cli, tmp_path):
  empty = _jsonl(str(tmp_path / "empty.jsonl"), [])
  _check(cli, str(tmp_path / "wd"), TINY_ARGS + _web_source(empty), "source 'web'")


def test_dataset_smaller_than_one_batch(cli, prepared_dir, tmp_path):
  # One 40-character document: fewer tokens than one sequence of the batch (seq_len + 1 = 33).
  tiny = _jsonl(str(tmp_path / "tiny.jsonl"), ["def f(x):\n    return x + 1  # one line\n"])
  wd = str(tmp_path / "wd")
  tok = os.path.join(prepared_dir, "tokenizer", "tokenizer.model")  # skips tokenizer training
  err = _check(
    cli, wd, TINY_ARGS + _web_source(tiny) + [f"--config.data.tokenizer.path={tok}"], "source 'web'"
  )
  assert "fewer than seq_len + 1 = 33" in err


def test_unwritable_workdir(cli, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  _check(cli, str(blocker / "wd"), TINY_ARGS, f"--workdir: {blocker / 'wd'} is not writable")
  assert blocker.read_text() == "not a directory"


def test_workdir_in_use(cli, workdir):
  with workdir_lib.WorkdirLock(workdir):
    _check(cli, workdir, TINY_ARGS, f"workdir {workdir} is in use by process {os.getpid()}")


def test_init_checkpoint_that_does_not_exist(cli, tmp_path):
  missing = tmp_path / "no_such_run"
  _check(
    cli,
    str(tmp_path / "sft"),
    [f"--config.train.init_from={missing}"],
    f"train.init_from: {missing} does not exist",
    (SFT,),
  )


def test_init_checkpoint_of_another_architecture(cli, tmp_path):
  # A pretraining workdir whose model is wider than the SFT config's.
  src = tmp_path / "pretrain"
  sft_model = config_lib.to_dict(config_lib.load(SFT.split("=", 1)[1]).model)
  wider = {**sft_model, "d_model": sft_model["d_model"] * 2}
  with ckpt_lib.Checkpointer(str(src / "checkpoints")) as ck:
    ck.save(
      5,
      {"params": {"embed": np.zeros((4, 4), np.float32)}},
      extra={"stage": "pretrain", "config": {"model": wider}},
    )
  err = _check(cli, str(tmp_path / "sft"), [f"--config.train.init_from={src}"], "model.d_model", (SFT,))
  assert f"differs from {wider['d_model']} in {src} (stage 'pretrain', step 5)" in err
