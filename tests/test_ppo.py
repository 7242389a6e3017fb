"""PPO: reward assembly, rollout layout, prompt order and alarms; one update on a fixed rollout moves
log-probs the way the advantages say; bad input fails before anything compiles; a resumed run is
bitwise the uninterrupted one. The SFT and reward-model runs are tiny stand-ins (tests/helpers.py)."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import heads, loop, metrics, optim, placed, rl, sharding
from gpt_jax import model as model_lib
from gpt_jax import step as step_lib
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.tokenizers import train_tokenizer
from tests.helpers import RL_MODEL, corpus_docs, write_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- pure pieces ---------------------------------------------------------------------------------------


def test_rewards_kl_on_every_token_score_on_the_last():
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  logp = np.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]], np.float32)
  ref = np.array([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, -0.5, -3.0]], np.float32)
  rewards, kl, norm = rl.assemble_rewards(
    jnp.array([3.0, 1.0]),
    jnp.array(logp),
    jnp.array(ref),
    jnp.array(mask),
    jnp.array([1.0, 0.0]),
    kl_coef=0.1,
    score_mean=1.0,
    score_std=2.0,
    no_eos_penalty=0.5,
  )
  # Row 0 ended: (3 - 1) / 2 = 1; row 1 never ended: (1 - 1) / 2 - 0.5 = -0.5.
  np.testing.assert_allclose(norm, [1.0, -0.5])
  np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, -0.5, 2.0]])
  want = [[-0.05, 0.1, 0.0 + 1.0, 0.0], [-0.1, 0.0, 0.05, -0.2 - 0.5]]
  np.testing.assert_allclose(rewards, want, atol=1e-6)


def test_rollout_layout_matches_the_sampler_slots():
  tokens_BP = np.array([[3, 3, 7, 8], [7, 8, 9, 10]], np.int32)  # row 0: 2 pads then a 2-token prompt
  response = np.array([[20, 21, 3], [22, 23, 24]], np.int32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  rows = rl.rollout_layout(tokens_BP, np.array([2, 4]), response, mask, eos_id=2)
  assert rows["tokens"].tolist() == [[3, 3, 7, 8, 20, 21, 2, 0], [7, 8, 9, 10, 22, 23, 24, 2]]
  assert rows["positions"].tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
  assert rows["segment_ids"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
  assert rows["end_index"].tolist() == [6, 7]


def test_prompt_order_is_resumable_and_covers_every_prompt():
  a = rl.PromptOrder(5, seed=3)
  first = a.take(7)
  assert sorted(first[:5].tolist()) == [0, 1, 2, 3, 4]  # one epoch is a permutation
  b = rl.PromptOrder(5, seed=3)
  b.set_state(json.loads(json.dumps(a.get_state())))
  np.testing.assert_array_equal(a.take(9), b.take(9))
  with pytest.raises(DataError, match="prompt set is empty"):
    rl.PromptOrder(0, seed=0)


def test_alarms_for_kl_and_reward_hacking():
  al = rl.Alarms(kl_alarm=1.0, window=2)
  assert al.update(1, 0.5, 0.0, 0.5) == []
  assert "KL to the reference 2.000" in al.update(2, 2.0, 0.1, 0.5)[0]
  assert al.update(3, 0.5, 0.5, 0.2) == []  # reward 0.05 -> 0.5 ... gold 0.5 -> ...
  out = al.update(4, 0.5, 0.9, 0.1)
  assert len(out) == 1 and "reward hacking" in out[0] and "0.500 -> 0.150" in out[0]
  # Changes within min_change are noise, not an alarm.
  quiet = rl.Alarms(kl_alarm=1.0, window=1, min_change=0.05)
  assert quiet.update(1, 0.0, 0.50, 0.50) == [] and quiet.update(2, 0.0, 0.54, 0.46) == []
  assert "reward hacking" in quiet.update(3, 0.0, 0.60, 0.40)[0]
  again = rl.Alarms(1.0, 2)
  again.set_state(al.get_state())
  assert again.history == al.history


# --- one update on a fixed rollout --------------------------------------------------------------------


def test_one_update_follows_the_advantages():
  from gpt_jax.stages.ppo import objective

  cfg = model_lib.preset(
    "tiny", vocab_size=64, max_seq_len=32, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64
  )
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  policy = placed.Model.build(cfg, mesh)  # the critic is a head on the policy's hidden states here
  params = {"policy": policy.init_params(0), "value_head": heads.init_head(cfg.d_model)}
  axes = {"policy": policy.axes, "value_head": heads.head_axes()}
  B, P, N = 8, 4, 5
  rng = np.random.default_rng(0)
  prompt = rng.integers(4, 64, (B, P)).astype(np.int32)
  response = rng.integers(4, 64, (B, N)).astype(np.int32)
  mask = np.ones((B, N), np.float32)
  mask[:, -1] = 0.0
  rows = rl.rollout_layout(prompt, np.full(B, P), response, mask, eos_id=2)
  # The clipped objective alone: no PPO-ptx rows in this batch.
  p = config_lib.load(os.path.join(ROOT, "experiments/ppo.py:tiny"), {"ppo.ptx_coef": 0.0}).ppo
  loss_fn = objective.make_loss_fn(policy, None, P=P, N=N, p=p)

  @jax.jit
  def logp_of(q):
    logp, _, hidden = rl.response_logprobs(policy, q["policy"], rows, P, N, p.temperature)
    return logp, objective.critic_values(None, q, hidden, rows, P, N)

  old_logp, old_values = map(np.asarray, logp_of(params))
  adv = np.where(np.arange(B)[:, None] % 2 == 0, 1.0, -1.0) * mask  # even rows good, odd rows bad
  batch = {k: rows[k] for k in ("tokens", "positions", "segment_ids")}
  batch.update(
    response_mask=mask, old_logp=old_logp, old_values=old_values, advantages=adv, returns=old_values + 1.0
  )
  ocfg = config_lib.load(os.path.join(ROOT, "experiments/ppo.py:tiny")).optim
  with ocfg.unlocked():
    ocfg.warmup_steps, ocfg.lr_peak = 0, 1e-3
  optimizer, lr = optim.make(ocfg, 10, axes)
  state = step_lib.init_state(params, optimizer, 0)
  sh = step_lib.state_shardings(mesh, optimizer, sharding.tree_shardings(mesh, axes, params), state)
  step = step_lib.make_train_step(
    loss_fn,
    optimizer,
    lr,
    mesh=mesh,
    state_sharding=sh,
    batch_sharding=sharding.batch_sharding(mesh),
    donate=False,
  )
  new_state, m = step(state, batch)
  assert float(m["finite"]) == 1.0 and float(m["policy_clipfrac"]) == 0.0  # first step: ratio 1
  new_logp, new_values = map(np.asarray, logp_of(new_state["params"]))
  delta = (new_logp - old_logp) * mask
  assert (delta[0::2].sum(1) > 0).all(), delta  # positive advantage: more likely
  assert (delta[1::2].sum(1) < 0).all(), delta  # negative advantage: less likely
  # The value head moved toward the returns (old values + 1).
  assert ((new_values - old_values) * mask).sum() > 0


# --- the stage, on stand-in SFT and reward-model runs (tests/helpers.py) -----------------------------


def ppo_cfg(sft_dir, rm_dir, **over):
  overrides = {
    **RL_MODEL,
    "ppo.sft_workdir": str(sft_dir),
    "ppo.rm_workdir": str(rm_dir),
    "ppo.iterations": 2,
    "ppo.rollout_batch": 8,
    "ppo.minibatch": 4,
    "ppo.epochs": 1,
    "ppo.max_new_tokens": 6,
    "tasks.train": 32,
    "ppo.eval_prompts": 8,
    "ppo.eval_pass_k": 2,
    "ppo.eval_every": 2,
    "optim.warmup_steps": 1,
    "train.checkpoint_every": 2,
    "train.async_checkpoint": False,
    "train.progress_bar": False,
    "metrics.tensorboard": False,
    "mesh.data": 4,
    "mesh.tensor": 2,
  }
  overrides.update(over)
  return config_lib.load(os.path.join(ROOT, "experiments/ppo.py:tiny"), overrides)


def ppo_records(workdir):
  out = {}
  for r in metrics.read_metrics(workdir):
    if any(k.startswith("ppo/") for k in r):
      out[r["step"]] = {k: v for k, v in r.items() if k.startswith("ppo/") and not k.endswith("_s")}
  return out


def test_resumed_run_is_bitwise_the_uninterrupted_one(rl_runs, tmp_path):
  from gpt_jax.stages import ppo

  sft_dir, rm_dir, _ = rl_runs
  quiet = lambda *a: None
  # (the critic with its own learning rate: the optimizer state is one AdamW per model)
  ptx = {"ppo.ptx_coef": 0.5, "ppo.ptx_batch": 4, "ppo.ptx_seq_len": 32, "ppo.value_lr": 3e-3}
  full = ppo.run(ppo_cfg(sft_dir, rm_dir, **ptx), str(tmp_path / "full"), log_fn=quiet)
  assert full.step == 2 and set(full.evals) == {0, 2}
  assert 0.0 <= full.eval["gold_accuracy"] <= 1.0
  for it in (0, 2):  # pass@k at the first and the last evaluation
    e = full.evals[it]
    assert 0.0 <= e["sample_accuracy"] <= e["pass_at_2"] <= min(1.0, 2 * e["sample_accuracy"])
  # The same command, stopped by SIGTERM after iteration 1 (checkpoint written), then run again.
  half = str(tmp_path / "half")

  def preempt_after_first(line):
    if line.startswith("[ppo] iteration 1/2"):
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop.Preempted):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **ptx), half, log_fn=preempt_after_first)
  logs = []
  resumed = ppo.run(ppo_cfg(sft_dir, rm_dir, **ptx), half, log_fn=logs.append)
  assert any("resumed from iteration 1" in line for line in logs)
  assert resumed.eval["pass_at_2"] == full.eval["pass_at_2"]
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The checkpoint's "params/policy" item is a plain model's params (what inference and later stages load).
  ref = ckpt_lib.restore_params(
    os.path.join(half, "checkpoints"),
    jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), full.params["policy"]
    ),
    item="params/policy",
  )
  np.testing.assert_array_equal(np.asarray(ref["embed"]), np.asarray(full.params["policy"]["embed"]))
  want, got = ppo_records(str(tmp_path / "full")), ppo_records(half)
  assert want[2] == got[2] and set(want[2]) >= {
    "ppo/reward",
    "ppo/kl",
    "ppo/gold",
    "ppo/explained_variance",
    "ppo/ptx_loss",
  }
  # Iteration 0 evaluates the SFT model; its answers are kept for the report.
  samples = [json.loads(x) for x in open(os.path.join(half, "samples", "iter_00000.jsonl"))]
  assert len(samples) == 8 and {"prompt", "answer", "response", "gold", "reward_raw"} <= set(samples[0])


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_input_fails_before_anything_is_built(rl_runs, tmp_path):
  from gpt_jax.stages import ppo

  sft_dir, rm_dir, tok_dir = rl_runs
  work = tmp_path / "w"
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(DataError, match=r"ppo.prompts: .*empty.jsonl holds no prompts"):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"ppo.prompts": str(empty)}), str(work))
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"messages": [{"role": "user", "content": "Sort: " + "3 " * 40}]}) + "\n")
  with pytest.raises(
    ConfigError, match=r"ppo.max_new_tokens: ppo train prompt\[0\] has \d+ tokens; with 6 new"
  ):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"ppo.prompts": str(long)}), str(work))
  with pytest.raises(CheckpointError, match=r"model.d_model: 32 differs from 64 in .*stage 'sft'"):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"model.d_model": 32}), str(work))
  # A reward model with another tokenizer, or another vocabulary size.
  other_tok = str(tmp_path / "tok2")
  train_tokenizer(corpus_docs(100)[::-1], other_tok, vocab_size=380)
  rm2 = str(tmp_path / "rm2")
  shutil.copytree(rm_dir, rm2)
  shutil.rmtree(os.path.join(rm2, "tokenizer"))
  shutil.copytree(other_tok, os.path.join(rm2, "tokenizer"))
  with pytest.raises(DataError, match=r"ppo.rm_workdir: tokenizer .*rm2/tokenizer/tokenizer.model differs"):
    ppo.run(ppo_cfg(sft_dir, rm2), str(work))
  model_dict = dict(config_lib.to_dict(ppo_cfg("", "").model), vocab_size=448)
  rm_params = {
    "trunk": model_lib.split(model_lib.ModelConfig.from_config(model_dict), 0)[1],
    "head": heads.init_head(64),
  }
  rm3 = write_run(tmp_path / "rm3", tok_dir, "rm", model_dict, rm_params)
  shutil.copy(os.path.join(rm_dir, "reward_stats.json"), rm3)
  with pytest.raises(ConfigError, match=r"reward model's model.vocab_size=448 differs from the policy's 512"):
    ppo.run(ppo_cfg(sft_dir, rm3), str(work))
  with pytest.raises(ConfigError, match=r"ppo.minibatch: 3 must divide ppo.rollout_batch=8"):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"ppo.minibatch": 3}), str(work))
  with pytest.raises(ConfigError, match=r"ppo.value_lr: must be >= 0, got -0.001"):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"ppo.value_lr": -1e-3}), str(work))
  with pytest.raises(ConfigError, match=r"optim.b2: must be in \[0, 1\), got 1.5"):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"optim.b2": 1.5}), str(work))
  with pytest.raises(ConfigError, match=r"ppo.value_lr: applies to the separate critic"):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"ppo.value_lr": 1e-3, "ppo.value_head_on_policy": True}), str(work))
  with pytest.raises(ConfigError, match=r"ppo.gold_weight, ppo.rm_weight: both are 0"):
    ppo.run(ppo_cfg(sft_dir, rm_dir, **{"ppo.rm_weight": 0.0}), str(work))
  assert not os.path.exists(work)  # refused before the workdir was touched
