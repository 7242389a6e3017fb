"""The pipeline report: report.md plus PNG plots, rewritten as entries finish.

It reads only what the runs left in their workdirs (pipeline_config.json, config.json,
metrics.jsonl, data_summary.json, reward_stats.json, samples/, checkpoints), so it can be regenerated
at any time: `python -c "from gpt_jax import report; report.write('runs/demo')"`.

Sections: stage times; the data mixture, tokenizer and model; the pretraining, SFT and reward-model
results; the post-training methods side by side on the same held-out prompts (gold accuracy and
pass@k before and after, KL to the reference, the reward model's score, wall time); curves; the
reward over-optimization plot (proxy reward and gold accuracy against sqrt(KL) for every run trained
on the learned reward model); and the same held-out prompts answered by each model.
"""

from __future__ import annotations

import json
import math
import os
import time

import ml_collections

from gpt_jax import metrics as metrics_lib

RL_STAGES = ("dpo", "ppo", "grpo")
# stage -> (file suffix, title, [(metric key, label)])
CURVES = {
  "pretrain": ("loss", "Pretraining loss", [("train/loss", "train"), ("eval/loss", "eval")]),
  "sft": (
    "curves",
    "SFT: loss and held-out accuracy",
    [("train/loss", "train loss"), ("eval/loss", "eval loss"), ("eval/accuracy", "accuracy")],
  ),
  "rm": (
    "curves",
    "Reward model: held-out pairwise accuracy and loss",
    [("eval/accuracy", "pairwise accuracy"), ("train/loss", "train loss")],
  ),
  "dpo": (
    "curves",
    "DPO: held-out implicit-reward accuracy and gold accuracy",
    [
      ("eval/reward_accuracy", "implicit-reward accuracy"),
      ("eval/gold_accuracy", "gold accuracy"),
      ("train/loss", "train loss"),
    ],
  ),
  "ppo": (
    "curves",
    "PPO: reward, held-out gold accuracy, KL to the reference",
    [
      ("ppo/reward", "reward (normalised)"),
      ("eval/gold_accuracy", "held-out gold accuracy"),
      ("ppo/kl", "KL per response (log-ratio)"),
      ("ppo/kl_k3", "KL per response (k3)"),
    ],
  ),
  "grpo": (
    "curves",
    "GRPO: reward, held-out gold accuracy, KL to the reference",
    [
      ("grpo/reward", "reward"),
      ("eval/gold_accuracy", "held-out gold accuracy"),
      ("grpo/kl", "KL per response"),
    ],
  ),
}


def _read_json(path: str):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def entries(workdir: str) -> dict[str, str]:
  """{entry name: stage} of a pipeline workdir, in order (from pipeline_config.json; else the stage
  folders that exist)."""
  cfg = _read_json(os.path.join(workdir, "pipeline_config.json"))
  if cfg and "stages" in cfg:
    names = [n.strip() for n in str(cfg["stages"]).split(",") if n.strip()]
    return {n: cfg[n]["stage"] for n in names if isinstance(cfg.get(n), dict) and "stage" in cfg[n]}
  return {s: s for s in ("pretrain", "sft", "rm", *RL_STAGES) if os.path.isdir(os.path.join(workdir, s))}


def _series(workdir: str, key: str) -> list[tuple[int, float]]:
  """[(step, value)] of one metric of a run (the last record of a step wins: a resumed run rewrites the
  steps after its checkpoint)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out: dict[int, float] = {}
  for rec in metrics_lib.read_metrics(path):
    if isinstance(rec.get(key), int | float):
      out[int(rec["step"])] = float(rec[key])
  return sorted(out.items())


def _pyplot():
  """matplotlib.pyplot on the Agg backend (PNG files, no display)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _plot_lines(path: str, title: str, lines, xlabel: str = "step") -> bool:
  """Draws [(label, [(x, y)])] into a PNG; False when there is nothing to draw."""
  lines = [(label, pts) for label, pts in lines if pts]
  if not lines:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, pts in lines:
    xs, ys = zip(*pts)
    ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot(workdir: str, out_dir: str) -> list[tuple[str, str]]:
  """The curves of every entry and the over-optimization plot; returns [(file, title)] drawn."""
  made = []
  for name, stage in entries(workdir).items():
    suffix, title, keys = CURVES[stage]
    fname = f"{name}_{suffix}.png"
    title = title if name == stage else f"{title} ({name})"
    lines = [(label, _series(os.path.join(workdir, name), key)) for key, label in keys]
    if _plot_lines(os.path.join(out_dir, fname), title, lines):
      made.append((fname, title))
  title = "Reward over-optimization: held-out proxy reward and gold accuracy against sqrt(KL)"
  if _plot_overoptimization(os.path.join(out_dir, "overoptimization.png"), overoptimization(workdir)):
    made.append(("overoptimization.png", title))
  return made


def _plot_overoptimization(path: str, curves: dict[str, list[dict]]) -> bool:
  """Proxy reward (left axis) and gold accuracy (right axis) against sqrt(KL), each evaluation labelled
  with its iteration and gold's peak marked: the two differ in scale, and KL is not monotone in the
  iteration, so the labels give the order. False when there is nothing to draw."""
  if not curves:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  gold_ax = ax.twinx()
  handles = []
  for i, (name, rows) in enumerate(curves.items()):
    xs = [r["sqrt_kl"] for r in rows]
    handles += ax.plot(xs, [r["proxy"] for r in rows], "o-", color=f"C{2 * i}", label=f"{name}: proxy reward")
    handles += gold_ax.plot(
      xs, [r["gold"] for r in rows], "s--", color=f"C{2 * i + 1}", label=f"{name}: gold"
    )
    for r in rows:
      gold_ax.annotate(
        str(r["iteration"]), (r["sqrt_kl"], r["gold"]), fontsize=6, xytext=(2, 3), textcoords="offset points"
      )
    best = max(rows, key=lambda r: r["gold"])
    gold_ax.plot([best["sqrt_kl"]], [best["gold"]], "*", color=f"C{2 * i + 1}", markersize=12)
    ax.axvline(best["sqrt_kl"], color=f"C{2 * i + 1}", alpha=0.4, linewidth=1)
  ax.set_title(
    "Proxy reward and gold accuracy against sqrt(KL)\n(labels: iteration; star: gold's peak)", fontsize=10
  )
  ax.set_xlabel("sqrt(KL to the reference, nats; rollouts since the previous evaluation)")
  ax.set_ylabel("reward model's normalised score")
  gold_ax.set_ylabel("held-out gold accuracy")
  ax.grid(alpha=0.3)
  lo = min(r["gold"] for rows in curves.values() for r in rows)
  hi = max(r["gold"] for rows in curves.values() for r in rows)
  pad = max(0.1 - (hi - lo), 0.0) / 2 + 0.01  # at least 10 points of gold in view: noise looks like noise
  gold_ax.set_ylim(max(lo - pad, 0.0), min(hi + pad, 1.0))
  fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=2 * len(curves), frameon=False)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def overoptimization(workdir: str) -> dict[str, list[dict]]:
  """{entry: [{"iteration", "kl", "sqrt_kl", "proxy", "gold"}]} for every RL run trained on the learned
  reward model (PPO or GRPO with rm_weight > 0): at each held-out evaluation, the reward model's normalised
  score of the greedy answers (the proxy), their gold accuracy, and the KL to the reference (its k3
  estimate where logged) averaged over the rollouts since the previous evaluation (0 at iteration 0,
  the SFT model)."""
  cfg = _read_json(os.path.join(workdir, "pipeline_config.json")) or {}
  out = {}
  for name, stage in entries(workdir).items():
    section = (cfg.get(name) or {}).get(stage) or {}
    on_rm = (
      stage == "ppo"
      and section.get("reward", "rm") == "rm"
      or stage == "grpo"
      and section.get("rm_weight", 0) > 0
    )
    if not on_rm:
      continue
    d = os.path.join(workdir, name)
    kl = _kl_series(d, stage)
    proxy, gold = dict(_series(d, "eval/reward")), dict(_series(d, "eval/gold_accuracy"))
    rows, prev = [], 0
    for it in sorted(set(proxy) & set(gold)):
      # One iteration's 64-odd rollouts give a noisy KL: take the mean over the iterations since the
      # previous evaluation (0 at iteration 0, the SFT model).
      window = [v for i, v in kl if prev < i <= it]
      prev = it
      if it == 0 or window:
        k = 0.0 if it == 0 else max(sum(window) / len(window), 0.0)
        rows.append({"iteration": it, "kl": k, "sqrt_kl": math.sqrt(k), "proxy": proxy[it], "gold": gold[it]})
    if rows:
      out[name] = rows
  return out


def _kl_series(d: str, stage: str) -> list[tuple[int, float]]:
  """An RL run's KL to the reference as the report reads it: the k3 estimate (PPO logs it as kl_k3
  beside the penalty's log-ratio; GRPO's kl is k3), else the one there is."""
  return _series(d, f"{stage}/kl_k3") or _series(d, f"{stage}/kl")


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
  return s[-1][1] if s else None


def _first_last(workdir: str, key: str) -> str:
  s = _series(workdir, key)
  return f"{s[0][1]:.3f} → {s[-1][1]:.3f}" if s else ""


def methods_table(workdir: str) -> list[dict]:
  """One row per post-training run: held-out gold accuracy and pass@k before (the SFT model, step 0)
  and after, the final KL to the reference, the reward model's normalised score of the greedy answers,
  and the wall time."""
  timings = _read_json(os.path.join(workdir, "timings.json")) or {}
  rows = []
  for name, stage in entries(workdir).items():
    if stage not in RL_STAGES:
      continue
    d = os.path.join(workdir, name)
    row = {
      "method": name if name == stage else f"{name} ({stage})",
      "gold": _first_last(d, "eval/gold_accuracy"),
    }
    passes = sorted({k for r in _records(d) for k in r if k.startswith("eval/pass_at_")})
    if passes:
      row["pass"] = f"{passes[0][10:]}: {_first_last(d, passes[0])}"
    kl = _kl_series(d, stage)
    if kl:
      row["kl"] = kl[-1][1]
    if stage == "dpo":
      row["reward"] = f"implicit-reward accuracy {_first_last(d, 'eval/reward_accuracy')}"
    elif _series(d, "eval/reward"):
      row["reward"] = _first_last(d, "eval/reward")
    if name in timings:
      row["seconds"] = round(timings[name])
    rows.append(row)
  return rows


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return metrics_lib.read_metrics(path) if os.path.exists(path) else []


def compare_answers(workdir: str, n: int = 8) -> list[dict]:
  """The same held-out task prompts answered (greedily) by every finished model, graded."""
  from gpt_jax import inference
  from gpt_jax.data import tasks

  found = entries(workdir)
  sft = next((name for name, s in found.items() if s == "sft"), None)
  sft_cfg = _read_json(os.path.join(workdir, sft, "config.json")) if sft else None
  if sft_cfg is None or "tasks" not in sft_cfg:
    return []
  spec = tasks.spec_from_config(sft_cfg["tasks"])
  # The first n of the held-out prompts every RL stage is measured on (the SFT run's tasks seed).
  held_out = tasks.make_tasks("eval", n, seed=int(sft_cfg["tasks"].get("seed", 0)), spec=spec)
  rows = [{"prompt": t.question, "reference": t.answer} for t in held_out]
  for name, stage in found.items():
    d = os.path.join(workdir, name)
    if stage == "rm" or not os.path.exists(os.path.join(d, "DONE")):
      continue
    loaded = inference.load(d)
    replies = inference.answer(loaded, [t.messages for t in held_out])
    for row, t, reply in zip(rows, held_out, replies):
      row[name] = reply.strip()
      row[f"{name}_gold"] = tasks.grade(t, reply)
  return rows


# Per task kind, the metrics of eval.json the evaluation table shows (gpt_jax/eval/run.py defines them).
_EVAL_METRICS = {
  "embedded": ("accuracy",),
  "gen": ("accuracy",),
  "mc": ("acc", "acc_norm", "acc_token", "centered"),
  "bpb": ("bits_per_byte", "loss"),
}


def evaluation_section(workdir: str) -> str | None:
  """The evaluation table of <workdir>/eval.json (written by the pipeline after its stages): every model
  on the same tasks, one column each."""
  record = _read_json(os.path.join(workdir, "eval.json"))
  models = (record or {}).get("models") or {}
  if not models:
    return None
  # The pipeline's order (eval.json's keys are sorted); tasks in the order eval_tasks names them.
  order_of = list(entries(workdir))
  names = [s for s in order_of if s in models] + sorted(s for s in models if s not in order_of)
  try:
    from gpt_jax.eval import tasks as eval_tasks

    order = [t.name for t in eval_tasks.parse(record.get("tasks", ""))]
  except Exception:  # noqa: BLE001 - the report must not fail on an unreadable spec
    order = []
  keys: dict[tuple[str, str], dict] = {}
  for stage in names:
    m = models[stage]
    results = m.get("results") or {}
    for task in sorted(results, key=lambda t: (order.index(t) if t in order else len(order), t)):
      r = results[task]
      shown = [k for k in _EVAL_METRICS.get(r.get("kind"), ()) if k in r]
      shown += sorted(k for k in r if k.startswith(("accuracy_", "pass@")))
      size = r.get("n", r.get("documents"))
      label = f"{task} ({size} {'documents' if r.get('kind') == 'bpb' else 'examples'})" if size else task
      for k in shown:
        row = keys.setdefault((task, k), {"task": label, "metric": k})
        row[stage] = float(r[k])
    if m.get("core") is not None:
      keys.setdefault(("core", "core"), {"task": "CORE-like", "metric": "mean centered acc_token"})[stage] = (
        float(m["core"])
      )
  rows = list(keys.values())
  cols = [("task", "task"), ("metric", "metric")] + [(s, s) for s in names]
  seconds = ", ".join(f"{s} {models[s].get('seconds', 0):.0f}s" for s in names)
  return (
    "## Evaluation\n\nEvery model on the same tasks (`eval_tasks` "
    f"= `{record.get('tasks', '')}`; the embedded tasks are the SFT run's held-out prompts, answered "
    "greedily: a base model continues the plain text, the others answer in the chat template). "
    f"Time: {seconds}.\n\n" + _table(rows, cols)
  )


def _front_matter(workdir: str) -> list[str]:
  """Stage times, the data mixture, the tokenizer and the model."""
  parts = []
  timings = _read_json(os.path.join(workdir, "timings.json")) or {}
  if timings:
    rows = [{"stage": k, "seconds": round(v, 1)} for k, v in timings.items()]
    parts.append("## Stage times\n\n" + _table(rows, [("stage", "stage"), ("seconds", "seconds")]))
  pre = os.path.join(workdir, "pretrain")
  summary = _read_json(os.path.join(pre, "data_summary.json"))
  if summary:
    cols = [
      ("source", "source"),
      ("weight", "weight"),
      ("documents", "documents"),
      ("tokens", "tokens"),
      ("share", "share of training tokens"),
      ("epochs", "epochs over the budget"),
    ]
    parts.append("## Data mixture\n\n" + _table(summary["mixture"], cols))
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
  return parts


def _results(workdir: str) -> list[str]:
  """The pretraining, SFT and reward-model figures, then the post-training methods side by side."""
  results = []
  checks = [
    ("pretrain", "eval/loss", "held-out loss"),
    ("pretrain", "eval/bits_per_byte", "bits per byte"),
    ("sft", "eval/loss", "held-out loss"),
    ("sft", "eval/accuracy", "held-out exact-match accuracy"),
    ("rm", "eval/accuracy", "held-out pairwise accuracy"),
    ("rm", "eval/margin", "mean reward margin"),
  ]
  sft_cfg = _read_json(os.path.join(workdir, "sft", "config.json")) or {}
  n_sft = (sft_cfg.get("sft") or {}).get("eval_samples")
  if n_sft is not None:  # SFT's own check during training; the methods table below uses more prompts
    checks[3] = ("sft", "eval/accuracy", f"held-out exact-match accuracy ({n_sft} prompts, last eval)")
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
  parts = []
  if results:
    parts.append(
      "## Results\n\n" + _table(results, [("stage", "stage"), ("metric", "metric"), ("value", "value")])
    )
  methods = methods_table(workdir)
  if methods:
    cols = [
      ("method", "method"),
      ("gold", "held-out gold accuracy (SFT → after)"),
      ("pass", "pass@k (SFT → after)"),
      ("kl", "KL to the reference"),
      ("reward", "held-out reward-model score (normalised)"),
      ("seconds", "seconds"),
    ]
    parts.append(
      "## Post-training methods\n\nEvery method starts from the SFT model and is measured on the same "
      "held-out prompts (the SFT run's held-out tasks, never trained on); the first figure of each pair "
      "is the SFT model's (pass@k is sampled, with each method's own sampler batch, so its SFT figure "
      "differs a little between methods).\n\n" + _table(methods, cols)
    )
  curves = overoptimization(workdir)
  for name, rows in curves.items():
    best = max(rows, key=lambda r: r["gold"])
    parts.append(
      f"- {name}: gold accuracy peaks at {best['gold']:.3f} at iteration {best['iteration']} (KL "
      f"{best['kl']:.2f} nats); the proxy reward goes {rows[0]['proxy']:.3f} → {rows[-1]['proxy']:.3f} while "
      f"gold goes {rows[0]['gold']:.3f} → {rows[-1]['gold']:.3f}.\n"
    )
  return parts


def write(workdir: str, cfg=None, *, log_fn=print, compare: bool = True) -> str:
  """Writes workdir/report.md and its PNGs; returns the report's path."""
  del cfg  # everything is read from the workdir
  parts = [
    f"# gpt_jax pipeline report\n\nWorkdir `{workdir}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
  ]
  parts += _front_matter(workdir)
  parts += _results(workdir)
  evaluation = evaluation_section(workdir)
  if evaluation:
    parts.append(evaluation)
  for fname, title in plot(workdir, workdir):
    parts.append(f"### {title}\n\n![{title}]({fname})\n")
  if compare:
    try:
      rows = compare_answers(workdir)
    except Exception as e:  # noqa: BLE001 - the report must not fail a finished pipeline
      rows = []
      log_fn(f"[report] could not sample the comparison table: {e}")
    if rows:
      names = [k for k in rows[0] if k not in ("prompt", "reference") and not k.endswith("_gold")]
      cols = [("prompt", "held-out prompt"), ("reference", "reference")]
      for s in names:
        cols += [(s, f"{s} answer"), (f"{s}_gold", "gold")]
      parts.append("## The same held-out prompts, answered by each model (greedy)\n\n" + _table(rows, cols))
      for s in names:
        acc = sum(r[f"{s}_gold"] for r in rows) / len(rows)
        parts.append(f"- {s}: {acc:.0%} of these {len(rows)} answered correctly\n")
  path = os.path.join(workdir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(parts))
  os.replace(path + ".tmp", path)
  log_fn(f"[report] {path}")
  return path
