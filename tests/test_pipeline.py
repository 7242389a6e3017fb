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
  for stage in pipeline.entries(tiny_pipeline_config()):
    assert os.path.exists(os.path.join(d, stage, "DONE")), stage
  with open(os.path.join(d, "sft", "config.json")) as f:
    assert json.load(f)["train"]["init_from"] == os.path.join(d, "pretrain")
  with open(os.path.join(d, "ppo", "config.json")) as f:
    ppo_cfg = json.load(f)["ppo"]
  assert ppo_cfg["sft_workdir"] == os.path.join(d, "sft") and ppo_cfg["rm_workdir"] == os.path.join(d, "rm")
  with open(os.path.join(d, "dpo", "config.json")) as f:
    dpo_cfg = json.load(f)
  assert dpo_cfg["train"]["init_from"] == os.path.join(d, "sft")
  with open(os.path.join(d, "rm", "config.json")) as f:
    assert dpo_cfg["tasks"] == json.load(f)["tasks"]  # DPO learns from the reward model's comparisons
  assert os.path.exists(os.path.join(d, "rm", "reward_stats.json"))


def test_report_has_every_section_and_plots(tiny_pipeline_dir):
  with open(os.path.join(tiny_pipeline_dir, "report.md")) as f:
    report = f.read()
  for section in (
    "## Data mixture",
    "## Tokenizer",
    "## Model",
    "## Results",
    "## Post-training methods",
    "answered by each model",
  ):
    assert section in report, section
  for png in (
    "pretrain_loss.png",
    "sft_curves.png",
    "rm_curves.png",
    "dpo_curves.png",
    "ppo_curves.png",
    "grpo_curves.png",
    "overoptimization.png",
  ):
    path = os.path.join(tiny_pipeline_dir, png)
    assert os.path.getsize(path) > 1000 and f"]({png})" in report, png
  with open(os.path.join(tiny_pipeline_dir, png), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_model_is_evaluated_on_the_same_tasks(tiny_pipeline_dir):
  with open(os.path.join(tiny_pipeline_dir, "eval.json")) as f:
    record = json.load(f)
  models = [n for n, stage in pipeline.entries(tiny_pipeline_config()).items() if stage != "rm"]
  assert record["tasks"] == "embedded,bpb:docs" and set(record["models"]) == set(models)
  for stage, m in record["models"].items():
    assert m["chat"] == (stage != "pretrain")
    assert m["results"]["embedded"]["n"] == 512 and 0 <= m["results"]["embedded"]["accuracy"] <= 1
    assert m["results"]["bpb_docs"]["bits_per_byte"] > 0
  with open(os.path.join(tiny_pipeline_dir, "report.md")) as f:
    report = f.read()
  assert "## Evaluation" in report and f"| task | metric | {' | '.join(models)} |" in report
  assert "| embedded (512 examples) | accuracy |" in report


def test_rerun_skips_finished_stages(tiny_pipeline_dir):
  lines = []
  names = pipeline.entries(tiny_pipeline_config())
  before = {s: os.path.getmtime(os.path.join(tiny_pipeline_dir, s, "DONE")) for s in names}
  pipeline.run(tiny_pipeline_config(), tiny_pipeline_dir, log_fn=lines.append)
  assert sum("done already" in str(x) for x in lines) == len(names)
  after = {s: os.path.getmtime(os.path.join(tiny_pipeline_dir, s, "DONE")) for s in names}
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
  bad = tmp_path / "bad.jsonl"
  bad.write_text("{not json\n")
  cfg = tiny_pipeline_config(**{"rm.rm.data_path": str(bad)})
  with pytest.raises(GptJaxError, match=r"pipeline stage 'rm' failed.*bad\.jsonl:1"):
    pipeline.run(cfg, d, log_fn=lambda *a: None, force=True)
  assert os.path.exists(os.path.join(d, "sft", "DONE"))


def test_every_stage_config_is_checked_before_the_first_stage_runs(tmp_path):
  cfg = tiny_pipeline_config(**{"rm.rm.data_path": str(tmp_path / "missing.jsonl"), "ppo.ppo.clip": -1.0})
  with pytest.raises(GptJaxError, match=r"rm.rm.data_path: file .*missing\.jsonl does not exist"):
    pipeline.run(cfg, str(tmp_path / "run"), log_fn=lambda *a: None)
  assert not os.path.exists(tmp_path / "run" / "pretrain")


def test_bad_eval_tasks_are_refused_before_the_first_stage(tmp_path):
  with pytest.raises(ConfigError, match=r"eval_tasks: unknown task 'mmlu'"):
    pipeline.run(
      tiny_pipeline_config(eval_tasks="embedded,mmlu"), str(tmp_path / "run"), log_fn=lambda *a: None
    )
  bad = tmp_path / "mc.jsonl"
  bad.write_text('{"context": "q", "choices": ["a", "b"], "label": 2}\n')
  with pytest.raises(GptJaxError, match=r"eval_tasks: mc:.*mc\.jsonl:1: label 2 is out of range"):
    pipeline.run(tiny_pipeline_config(eval_tasks=f"mc:{bad}"), str(tmp_path / "run"), log_fn=lambda *a: None)
  assert not os.path.exists(tmp_path / "run")


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
  assert len(err) == 1 and "nothing does not exist" in err[0]


def test_the_evaluation_is_redone_when_what_it_reads_changes(tiny_pipeline_dir, tmp_path, monkeypatch):
  from gpt_jax.eval import run as eval_run

  d = str(tmp_path / "eval")
  os.makedirs(d)
  for stage in ("pretrain", "sft"):
    os.symlink(os.path.join(tiny_pipeline_dir, stage), os.path.join(d, stage))
  text = tmp_path / "notes.txt"
  text.write_text("the quick brown fox jumps over the lazy dog\n")
  first = eval_run.evaluate_pipeline(d, f"bpb:{text}", log_fn=lambda *a: None)
  assert set(first["models"]) == {"pretrain", "sft"}

  def no_build(*a, **k):
    raise AssertionError("evaluated again")

  monkeypatch.setattr(eval_run, "build", no_build)
  assert eval_run.evaluate_pipeline(d, f"bpb:{text}", log_fn=lambda *a: None) == first  # nothing changed
  text.write_text("another text, another figure\n")
  with pytest.raises(AssertionError, match="evaluated again"):
    eval_run.evaluate_pipeline(d, f"bpb:{text}", log_fn=lambda *a: None)


def test_the_overoptimization_curve_reads_the_k3_kl_since_the_previous_evaluation(tmp_path):
  from gpt_jax import report

  d = tmp_path / "run"
  (d / "ppo").mkdir(parents=True)
  (d / "pipeline_config.json").write_text(json.dumps({"stages": "ppo", "ppo": {"stage": "ppo", "ppo": {}}}))
  records = [{"step": 0, "eval/reward": 0.0, "eval/gold_accuracy": 0.5}]
  for step, k3 in zip(range(1, 5), (0.04, 0.06, 0.01, 0.03)):
    records.append({"step": step, "ppo/kl": -0.2, "ppo/kl_k3": k3})  # the log-ratio's noise goes negative
  records += [
    {"step": 2, "eval/reward": 0.3, "eval/gold_accuracy": 0.6},
    {"step": 4, "eval/reward": 0.5, "eval/gold_accuracy": 0.55},
  ]
  (d / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (rows,) = report.overoptimization(str(d)).values()
  assert [r["iteration"] for r in rows] == [0, 2, 4] and [r["gold"] for r in rows] == [0.5, 0.6, 0.55]
  assert [r["kl"] for r in rows] == pytest.approx([0.0, 0.05, 0.02])
  assert rows[1]["sqrt_kl"] == pytest.approx(0.05**0.5)
  assert report._plot_overoptimization(str(tmp_path / "o.png"), {"ppo": rows})


def test_a_stage_run_again_from_scratch_reports_its_own_time(tiny_pipeline_dir, tmp_path):
  d = str(tmp_path / "again")
  os.makedirs(d)
  for stage in ("pretrain", "sft", "rm", "ppo", "grpo"):
    os.symlink(os.path.join(tiny_pipeline_dir, stage), os.path.join(d, stage))
  with open(os.path.join(d, "timings.json"), "w") as f:
    json.dump({"dpo": 1e6}, f)  # an earlier dpo run whose folder was removed
  timings = pipeline.run(tiny_pipeline_config(eval_tasks=""), d, log_fn=lambda *a: None, force=True)
  assert os.path.exists(os.path.join(d, "dpo", "DONE")) and 0 < timings["dpo"] < 1e5
