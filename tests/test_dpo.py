"""DPO: each response's log-prob is summed over exactly its own tokens; the stage end to end on a
stand-in SFT run (tests/helpers.py) with the embedded comparisons: held-out implicit-reward accuracy
and gold accuracy reported, a resumed run bitwise the uninterrupted one; bad input before anything is
built."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import losses, metrics, placed, sharding
from gpt_jax import model as model_lib
from gpt_jax.data import comparisons as comp_data
from gpt_jax.errors import CheckpointError, DataError
from gpt_jax.stages import dpo
from gpt_jax.tokenizers import load as load_tokenizer
from gpt_jax.tokenizers import train_tokenizer
from tests.helpers import RL_MODEL, corpus_docs, write_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dpo_cfg(init_from, **over):
  overrides = {
    **RL_MODEL,
    "train.init_from": str(init_from),
    "train.steps": 4,
    "train.global_batch": 16,
    "train.seq_len": 48,
    "train.eval_every": 4,
    "train.checkpoint_every": 2,
    "train.eval_batches": 2,
    "train.log_every": 1,
    "train.progress_bar": False,
    "train.async_checkpoint": False,
    "optim.warmup_steps": 1,
    "optim.lr_peak": 1e-3,
    "metrics.tensorboard": False,
    "tasks.train": 64,
    "tasks.eval": 16,
    "dpo.eval_prompts": 8,
    "dpo.max_new_tokens": 4,
    "dpo.sample_batch": 8,
    "dpo.ref_batch": 8,
    "dpo.sft_coef": 0.0,  # plain DPO: the loss at step 1 is log 2 (the sft term: its own test)
  }
  overrides.update(over)
  return config_lib.load(os.path.join(ROOT, "experiments/dpo.py:tiny"), overrides)


def test_response_logprob_sums_the_response_tokens_only(rl_runs):
  sft_dir, _, _ = rl_runs
  tok = load_tokenizer(sft_dir)
  comps = [comp_data.Comparison([{"role": "user", "content": "Add 2 and 3."}], "5", "6 and more", 0)]
  enc = comp_data.encode(comps, tok, 48, "t")
  batch = comp_data.pairs_to_batch(enc, [0], 1, 48)
  cfg = model_lib.ModelConfig.from_config(config_lib.to_dict(dpo_cfg("x").model))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  m = placed.Model.build(cfg, mesh)
  params = m.init_params(0)
  got = np.asarray(jax.jit(lambda p, b: dpo.response_logprobs(m, p, b))(params, batch))
  logits = m.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"]).logits
  for r, resp in enumerate(("5", "6 and more")):
    start, end = int(batch["response_start"][r, 0]), int(batch["end_index"][r, 0])
    body = tok.render_chat([*comps[0].prompt, {"role": "assistant", "content": resp}])[0][start:]
    assert body == [*tok.encode(resp), tok.special_id("end_of_turn")] and end - start == len(body)
    lp = losses.token_logprobs(logits[r : r + 1, start - 1 : end - 1], batch["inputs"][r : r + 1, start:end])
    np.testing.assert_allclose(got[r], float(lp.sum()), rtol=1e-5)


def test_sft_coef_adds_the_chosen_mean_token_loss(rl_runs):
  sft_dir, _, _ = rl_runs
  tok = load_tokenizer(sft_dir)
  comps = [
    comp_data.Comparison([{"role": "user", "content": "Add 2 and 3."}], "5", "6 and more", 0),
    comp_data.Comparison([{"role": "user", "content": "Sort: 3 1"}], "1 3", "3 1", 0),
  ]
  enc = comp_data.encode(comps, tok, 48, "t")
  batch = comp_data.pairs_to_batch(enc, [0, 1], 2, 48)
  batch["ref_logp"] = np.zeros((4, 1), np.float32)
  cfg = dpo_cfg("x")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  m = placed.Model.build(model_lib.ModelConfig.from_config(config_lib.to_dict(cfg.model)), mesh)
  params = m.init_params(0)
  plain, _, aux0 = dpo.dpo_loss(m, cfg.dpo)(params, batch, None)
  with cfg.unlocked():
    cfg.dpo.sft_coef = 0.7
  mixed, _, aux = dpo.dpo_loss(m, cfg.dpo)(params, batch, None)
  logp = np.asarray(dpo.response_logprobs(m, params, batch))
  n_tokens = np.asarray(batch["end_index"] - batch["response_start"])[:, 0]
  by_hand = sum(-logp[r] / n_tokens[r] for r in (0, 2))  # rows 0 and 2: the chosen sides
  assert float(aux["chosen_nll_sum"]) == pytest.approx(by_hand, rel=1e-5)
  assert float(mixed) == pytest.approx(float(plain) + 0.7 * by_hand, rel=1e-5)
  assert float(aux0["chosen_nll_sum"]) == pytest.approx(by_hand, rel=1e-5)


def train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r}


def test_dpo_trains_reports_and_resumes_bitwise(rl_runs, tmp_path):
  sft_dir, _, _ = rl_runs
  quiet = lambda *a: None
  full = dpo.run(dpo_cfg(sft_dir), str(tmp_path / "full"), log_fn=quiet)
  ev = full.eval
  assert {"reward_accuracy", "margin", "gold_accuracy", "pairs"} <= set(ev) and 0.0 <= ev[
    "reward_accuracy"
  ] <= 1.0
  losses_by_step = train_losses(str(tmp_path / "full"))
  # At step 1 the policy is the reference: every implicit reward is 0, the loss log(2).
  assert sorted(losses_by_step) == [1, 2, 3, 4] and losses_by_step[1] == pytest.approx(np.log(2), rel=1e-4)
  half = str(tmp_path / "half")
  dpo.run(dpo_cfg(sft_dir, **{"train.steps": 2}), half, log_fn=quiet)
  logs = []
  resumed = dpo.run(dpo_cfg(sft_dir), half, log_fn=logs.append)
  assert any("resumed from step 2" in line for line in logs)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert train_losses(half) == losses_by_step


def test_bad_input_fails_before_anything_is_built(rl_runs, tmp_path):
  sft_dir, rm_dir, tok_dir = rl_runs
  work = tmp_path / "w"
  model_dict = config_lib.to_dict(dpo_cfg("x").model)
  wider = dict(model_dict, d_model=32)
  narrow = write_run(
    tmp_path / "narrow",
    tok_dir,
    "sft",
    wider,
    model_lib.split(model_lib.ModelConfig.from_config(wider), 0)[1],
  )
  with pytest.raises(
    CheckpointError, match=r"model.d_model: 64 differs from 32 in .*narrow.*the reference model"
  ):
    dpo.run(dpo_cfg(sft_dir, **{"dpo.reference": narrow}), str(work))
  other_tok = str(tmp_path / "tok2")
  train_tokenizer(corpus_docs(100)[::-1], other_tok, vocab_size=380)
  retok = str(tmp_path / "retok")
  shutil.copytree(sft_dir, retok)
  shutil.rmtree(os.path.join(retok, "tokenizer"))
  shutil.copytree(other_tok, os.path.join(retok, "tokenizer"))
  with pytest.raises(DataError, match=r"dpo.reference: tokenizer .*retok/tokenizer/tokenizer.model differs"):
    dpo.run(dpo_cfg(sft_dir, **{"dpo.reference": retok}), str(work))
  with pytest.raises(CheckpointError, match=r"train.init_from: .* is a run of stage 'rm', expected"):
    dpo.run(dpo_cfg(rm_dir), str(work))
  no_prompt = tmp_path / "pairs.jsonl"
  no_prompt.write_text(json.dumps({"chosen": "5", "rejected": "6"}) + "\n")
  with pytest.raises(DataError, match=r"pairs.jsonl:1: missing field 'prompt'"):
    dpo.run(dpo_cfg(sft_dir, **{"dpo.data_path": str(no_prompt), "dpo.eval_path": str(no_prompt)}), str(work))
  assert not os.path.exists(work / "checkpoints")


def test_gold_path_prompts_replace_the_held_out_tasks(rl_runs, tmp_path):
  from gpt_jax import grading, runs
  from gpt_jax.data import jsonl
  from gpt_jax.data import tasks as tasks_lib

  sft_dir, _, _ = rl_runs
  src, tok = runs.open(sft_dir), load_tokenizer(sft_dir)
  cfg = dpo_cfg(sft_dir)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  m = placed.Model.build(model_lib.ModelConfig.from_config(config_lib.to_dict(cfg.model)), mesh)
  params = m.init_params(0)
  sft_tasks = src.config["tasks"]
  held = tasks_lib.make_tasks("eval", 8, int(sft_tasks["seed"]), tasks_lib.spec_from_config(sft_tasks))
  answerer = grading.Answerer(m, tok, grading.from_tasks(held, tok), max_new_tokens=4, batch=8)
  replies = [text for _, text in answerer.answers(params)]
  # Gold answers: the model's own greedy reply for the first half, one it cannot give (60 characters
  # from 4 tokens) for the rest: the file's prompts are graded exactly half right.
  path = tmp_path / "gold.jsonl"
  rows = [
    {"messages": t.messages, "answer": r if i < 4 else "x" * 60}
    for i, (t, r) in enumerate(zip(held, replies))
  ]
  jsonl.write_jsonl(str(path), rows)
  got = dpo.gold_eval(dpo_cfg(sft_dir, **{"dpo.gold_path": str(path)}), m, tok, src)(params, 0)
  assert got["gold_accuracy"] == 0.5
  with pytest.raises(DataError, match=r"dpo.gold_path: file .*nothing.jsonl does not exist"):
    dpo.run(dpo_cfg(sft_dir, **{"dpo.gold_path": str(tmp_path / "nothing.jsonl")}), str(tmp_path / "w"))
