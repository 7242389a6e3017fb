"""Where an RL iteration's time goes: rollout tokens per second of the sampler inside PPO and GRPO
iterations, and the share of each iteration spent generating.

  python benchmarks/bench_rl.py --sft_workdir runs/demo/sft --rm_workdir runs/demo/rm [--iterations 6]

Runs a few iterations of the demo presets (experiments/ppo.py:tiny, experiments/grpo.py:tiny) from
the given runs in a scratch directory (evaluation off), then reads each iteration's metrics: gen_s
(sampling, including the tokens' trip to the host for grading), update_s (scoring and the optimizer
steps), and the response lengths. The first iteration compiles and is left out. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(stage: str, args, workdir: str) -> dict:
  from gpt_jax import config as config_lib
  from gpt_jax import metrics
  from gpt_jax.stages import grpo, ppo

  section = {"ppo": "ppo", "grpo": "grpo"}[stage]
  overrides = {
    f"{section}.sft_workdir": args.sft_workdir,
    f"{section}.rm_workdir": args.rm_workdir,
    f"{section}.iterations": args.iterations,
    f"{section}.eval_prompts": 0,
    f"{section}.eval_pass_k": 0,
    f"{section}.eval_every": args.iterations,
    "train.progress_bar": False,
    "train.checkpoint_every": args.iterations,
    "metrics.tensorboard": False,
  }
  cfg = config_lib.load(os.path.join(ROOT, f"experiments/{stage}.py:tiny"), overrides)
  {"ppo": ppo, "grpo": grpo}[stage].run(cfg, workdir, log_fn=lambda *a: None)
  rows = [r for r in metrics.read_metrics(workdir) if f"{section}/gen_s" in r][1:]  # the first compiles
  gen = [r[f"{section}/gen_s"] for r in rows]
  upd = [r[f"{section}/update_s"] for r in rows]
  B = (
    int(cfg.ppo.rollout_batch)
    if stage == "ppo"
    else int(cfg.grpo.prompts_per_iteration) * int(cfg.grpo.samples_per_prompt) * int(cfg.grpo.oversample)
  )  # the rollouts generated: GRPO samples oversample x G prompts and updates on G of them
  tokens = [B * r[f"{section}/response_length"] for r in rows]
  return {
    "stage": stage,
    "rollouts": B,
    "response_tokens": statistics.median(r[f"{section}/response_length"] for r in rows),
    "max_new_tokens": int(cfg[section].max_new_tokens),
    "gen_s": statistics.median(gen),
    "update_s": statistics.median(upd),
    "rollout_tokens_per_s": statistics.median(t / g for t, g in zip(tokens, gen)),
    "gen_share": statistics.median(g / (g + u) for g, u in zip(gen, upd)),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sft_workdir", required=True)
  p.add_argument("--rm_workdir", required=True)
  p.add_argument("--iterations", type=int, default=6)
  p.add_argument("--stages", default="ppo,grpo")
  args = p.parse_args()
  import jax

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for stage in args.stages.split(","):
      rows.append(bench(stage, args, os.path.join(tmp, stage)))
  print(
    f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; median over iterations 2..{args.iterations}"
  )
  print(
    "| stage | rollouts/iteration | response tokens (mean / max) | generate s | score + update s"
    " | rollout tokens/s | share generating |"
  )
  print("|---|---:|---|---:|---:|---:|---:|")
  for r in rows:
    print(
      f"| {r['stage']} | {r['rollouts']} | {r['response_tokens']:.1f} / {r['max_new_tokens']} | "
      f"{r['gen_s']:.2f} | {r['update_s']:.2f} | "
      f"{r['rollout_tokens_per_s']:,.0f} | {r['gen_share']:.0%} |"
    )


if __name__ == "__main__":
  main()
