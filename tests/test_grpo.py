"""GRPO: one update on a fixed group raises the log-probability of the above-mean samples and lowers
the others'; the stage end to end on stand-in SFT and reward-model runs (tests/helpers.py): metrics,
held-out gold and pass@k, a resumed run bitwise the uninterrupted one; bad input before anything is
built."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import loop, losses, metrics, optim, placed, rl, sharding
from gpt_jax import model as model_lib
from gpt_jax import step as step_lib
from gpt_jax.errors import CheckpointError, ConfigError
from gpt_jax.stages import grpo
from tests.helpers import RL_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_update_raises_the_above_mean_samples():
  cfg = model_lib.preset(
    "tiny", vocab_size=64, max_seq_len=32, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64
  )
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  policy = placed.Model.build(cfg, mesh)
  params = policy.init_params(0)
  G, K, P, N = 2, 4, 4, 5
  B = G * K
  rng = np.random.default_rng(0)
  prompt = np.repeat(rng.integers(4, 64, (G, P)), K, axis=0).astype(np.int32)  # K samples of each prompt
  response = rng.integers(4, 64, (B, N)).astype(np.int32)
  mask = np.ones((B, N), np.float32)
  rows = rl.rollout_layout(prompt, np.full(B, P), response, mask, eos_id=2)
  g = config_lib.load(os.path.join(ROOT, "experiments/grpo.py:tiny")).grpo
  logp_of = jax.jit(lambda q: rl.response_logprobs(policy, q, rows, P, N, g.temperature)[0])
  old = np.asarray(logp_of(params))
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], np.float32)  # above the mean: 1.0
  adv = np.asarray(losses.group_advantages(jnp.asarray(rewards))).reshape(-1)
  batch = dict(
    tokens=rows["tokens"],
    positions=rows["positions"],
    segment_ids=rows["segment_ids"],
    response_mask=mask,
    old_logp=old,
    ref_logp=old,
    advantages=adv[:, None],
  )
  ocfg = config_lib.load(os.path.join(ROOT, "experiments/grpo.py:tiny")).optim
  with ocfg.unlocked():
    ocfg.warmup_steps, ocfg.lr_peak = 0, 1e-3
  optimizer, lr = optim.make(ocfg, 10, policy.axes)
  state = step_lib.init_state(params, optimizer, 0)
  step = step_lib.make_train_step(
    grpo.make_loss_fn(policy, P=P, N=N, g=g),
    optimizer,
    lr,
    mesh=mesh,
    state_sharding=step_lib.state_shardings(mesh, optimizer, policy.shardings, state),
    batch_sharding=sharding.batch_sharding(mesh),
    donate=False,
  )
  new_state, m = step(state, batch)
  assert float(m["finite"]) == 1.0 and float(m["kl"]) == 0.0  # the policy is the reference at first
  delta = (np.asarray(logp_of(new_state["params"])) - old).sum(axis=1)
  up = rewards.reshape(-1) > rewards.mean(axis=1).repeat(K)
  assert (delta[up] > 0).all() and (delta[~up] < 0).all(), (delta, up)


def test_dynamic_sampling_keeps_the_groups_that_teach_first():
  import types

  runner = types.SimpleNamespace(over=3, G=2, K=2, B=4)
  rewards = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.2], [1, 1]], np.float32).reshape(-1, 1)
  kept = grpo.Grpo.kept_rows(runner, {"rewards": rewards})
  np.testing.assert_array_equal(kept, [2, 3, 6, 7])  # groups 1 and 3: the first with different rewards
  runner.over = 1
  np.testing.assert_array_equal(grpo.Grpo.kept_rows(runner, {"rewards": rewards[:4]}), [0, 1, 2, 3])


def grpo_cfg(sft_dir, rm_dir="", **over):
  overrides = {
    **RL_MODEL,
    "grpo.sft_workdir": str(sft_dir),
    "grpo.rm_workdir": str(rm_dir),
    "grpo.iterations": 2,
    "grpo.prompts_per_iteration": 4,
    "grpo.samples_per_prompt": 2,
    "grpo.minibatch": 4,
    "grpo.max_new_tokens": 6,
    "grpo.eval_prompts": 8,
    "grpo.eval_pass_k": 2,
    "grpo.eval_every": 2,
    "tasks.train": 32,
    "optim.warmup_steps": 1,
    "train.checkpoint_every": 2,
    "train.async_checkpoint": False,
    "train.progress_bar": False,
    "metrics.tensorboard": False,
    "mesh.data": 4,
    "mesh.tensor": 2,
  }
  overrides.update(over)
  return config_lib.load(os.path.join(ROOT, "experiments/grpo.py:tiny"), overrides)


def records(workdir):
  return {
    r["step"]: {k: v for k, v in r.items() if k.startswith("grpo/") and not k.endswith("_s")}
    for r in metrics.read_metrics(workdir)
    if any(k.startswith("grpo/") for k in r)
  }


def test_resumed_run_is_bitwise_the_uninterrupted_one(rl_runs, tmp_path):
  sft_dir, rm_dir, _ = rl_runs
  quiet = lambda *a: None
  # The grader and the reward model; twice the prompts sampled (dynamic sampling); two passes per batch.
  mix = {"grpo.rm_weight": 0.5, "grpo.epochs": 2, "grpo.oversample": 2}
  full = grpo.run(grpo_cfg(sft_dir, rm_dir, **mix), str(tmp_path / "full"), log_fn=quiet)
  assert full.step == 2 and set(full.evals) == {0, 2}
  for it in (0, 2):
    e = full.evals[it]
    assert 0.0 <= e["gold_accuracy"] <= 1.0 and np.isfinite(e["reward"])
    assert 0.0 <= e["sample_accuracy"] <= e["pass_at_2"] <= 1.0
  half = str(tmp_path / "half")

  def preempt_after_first(line):
    if line.startswith("[grpo] iteration 1/2"):
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(loop.Preempted):
    grpo.run(grpo_cfg(sft_dir, rm_dir, **mix), half, log_fn=preempt_after_first)
  logs = []
  resumed = grpo.run(grpo_cfg(sft_dir, rm_dir, **mix), half, log_fn=logs.append)
  assert any("resumed from iteration 1" in line for line in logs)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want, got = records(str(tmp_path / "full")), records(half)
  assert want[2] == got[2] and {
    "grpo/reward",
    "grpo/kl",
    "grpo/gold",
    "grpo/rm_reward",
    "grpo/zero_std_groups",
  } <= set(want[2])
  samples = [json.loads(x) for x in open(os.path.join(half, "samples", "iter_00000.jsonl"))]
  assert len(samples) == 8 and {"prompt", "response", "gold", "reward_raw"} <= set(samples[0])


def test_bad_input_fails_before_anything_is_built(rl_runs, tmp_path):
  sft_dir, rm_dir, _ = rl_runs
  work = tmp_path / "w"
  cases = [
    ({"grpo.samples_per_prompt": 1}, ConfigError, r"grpo.samples_per_prompt: must be >= 2, got 1"),
    (
      {"grpo.gold_weight": 0.0, "grpo.rm_weight": 0.0},
      ConfigError,
      r"grpo.gold_weight, grpo.rm_weight: both are 0",
    ),
    (
      {"grpo.rm_weight": 1.0, "grpo.rm_workdir": ""},
      ConfigError,
      r"grpo.rm_workdir: required with grpo.rm_weight=1.0",
    ),
    ({"grpo.minibatch": 3}, ConfigError, r"grpo.minibatch: 3 must divide the 8 rollouts"),
    (
      {"grpo.sft_workdir": str(rm_dir)},
      CheckpointError,
      r"grpo.sft_workdir: .* is a run of stage 'rm', expected",
    ),
    ({"model.d_model": 32}, CheckpointError, r"model.d_model: 32 differs from 64 in .*stage 'sft'"),
  ]
  for over, error, match in cases:
    with pytest.raises(error, match=match):
      grpo.run(grpo_cfg(sft_dir, **over), str(work))
  assert not os.path.exists(work)  # refused before the workdir was touched
