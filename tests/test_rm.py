"""Reward modeling: comparison data (formats, k-way expansion, bad input, too-long pairs), the batch
layout (pairs in one forward pass, groups in one batch, gradient accumulation), the reward read at the
final eos token, the Bradley-Terry loss falling, and the stage end to end from an SFT-like checkpoint
(exact resume, reward_stats.json, scoring)."""

import json
import os
import random
import shutil

import jax
import numpy as np
import optax
import pytest

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import metrics, model, placed, rewards, runs, sharding
from gpt_jax import step as step_lib
from gpt_jax.data import comparisons as comp_data
from gpt_jax.data import tasks
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.stages import rm
from gpt_jax.tokenizers import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {
  "model.vocab_size": 512,
  "model.max_seq_len": 128,
  "model.num_layers": 2,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.d_model": 64,
  "model.d_ff": 128,
  "model.init_std": 0.2,
}


def rm_cfg(init_from, **over):
  overrides = {
    **MODEL,
    "train.steps": 6,
    "train.global_batch": 16,
    "train.seq_len": 48,
    "train.eval_every": 6,
    "train.checkpoint_every": 3,
    "train.eval_batches": 4,
    "train.log_every": 1,
    "train.progress_bar": False,
    "train.async_checkpoint": False,
    "train.init_from": str(init_from),
    "optim.warmup_steps": 1,
    "optim.decay_steps": 6,
    "optim.lr_peak": 3e-3,
    "metrics.tensorboard": False,
    "tasks.train": 64,
    "tasks.eval": 16,
    "rm.stats_samples": 8,
    "rm.stats_max_new_tokens": 4,
    "rm.stats_batch": 8,
    "rm.policy_train": 16,
    "rm.policy_eval": 8,
  }
  overrides.update(over)
  return config_lib.load(os.path.join(ROOT, "experiments/rm.py:tiny"), overrides)


def fake_sft(root, tok_docs, stage="sft"):
  """A workdir shaped like the SFT stage's: tokenizer/, config.json and one checkpoint of random params."""
  cfg = rm_cfg("x")
  workdir = str(root)
  tok = train_tokenizer(tok_docs, os.path.join(workdir, "tokenizer"), vocab_size=400)
  mcfg = model.ModelConfig.from_config(cfg.model)
  _, params = model.split(mcfg, 0)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"stage": stage, "model": config_lib.to_dict(cfg.model)}, f)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ck:
    ck.save(1, {"params": params}, extra={"stage": stage, "config": {"model": config_lib.to_dict(cfg.model)}})
  return workdir, tok, params


def docs():
  rng = random.Random(0)
  out = []
  for t in tasks.make_tasks("train", 300, 0):
    out.append(
      f"{t.question} {t.answer}\nThe answer to {t.question.lower()} is {t.answer}. " * rng.randint(1, 3)
    )
  return out


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return fake_sft(tmp_path_factory.mktemp("sft"), docs())


@pytest.fixture(scope="module")
def tok(sft_dir):
  return sft_dir[1]


def write_lines(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


# --- data ----------------------------------------------------------------------------------------


def test_formats_and_k_way_ranking_expand_to_all_pairs(tmp_path):
  msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sort: 3 1 2"}]
  path = write_lines(
    tmp_path / "c.jsonl",
    [
      {"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4", "margin": 2},
      "",
      {
        "prompt": msgs,
        "chosen": [{"role": "assistant", "content": "1 2 3"}],
        "rejected": {"content": "3 2 1"},
      },
      {"prompt": "Uppercase: ab", "ranking": ["AB", "Ab", "ab", "b"]},
    ],
  )
  comps = comp_data.read_comparisons(path)
  assert [c.group for c in comps] == [0, 1] + [2] * 6
  assert comps[0].prompt == [{"role": "user", "content": "Add 1 and 2."}] and comps[0].margin == 2.0
  assert comps[1].prompt == msgs and (comps[1].chosen, comps[1].rejected) == ("1 2 3", "3 2 1")
  # k = 4 -> every one of the 6 (better, worse) pairs, better first.
  assert [(c.chosen, c.rejected) for c in comps[2:]] == [
    ("AB", "Ab"),
    ("AB", "ab"),
    ("AB", "b"),
    ("Ab", "ab"),
    ("Ab", "b"),
    ("ab", "b"),
  ]
  assert comps[2].where.endswith("c.jsonl:4")
  # Held-out split by prompt: all pairs of the ranking fall on one side.
  train, held = comp_data.hash_split(comps, 0.5)
  assert len({id(c) for c in train} | {id(c) for c in held}) == 8
  assert len({c.group for c in held} & {c.group for c in train}) == 0


GOOD = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}


@pytest.mark.parametrize(
  "bad, match",
  [
    (
      {"prompt": "hi", "chosen": "same", "rejected": "same"},
      r"bad.jsonl:3: chosen and rejected are identical",
    ),
    ({"prompt": "hi", "chosen": "hello"}, r"bad.jsonl:3: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, r"bad.jsonl:3: missing field 'prompt'"),
    (
      {"prompt": "hi", "ranking": ["a", "b", "a"]},
      r"bad.jsonl:3: ranking\[0\] and ranking\[2\] are identical",
    ),
    ({"prompt": "hi", "chosen": " ", "rejected": "b"}, r"bad.jsonl:3: 'chosen' is empty"),
    (
      {"prompt": "hi", "chosen": "a", "rejected": {"role": "user", "content": "b"}},
      r"'rejected' message has role",
    ),
    ("{oops", r"bad.jsonl:3: not valid JSON"),
  ],
)
def test_bad_comparisons_name_file_and_line(tmp_path, bad, match):
  path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad])
  with pytest.raises(DataError, match=match):
    comp_data.read_comparisons(path)


def test_too_long_pairs_are_dropped_and_counted(tok):
  comps = [
    comp_data.Comparison([{"role": "user", "content": "Add 1 and 2."}], "3", "4", 0),
    comp_data.Comparison([{"role": "user", "content": "Echo."}], "7 " * 40, "8", 1),
    comp_data.Comparison([{"role": "user", "content": "Add 2 and 2."}], "4", "5", 2),
  ]
  enc = comp_data.encode(comps, tok, 24, "t")
  assert enc.stats["pairs"] == 2 and enc.stats["dropped_too_long"] == 1 and enc.group.tolist() == [0, 2]
  # Kept pairs are whole: the last token is eos, nothing was cut.
  assert all(x[-1] == tok.eos_id for x in enc.chosen + enc.rejected)
  logs = []
  rm.report_data(enc, enc, 24, logs.append)
  assert "1 pairs dropped as longer than train.seq_len=24" in logs[0]
  with pytest.raises(DataError, match=r"rm eval: all 1 pairs have a response longer than seq_len = 24"):
    comp_data.encode(comps[1:2], tok, 24, "rm eval")


# --- batches -------------------------------------------------------------------------------------


def ranked_enc(tok, n_prompts=12):
  """Pairs from task comparisons plus one 3-way ranking (3 pairs in group 100)."""
  ts = tasks.make_tasks("train", n_prompts, 0)
  comps = [
    comp_data.Comparison(row["prompt"], row["chosen"], row["rejected"], g)
    for g, row in enumerate(tasks.comparisons(ts, 0))
  ]
  comps += comp_data.parse_line(
    {"prompt": "Add 5 and 5.", "ranking": ["10", "The answer is 10.", "11"]}, "r:1", 100
  )
  return comp_data.encode(comps, tok, 48, "t")


def test_batch_layout_and_groups_stay_together(tok):
  enc = ranked_enc(tok)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  args = dict(global_batch=8, seq_len=48, sharding=sharding.batch_sharding(mesh), seed=1)
  loader = comp_data.ComparisonLoader(enc, **args)
  seen = []
  for _ in range(len(loader.batches(0))):
    b = loader.host_batch()
    assert all(v.shape[0] == 8 for v in b.values())
    groups = b["group"][:, 0]
    real = b["pair_mask"][:, 0] == 1
    # Rows 2i / 2i+1: chosen / rejected of one pair (same group, same margin); eos at end_index.
    np.testing.assert_array_equal(b["is_chosen"][:, 0], np.tile([1, 0], 4) * real)
    np.testing.assert_array_equal(groups[0::2], groups[1::2])
    for r in np.flatnonzero(real):
      e = b["end_index"][r, 0]
      assert (
        b["inputs"][r, e] == tok.eos_id
        and b["segment_ids"][r, : e + 1].all()
        and not b["segment_ids"][r, e + 1 :].any()
      )
    if 100 in groups:
      assert (groups == 100).sum() == 6  # the whole ranking in this batch
    seen += groups[0::2][real[0::2]].tolist()
  assert sorted(seen) == sorted(enc.group.tolist())  # each pair once per epoch
  # Resume: a fresh loader set to the saved position continues identically.
  state = json.loads(json.dumps(loader.get_state()))
  want = [loader.host_batch() for _ in range(3)]
  again = comp_data.ComparisonLoader(enc, **args)
  again.set_state(state)
  for w in want:
    g = again.host_batch()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
  with pytest.raises(ConfigError, match=r"the ranking at r:1 expands to 3 pairs"):
    comp_data.ComparisonLoader(enc, **{**args, "global_batch": 4})


def test_grad_accum_microbatches_keep_pairs_intact(tok):
  enc = ranked_enc(tok)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  args = dict(global_batch=16, seq_len=48, sharding=sharding.batch_sharding(mesh), shuffle=False)
  plain = comp_data.ComparisonLoader(enc, **args).host_batch()
  accum = comp_data.ComparisonLoader(enc, grad_accum=4, **args).host_batch()
  micro = jax.device_get(step_lib._microbatches(accum, 4))
  for a in range(4):  # microbatch a is the a-th block of 2 pairs of the plain layout
    for k in plain:
      np.testing.assert_array_equal(micro[k][a], plain[k][4 * a : 4 * a + 4])


# --- the reward and the loss ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_model():
  cfg = rm_cfg("x")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  m = placed.Model.build(model.ModelConfig.from_config(cfg.model), mesh, head=True)
  params = jax.device_get(m.init_params(0))
  params["head"]["w"] = np.random.default_rng(0).normal(size=m.cfg.d_model).astype(np.float32)
  return m, params


def test_reward_is_read_at_the_final_eos(tok, rm_model):
  m, params = rm_model
  enc = ranked_enc(tok)
  b = comp_data.pairs_to_batch(enc, [0, 1, 2, 3], 4, 48)
  score = jax.jit(m.scores)
  base = np.asarray(score(params, b))
  # Rows are scored independently: chosen and rejected of pair 0 alone (end_index (B,), as PPO passes it)
  # get the rewards they get inside the whole comparison batch.
  alone = comp_data.reward_batch([enc.chosen[0], enc.rejected[0]], 48, tok.pad_id)
  np.testing.assert_allclose(np.asarray(score(params, alone)), base[:2], rtol=1e-5, atol=1e-5)
  # Padding after the eos changes nothing ...
  padded = dict(b, inputs=b["inputs"].copy())
  for r in range(8):
    padded["inputs"][r, b["end_index"][r, 0] + 1 :] = 7
  np.testing.assert_array_equal(np.asarray(score(params, padded)), base)
  # ... while the last real token (the eos itself, and the token before it) does.
  for shift in (0, 1):
    moved = dict(b, inputs=b["inputs"].copy())
    moved["inputs"][0, b["end_index"][0, 0] - shift] = 9
    out = np.asarray(score(params, moved))
    assert out[0] != base[0] and np.array_equal(out[1:], base[1:])
  # The loss pairs row 2i with row 2i+1.
  loss_sum, pairs, aux = jax.jit(rm.rm_loss(m))(params, b, None)
  want = -np.log(1 / (1 + np.exp(-(base[0::2] - base[1::2]))))
  np.testing.assert_allclose(float(loss_sum), want.sum(), rtol=1e-5)
  assert float(pairs) == 4 and float(aux["accuracy_sum"]) == (base[0::2] > base[1::2]).sum()


def test_bradley_terry_loss_falls_on_one_batch(tok, rm_model):
  m, params = rm_model
  b = comp_data.pairs_to_batch(ranked_enc(tok), list(range(8)), 8, 48)
  loss_fn = rm.rm_loss(m, center_coef=0.01)
  opt = optax.adam(3e-3)

  @jax.jit
  def update(p, s):
    (loss, pairs), g = jax.value_and_grad(lambda p: loss_fn(p, b, None)[:2], has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss / pairs

  state = opt.init(params)
  seen = []
  for _ in range(15):
    params, state, loss = update(params, state)
    seen.append(float(loss))
  assert seen[-1] < 0.5 * seen[0], seen


# --- the stage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(sft_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rm") / "run")
  logs = []
  result = rm.run(rm_cfg(sft_dir[0]), workdir, log_fn=logs.append)
  return workdir, result, logs


def train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r}


def test_rm_run_trains_reports_and_saves_stats(trained):
  workdir, result, logs = trained
  losses_by_step = train_losses(workdir)
  assert sorted(losses_by_step) == [1, 2, 3, 4, 5, 6]
  ev = result.eval
  assert {"accuracy", "margin", "reward_mean", "reward_std", "loss"} <= set(ev) and 0.0 <= ev[
    "accuracy"
  ] <= 1.0
  by_label = {k: v for k, v in ev.items() if k.startswith("accuracy_")}
  assert {k.split("/")[0] for k in by_label} == {
    "accuracy_add",
    "accuracy_reverse",
    "accuracy_sort",
    "accuracy_upper",
  }
  assert any(line.startswith("[rm] held-out accuracy by label: add/") for line in logs)
  # The SFT model's own mistakes on the first 16 / 8 prompts join the hand-made pairs: each rejects a
  # sampled reply the grader marks wrong, in favour of the reference answer.
  rows = {
    s: [json.loads(line) for line in open(os.path.join(workdir, "data", f"{s}.jsonl"))]
    for s in ("train", "eval")
  }
  sampled = {s: [r for r in rows[s] if r["reason"] == "sampled"] for s in rows}
  assert 0 < len(sampled["train"]) <= 16 and 0 < len(sampled["eval"]) <= 8
  for r in sampled["train"] + sampled["eval"]:
    task = tasks.Task(r["kind"], r["prompt"][0]["content"], r["chosen"])
    assert tasks.grade(task, r["chosen"]) == 1.0 and tasks.grade(task, r["rejected"]) == 0.0
  data = next(r for r in metrics.read_metrics(workdir) if "data/train_pairs" in r)
  assert data["data/train_pairs"] == 64 + len(sampled["train"])
  assert data["data/eval_dropped_too_long"] == 0
  assert ev["pairs"] == 16 + len(sampled["eval"])
  stats = json.load(open(os.path.join(workdir, runs.REWARD_STATS_FILE)))
  assert stats["n"] == 8 and stats["source"] == "sft samples" and stats["std"] >= 0.0
  assert np.isfinite(stats["mean"]) and stats["step"] == 6 and runs.read_reward_stats(workdir) == stats
  # The held-out prompts never appear in training.
  read = lambda s: {
    json.dumps(json.loads(line)["prompt"]) for line in open(os.path.join(workdir, "data", f"{s}.jsonl"))
  }
  assert not read("train") & read("eval")
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.model"))


def test_resume_gives_the_uninterrupted_losses(sft_dir, trained, tmp_path):
  sft = str(tmp_path / "sft")
  shutil.copytree(sft_dir[0], sft)
  workdir = str(tmp_path / "resumed")
  quiet = lambda *a: None
  rm.run(rm_cfg(sft, **{"train.steps": 3, "train.eval_batches": 0, "rm.stats_samples": 0}), workdir, quiet)
  assert not os.path.exists(os.path.join(workdir, runs.REWARD_STATS_FILE))
  # The SFT run goes on meanwhile: the reward model still resumes from the SFT checkpoint it started from.
  with ckpt_lib.Checkpointer(os.path.join(sft, "checkpoints"), async_save=False) as ck:
    ck.save(2, {"params": jax.tree.map(np.zeros_like, sft_dir[2])}, extra=ck.read_extra(1))
  logs = []
  rm.run(rm_cfg(sft, **{"train.eval_batches": 0, "rm.stats_samples": 0}), workdir, logs.append)
  assert any("resumed from step 3" in line for line in logs)
  extra = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), create=False).read_extra(6)
  assert extra["init"] == {"workdir": os.path.realpath(sft), "step": 1, "stage": "sft"}
  want, got = train_losses(trained[0]), train_losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-6)


def test_score_returns_the_trained_rewards(trained, capsys, tmp_path):
  workdir, result, _ = trained
  pairs = [("Add 2 and 3.", "5"), ([{"role": "user", "content": "Add 2 and 3."}], "5"), ("Sort: 2 1", "1 2")]
  got = rewards.score(workdir, pairs)
  run, m, params, tokenizer = rewards.load_reward_model(workdir)
  assert run.reward_stats()["n"] == 8
  seqs = [comp_data.response_tokens(tokenizer, p, r) for p, r in pairs]
  batch = comp_data.reward_batch(seqs, 32, tokenizer.pad_id)
  want = jax.device_get(rewards.make_scorer(m)(jax.device_get(result.params), batch))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got[0] == got[1] != got[2]  # a text prompt is one user turn
  path = write_lines(tmp_path / "p.jsonl", [{"prompt": p, "response": r} for p, r in pairs])
  capsys.readouterr()
  rewards.score_cli(workdir, pairs_file=path)
  printed = [float(x) for x in capsys.readouterr().out.split()]
  np.testing.assert_allclose(printed, got, atol=1e-5)
  with pytest.raises(ConfigError, match="--prompt/--response: both are required"):
    rewards.score_cli(workdir, prompt="x")
  with pytest.raises(DataError, match=r"p2.jsonl:1: missing field 'response'"):
    rewards.score_cli(workdir, pairs_file=write_lines(tmp_path / "p2.jsonl", [{"prompt": "x"}]))


def test_init_from_missing_or_not_sft(sft_dir, tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(CheckpointError, match=r"train.init_from: .*/nowhere does not exist"):
    rm.run(rm_cfg(tmp_path / "nowhere"), str(workdir))
  pre, _, _ = fake_sft(tmp_path / "pre", docs()[:50], stage="pretrain")
  with pytest.raises(CheckpointError, match=r"is a run of stage 'pretrain', expected 'sft'"):
    rm.run(rm_cfg(pre), str(workdir))
  with pytest.raises(CheckpointError, match=r"model.d_model: 32 differs from 64"):
    rm.run(rm_cfg(sft_dir[0], **{"model.d_model": 32}), str(workdir))
  with pytest.raises(ConfigError, match="train.init_from: required"):
    rm.run(rm_cfg(""), str(workdir))
  with pytest.raises(ConfigError, match=r"rm.policy_train: 65 is more than tasks.train=64"):
    rm.run(rm_cfg(sft_dir[0], **{"rm.policy_train": 65}), str(workdir))
  with pytest.raises(ConfigError, match=r"rm.policy_temperature: must be > 0"):
    rm.run(rm_cfg(sft_dir[0], **{"rm.policy_temperature": 0.0}), str(workdir))
  assert not os.path.exists(workdir / "config.json")  # refused before anything was written
  with pytest.raises(CheckpointError, match="nowhere does not exist"):
    rewards.load_reward_model(str(tmp_path / "nowhere"))
  with pytest.raises(CheckpointError, match=r"is a run of stage 'sft', expected 'rm'"):
    rewards.load_reward_model(sft_dir[0])
