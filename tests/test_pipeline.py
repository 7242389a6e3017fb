"""The whole recipe in one command: stages in order, skip on re-run, report, refusals; chat."""

import io
import json
import os

import pytest

from gpt_jax import chat
from gpt_jax.errors import ConfigError, GptJaxError
from gpt_jax.stages import pipeline
from tests.helpers import tiny_pipeline_config


def test_every_stage_ran_and_fed_the_next(tiny_pipeline_dir):
  d = tiny_pipeline_dir
  for stage in pipeline.STAGE_ORDER:
    assert os.path.exists(os.path.join(d, stage, "DONE")), stage
  with open(os.path.join(d, "sft", "config.json")) as f:
    assert json.load(f)["train"]["init_from"] == os.path.join(d, "pretrain")
  with open(os.path.join(d, "ppo", "config.json")) as f:
    ppo_cfg = json.load(f)["ppo"]
  assert ppo_cfg["sft_workdir"] == os.path.join(d, "sft") and ppo_cfg["rm_workdir"] == os.path.join(d, "rm")
  assert os.path.exists(os.path.join(d, "rm", "reward_stats.json"))


def test_report_has_every_section_and_plots(tiny_pipeline_dir):
  with open(os.path.join(tiny_pipeline_dir, "report.md")) as f:
    report = f.read()
  for section in ("## Data mixture", "## Tokenizer", "## Model", "## Results", "answered by each model"):
    assert section in report, section
  for png in ("pretrain_loss.png", "sft.png", "rm.png", "ppo.png"):
    path = os.path.join(tiny_pipeline_dir, png)
    assert os.path.getsize(path) > 1000 and f"]({png})" in report, png
  with open(os.path.join(tiny_pipeline_dir, png), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_stages(tiny_pipeline_dir):
  lines = []
  before = {s: os.path.getmtime(os.path.join(tiny_pipeline_dir, s, "DONE")) for s in pipeline.STAGE_ORDER}
  pipeline.run(tiny_pipeline_config(), tiny_pipeline_dir, log_fn=lines.append)
  assert sum("done already" in str(x) for x in lines) == 4
  after = {s: os.path.getmtime(os.path.join(tiny_pipeline_dir, s, "DONE")) for s in pipeline.STAGE_ORDER}
  assert before == after


def test_a_different_config_is_refused_naming_the_keys(tiny_pipeline_dir):
  with pytest.raises(ConfigError, match=r"model\.d_model"):
    pipeline.run(
      tiny_pipeline_config(**{"pretrain.model.d_model": 96}), tiny_pipeline_dir, log_fn=lambda *a: None
    )


def test_a_failing_stage_keeps_the_earlier_ones(tiny_pipeline_dir, tmp_path):
  d = str(tmp_path / "fail")
  os.makedirs(d)
  for stage in ("pretrain", "sft"):  # reuse the finished stages
    os.symlink(os.path.join(tiny_pipeline_dir, stage), os.path.join(d, stage))
  cfg = tiny_pipeline_config(**{"rm.rm.data_path": str(tmp_path / "missing.jsonl")})
  with pytest.raises(GptJaxError, match=r"pipeline stage 'rm' failed.*missing\.jsonl"):
    pipeline.run(cfg, d, log_fn=lambda *a: None, force=True)
  assert os.path.exists(os.path.join(d, "sft", "DONE"))


def test_chat_base_model_continues_and_assistant_answers(tiny_pipeline_dir):
  out = io.StringIO()
  replies = chat.run(
    os.path.join(tiny_pipeline_dir, "sft"), prompt="Add 2 and 3.", temperature=0.0, max_new_tokens=8, out=out
  )
  assert len(replies) == 1 and replies[0].strip() in out.getvalue()
  # Interactive: two turns from stdin, the second sees the first (the conversation is kept).
  out = io.StringIO()
  replies = chat.run(
    os.path.join(tiny_pipeline_dir, "sft"),
    temperature=0.0,
    max_new_tokens=8,
    stdin=io.StringIO("Add 2 and 3.\nSort: 3 1 2\n"),
    out=out,
  )
  assert len(replies) == 2 and "you> " in out.getvalue()
  base = chat.run(
    os.path.join(tiny_pipeline_dir, "pretrain"),
    prompt="def main",
    temperature=0.0,
    max_new_tokens=8,
    out=io.StringIO(),
  )
  assert len(base) == 1


def test_chat_cli_on_a_missing_workdir_is_one_line(tmp_path, capsys):
  from gpt_jax.__main__ import main

  assert main(["chat", "--workdir", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config.json" in err[0]
