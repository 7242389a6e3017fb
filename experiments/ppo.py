"""PPO configs: `get_config("PRESET")`; the policy model is the SFT preset's.

  python -m gpt_jax ppo --config=experiments/ppo.py:tiny \
      --config.ppo.sft_workdir=/tmp/gpt_jax/sft --config.ppo.rm_workdir=/tmp/gpt_jax/rm \
      --workdir=/tmp/gpt_jax/ppo

Presets: tiny (CPU demo on the embedded graded tasks), tiny_gpt2, gpt2_124m, llama_7b. One iteration
samples ppo.rollout_batch completions, scores them, then makes ppo.epochs passes of minibatch updates;
train.checkpoint_every counts iterations. With ppo.prompts '' the prompts are the embedded tasks'
training prompts (the SFT run's task knobs), and the held-out tasks measure gold accuracy.
"""

import os

import ml_collections

from gpt_jax import config as config_lib

# preset -> (sft preset, ppo overrides, optim overrides)
_PRESETS = {
  # CPU demo: small rollouts, many short iterations; KL target in nats per response. The critic
  # learns at 10x the policy's rate: with the shared rate its explained variance stayed near 0.02
  # over the first 10 iterations (0.21 after), with 3e-4 it was 0.27 (0.57 after).
  "tiny": ("tiny", dict(value_lr=3e-4), dict()),
  "tiny_gpt2": ("tiny_gpt2", dict(value_lr=3e-4), dict()),
  # InstructGPT-like settings scaled to a 124M policy: 512 rollouts per iteration, 4 epochs of
  # minibatch 64, lr 1e-5, adaptive KL toward 6 nats (Ziegler et al. 2019).
  "gpt2_124m": (
    "gpt2_124m",
    dict(
      iterations=200,
      rollout_batch=512,
      minibatch=64,
      epochs=4,
      max_new_tokens=32,
      kl_coef=0.1,
      target_kl=6.0,
      kl_alarm=20.0,
      eval_every=10,
      eval_prompts=512,
      task_train=200_000,
    ),
    dict(lr_peak=1e-5, warmup_steps=10),
  ),
  "llama_7b": (
    "llama_7b",
    dict(
      iterations=256,
      rollout_batch=512,
      minibatch=64,
      epochs=4,
      max_new_tokens=64,
      kl_coef=0.1,
      target_kl=6.0,
      kl_alarm=20.0,
      eval_every=16,
      eval_prompts=512,
      task_train=200_000,
    ),
    dict(lr_peak=1e-6, warmup_steps=10),
  ),
}


def ppo_config(**overrides) -> ml_collections.ConfigDict:
  """The cfg.ppo keys with their defaults (sized for the tiny CPU demo)."""
  c = ml_collections.ConfigDict(
    dict(
      sft_workdir="",  # the SFT run: the policy and the frozen reference start from its newest checkpoint
      rm_workdir="",  # the reward-model run: config.json, tokenizer/, checkpoints/, reward_stats.json
      value_head_on_policy=False,  # False: a separate critic initialised from the reward model (InstructGPT)
      # The separate critic's peak learning rate (it has its own AdamW and gradient clip, with the
      # optim section's other settings); 0 = optim.lr_peak. Its zero-initialised head has to learn the
      # prompt-dependent baseline fast, or the advantages carry the reward model's per-prompt offsets.
      value_lr=0.0,
      reward="rm",  # rm: the reward model's score | gold: the task grader's 0/1 (a perfect reward, for diagnosis)
      prompts="",  # '' = the embedded tasks' training prompts; else JSONL {"messages", ["answer"]}
      eval_path="",  # '' = the embedded held-out tasks; else JSONL {"messages", "answer"}
      task_train=4000,  # embedded training prompts generated (with the SFT run's task knobs)
      task_seed=1,
      iterations=40,  # rollout + update rounds
      rollout_batch=64,  # completions sampled per iteration
      minibatch=32,  # rollouts per optimizer step
      epochs=2,  # passes over each rollout batch
      max_new_tokens=16,
      temperature=1.0,  # sampling temperature; the PPO log-probs use the same temperature
      gamma=1.0,
      lam=0.95,
      whiten_advantages=True,
      clip=0.2,  # policy ratio clip
      value_clip=0.2,  # value change clip
      vf_coef=0.5,
      entropy_coef=0.0,
      kl_coef=0.05,  # initial (or fixed) coefficient of the per-token KL penalty
      adaptive_kl=True,  # Ziegler et al. (2019) controller toward target_kl
      target_kl=2.0,  # nats per response
      kl_horizon=1000,  # rollouts over which the controller corrects at most 20% per error unit
      kl_alarm=8.0,  # log an alarm when the KL per response passes this
      hack_window=5,  # iterations compared for the reward-hacking alarm (reward up, gold down)
      hack_min_change=0.02,  # ... each by more than this (reward in RM std units, gold as a fraction)
      no_eos_penalty=1.0,  # subtracted from the normalized score of a completion that never ends
      ptx_coef=0.0,  # > 0 mixes in the next-token loss on ptx_path (InstructGPT's PPO-ptx)
      ptx_path="",  # '' = the SFT run's training conversations (<sft_workdir>/data/train.jsonl)
      ptx_batch=8,  # rows of ptx data per optimizer step
      ptx_seq_len=64,
      eval_every=5,  # iterations between held-out evaluations (greedy); iteration 0 is the SFT model
      eval_prompts=128,  # held-out prompts per evaluation
      # > 0: at the first and last evaluation, also k sampled answers (ppo.temperature) per graded
      # held-out prompt: eval/pass_at_k and eval/sample_accuracy, the headroom of sampling-based RL
      eval_pass_k=8,
    )
  )
  c.update(overrides)
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in _PRESETS:
    raise ValueError(f"experiments/ppo.py: unknown preset {arg!r}; known: {', '.join(_PRESETS)}")
  sft_name, ppo, optim = _PRESETS[arg]
  # The policy is exactly the SFT model.
  here = os.path.dirname(os.path.abspath(__file__))
  cfg = config_lib.stage_config("ppo", os.path.join(here, f"sft.py:{sft_name}"))
  # PPO counts iterations, not steps over a dataset: drop the train keys it does not read.
  for key in ("steps", "global_batch", "seq_len", "eval_every", "eval_batches", "init_from"):
    del cfg.train[key]
  cfg.train.update(dict(checkpoint_every=10, log_every=1))
  # No weight decay (it would pull the policy toward zero, not toward the reference) and a constant rate.
  cfg.optim.update(dict(lr_peak=3e-5, warmup_steps=5, schedule="constant", weight_decay=0.0, b2=0.99))
  cfg.optim.update(optim)
  cfg.ppo = ppo_config(**ppo)
  return cfg
