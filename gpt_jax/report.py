"""The pipeline report: report.md plus PNG plots, rewritten as stages finish.

It reads only what the stages left in their workdirs (config.json, metrics.jsonl, data_summary.json,
reward_stats.json, checkpoints), so it can be regenerated at any time:
`python -c "from gpt_jax import report; report.write('runs/demo')"`.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from gpt_jax import metrics as metrics_lib

STAGES = ("pretrain", "sft", "rm", "ppo")
# (file name, title, [(stage, metric key substring, label)])
PLOTS = (
  (
    "pretrain_loss.png",
    "Pretraining loss",
    [("pretrain", "train/loss", "train"), ("pretrain", "eval/loss", "eval")],
  ),
  (
    "sft.png",
    "SFT: loss and held-out accuracy",
    [
      ("sft", "train/loss", "train loss"),
      ("sft", "eval/loss", "eval loss"),
      ("sft", "eval/accuracy", "accuracy"),
    ],
  ),
  (
    "rm.png",
    "Reward model: held-out pairwise accuracy and loss",
    [("rm", "eval/accuracy", "pairwise accuracy"), ("rm", "train/loss", "train loss")],
  ),
  (
    "ppo.png",
    "PPO: reward, gold accuracy, KL to the reference",
    [
      ("ppo", "ppo/reward", "reward (normalised)"),
      ("ppo", "eval/gold_accuracy", "held-out gold accuracy"),
      ("ppo", "ppo/kl", "KL per response"),
    ],
  ),
)


def _read_json(path: str):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _series(workdir: str, key: str) -> dict[str, list[tuple[int, float]]]:
  """{metric name: [(step, value)]} for metrics whose name contains `key` (the last record of a step
  wins, since a resumed run rewrites the steps after its checkpoint)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  out: dict[str, dict[int, float]] = {}
  for rec in metrics_lib.read_metrics(path):
    for k, v in rec.items():
      if k in ("step", "time") or not isinstance(v, (int, float)):
        continue
      if key == k or ("/" not in key and key in k.split("/")[-1]):  # a full name matches only itself
        out.setdefault(k, {})[int(rec["step"])] = float(v)
  return {k: sorted(v.items()) for k, v in out.items()}


def plot(workdir: str, out_dir: str) -> list[tuple[str, str]]:
  """Draws the PNGs that have data; returns [(file, title)]."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  made = []
  for fname, title, lines in PLOTS:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = 0
    for stage, key, label in lines:
      for name, pts in _series(os.path.join(workdir, stage), key).items():
        if len(pts) < 1 or name.startswith("data/"):
          continue
        xs, ys = zip(*pts)
        ax.plot(
          xs, ys, marker="." if len(xs) < 30 else None, label=f"{label} ({name})" if name != key else label
        )
        drawn += 1
    if drawn:
      ax.set_title(title)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
      fig.tight_layout()
      fig.savefig(os.path.join(out_dir, fname), dpi=100)
      made.append((fname, title))
    plt.close(fig)
  return made


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
  head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
  body = ""
  for r in rows:
    cells = []
    for key, _ in cols:
      v = r.get(key, "")
      text = f"{v:.4g}" if isinstance(v, float) else str(v)
      cells.append(text.replace("|", "\\|").replace("\n", " ") or " ")
    body += "| " + " | ".join(cells) + " |\n"
  return head + body


def _last(workdir: str, key: str):
  s = _series(workdir, key)
  if key in s and s[key]:
    return s[key][-1][1]
  return None


def compare_answers(workdir: str, cfg=None, n: int = 8) -> list[dict]:
  """The same held-out task prompts answered (greedily) by the base, SFT and PPO models, graded."""
  from gpt_jax import inference
  from gpt_jax.data import tasks

  sft_cfg = _read_json(os.path.join(workdir, "sft", "config.json"))
  if sft_cfg is None:
    return []
  from gpt_jax.stages import sft as sft_stage

  spec = sft_stage.task_spec(ml_collections.ConfigDict(sft_cfg["sft"]))
  held_out = tasks.make_tasks("eval", n, seed=1234, spec=spec)
  rows = [{"prompt": t.question, "reference": t.answer} for t in held_out]
  for stage in ("pretrain", "sft", "ppo"):
    d = os.path.join(workdir, stage)
    if not os.path.exists(os.path.join(d, "DONE")):
      continue
    loaded = inference.load(d)
    replies = inference.answer(loaded, [t.messages for t in held_out])
    for row, t, reply in zip(rows, held_out, replies):
      row[stage] = reply.strip()
      row[f"{stage}_gold"] = tasks.grade(t, reply)
  return rows


def write(workdir: str, cfg=None, *, log_fn=print, compare: bool = True) -> str:
  """Writes workdir/report.md and workdir/report_*.png; returns the report's path."""
  out_dir = workdir
  parts = [
    f"# gpt_jax pipeline report\n\nWorkdir `{workdir}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
  ]
  timings = _read_json(os.path.join(workdir, "timings.json")) or {}
  if timings:
    parts.append(
      "## Stage times\n\n"
      + _table(
        [{"stage": k, "seconds": round(v, 1)} for k, v in timings.items()],
        [("stage", "stage"), ("seconds", "seconds")],
      )
    )

  pre = os.path.join(workdir, "pretrain")
  summary = _read_json(os.path.join(pre, "data_summary.json"))
  if summary:
    parts.append(
      "## Data mixture\n\n"
      + _table(
        summary["mixture"],
        [
          ("source", "source"),
          ("weight", "weight"),
          ("documents", "documents"),
          ("tokens", "tokens"),
          ("share", "share of training tokens"),
          ("epochs", "epochs over the budget"),
        ],
      )
    )
    tk = summary["tokenizer"]
    parts.append(
      f"## Tokenizer\n\nSentencePiece BPE, {tk['vocab_size']:,} pieces, "
      f"{tk['eval_bytes_per_token']:.2f} UTF-8 bytes per token on the held-out split; "
      f"{summary['train_tokens']:,} training and {summary['eval_tokens']:,} held-out tokens. "
      f"Special tokens: {', '.join(f'{k}={v}' for k, v in tk['special_tokens'].items())}.\n"
    )
  pre_cfg = _read_json(os.path.join(pre, "config.json"))
  if pre_cfg:
    from gpt_jax import describe

    parts.append("## Model\n\n```\n" + describe.table(ml_collections.ConfigDict(pre_cfg)) + "\n```\n")

  results = []
  checks = [
    ("pretrain", "eval/loss", "held-out loss"),
    ("pretrain", "eval/bits_per_byte", "bits per byte"),
    ("sft", "eval/loss", "held-out loss"),
    ("sft", "eval/accuracy", "held-out exact-match accuracy"),
    ("rm", "eval/accuracy", "held-out pairwise accuracy"),
    ("rm", "eval/margin", "mean reward margin"),
  ]
  for stage, key, label in checks:
    v = _last(os.path.join(workdir, stage), key)
    if v is not None:
      results.append({"stage": stage, "metric": label, "value": v})
  stats = _read_json(os.path.join(workdir, "rm", "reward_stats.json"))
  if stats:
    results.append(
      {
        "stage": "rm",
        "metric": "reward mean / std over SFT samples",
        "value": f"{stats['mean']:.3f} / {stats['std']:.3f}",
      }
    )
  ppo_dir = os.path.join(workdir, "ppo")
  for key, label in (
    ("eval/gold_accuracy", "held-out gold accuracy"),
    ("pass_at", "held-out prompts with a correct answer among k samples"),
    ("eval/sample_accuracy", "held-out sampled answers correct"),
    ("eval/reward", "held-out reward (normalised)"),
    ("ppo/reward_raw", "rollout reward (raw)"),
    ("ppo/kl", "KL to reference per response"),
  ):
    s = _series(ppo_dir, key)
    for name, pts in sorted(s.items()):
      if pts:
        results.append(
          {
            "stage": "ppo",
            "metric": f"{label} ({name}): first → last",
            "value": f"{pts[0][1]:.4g} → {pts[-1][1]:.4g}",
          }
        )
  if results:
    parts.append(
      "## Results\n\n" + _table(results, [("stage", "stage"), ("metric", "metric"), ("value", "value")])
    )

  for fname, title in plot(workdir, out_dir):
    parts.append(f"### {title}\n\n![{title}]({fname})\n")

  if compare:
    try:
      rows = compare_answers(workdir, cfg)
    except Exception as e:  # noqa: BLE001 - the report must not fail a finished pipeline
      rows = []
      log_fn(f"[report] could not sample the comparison table: {e}")
    if rows:
      stages = [s for s in ("pretrain", "sft", "ppo") if s in rows[0]]
      cols = [("prompt", "held-out prompt"), ("reference", "reference")]
      for s in stages:
        cols += [(s, f"{s} answer"), (f"{s}_gold", "gold")]
      parts.append("## The same held-out prompts, answered by each model (greedy)\n\n" + _table(rows, cols))
      for s in stages:
        acc = sum(r[f"{s}_gold"] for r in rows) / len(rows)
        parts.append(f"- {s}: {acc:.0%} of these {len(rows)} answered correctly\n")

  path = os.path.join(workdir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(parts))
  os.replace(path + ".tmp", path)
  log_fn(f"[report] {path}")
  return path
