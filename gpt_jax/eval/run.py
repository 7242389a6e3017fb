"""`python -m gpt_jax eval --workdir=RUN --tasks=...`: evaluate any run directory on shared tasks.

The run (a stage's workdir, a checkpoint in one, or an import) is opened with runs.open, every task is
read, checked and tokenized, and only then is the model placed on the mesh and its checkpoint
restored, so a bad task line, an unknown task or a run without a checkpoint is one line before any
compile. Results go to <workdir>/eval.json (or --out) and a printed table.

Metrics:
  mc   acc (the choice of highest log-likelihood), acc_norm (per character of the choice, as
       lm-evaluation-harness), acc_token (per continuation token, as CORE), centered = (acc_token -
       baseline) / (1 - baseline); the record's "core" is the mean centered accuracy of its mc tasks.
  gen  accuracy (greedy, by the task's grader), accuracy_<kind> for several kinds, pass@1 and pass@n
       with --samples=n.
  bpb  loss (nats per token), bits_per_byte (nats / ln 2 / UTF-8 bytes), over the documents' tokens
       after the prefix token (no eos scored).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from gpt_jax import placed, runs, sharding
from gpt_jax import tokenizers as tok_lib
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.eval import generate, loglik
from gpt_jax.eval import tasks as tasks_lib

EVAL_FILE = "eval.json"
CHAT_MODES = ("auto", "yes", "no")


class Evaluator:
  """Every task of one model shape and tokenizer, tokenized once; `evaluate(params, chat)` runs them
  all with the given params (so several runs of one shape share the compiled functions)."""

  def __init__(
    self,
    model,
    tokenizer,
    tasks,
    *,
    batch: int = 32,
    max_new_tokens: int = 64,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
  ):
    self.model, self.tok, self.tasks = model, tokenizer, tasks
    self.max_new_tokens, self.samples, self.temperature, self.seed = (
      int(max_new_tokens),
      int(samples),
      float(temperature),
      int(seed),
    )
    self.scorer = loglik.Scorer(model, batch=batch)
    self.generator = generate.Generator(model, tokenizer, batch=batch)
    self.prefix = loglik.prefix_id(tokenizer)
    self._prepared = {t.name: self._prepare(t) for t in tasks}

  def _prepare(self, task):
    L = self.model.cfg.max_seq_len
    if task.kind == "mc":
      pairs = [(c.context, tasks_lib.DELIMITER + ch) for c in task.items for ch in c.choices]
      enc = loglik.encode_pairs(self.tok, pairs)
      reqs, k = [], 0
      for c in task.items:
        row = []
        for i, ch in enumerate(c.choices):
          ctx, cont = enc[k]
          k += 1
          if not cont:
            raise DataError(f"{c.where}: choice {i} {ch!r} adds no token after the context"[:200])
          if len(cont) > L:
            raise DataError(f"{c.where}: choice {i} is {len(cont)} tokens, more than model.max_seq_len {L}")
          row.append((ctx + cont, len(cont)))
        reqs.append(row)
      # questions whose context loses its first tokens to fit the model's context
      return reqs, sum(any(len(ids) > L + 1 for ids, _ in row) for row in reqs)
    if task.kind == "bpb":
      return self.tok.encode_batch(task.items), None
    room = L - int(task.max_new_tokens or self.max_new_tokens)
    if room < 1:
      raise ConfigError(
        f"--max_new_tokens: {task.max_new_tokens or self.max_new_tokens} leaves no room for a prompt in model.max_seq_len {L} ({task.name})"
      )
    return None, None

  def evaluate(self, params, chat: bool, log_fn=print) -> dict:
    out = {}
    for task in self.tasks:
      t0 = time.time()
      if task.kind == "mc":
        res = self._mc(params, task)
      elif task.kind == "bpb":
        res = self._bpb(params, task)
      else:
        res, _ = self.generator.evaluate(
          params,
          task,
          chat,
          max_new_tokens=self.max_new_tokens,
          samples=self.samples,
          temperature=self.temperature,
          seed=self.seed,
        )
      res = {
        "kind": task.kind if task.spec.kind != "embedded" else "embedded",
        **res,
        "seconds": round(time.time() - t0, 2),
      }
      out[task.name] = res
      log_fn(
        f"[eval] {task.name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in res.items() if k not in ("kind",))
      )
    return out

  def mc_logliks(self, params, task) -> list[list[tuple[float, bool]]]:
    """Per question, per choice: (log-likelihood of " " + choice after the context, is greedy)."""
    reqs, _ = self._prepared[task.name]
    flat = self.scorer.score(params, [r for row in reqs for r in row])
    out, k = [], 0
    for row in reqs:
      out.append(flat[k : k + len(row)])
      k += len(row)
    return out

  def _mc(self, params, task) -> dict:
    reqs, truncated = self._prepared[task.name]
    lls = self.mc_logliks(params, task)
    acc, norm, tok = [], [], []
    for c, row, scored in zip(task.items, reqs, lls):
      lp = np.asarray([s[0] for s in scored])
      chars = np.asarray([float(len(ch)) for ch in c.choices])
      ntok = np.asarray([float(n) for _, n in row])
      acc.append(float(np.argmax(lp) == c.label))
      norm.append(float(np.argmax(lp / chars) == c.label))
      tok.append(float(np.argmax(lp / ntok) == c.label))
    b = float(task.baseline)
    a_tok = float(np.mean(tok))
    return {
      "n": len(acc),
      "acc": float(np.mean(acc)),
      "acc_norm": float(np.mean(norm)),
      "acc_token": a_tok,
      "baseline": b,
      "centered": (a_tok - b) / (1.0 - b),
      "truncated": int(truncated or 0),
    }

  def _bpb(self, params, task) -> dict:
    ids, _ = self._prepared[task.name]
    lps = self.scorer.rolling(params, ids, self.prefix)
    nll = -float(sum(lps))
    n_tok = sum(len(i) for i in ids)
    n_bytes = sum(len(d.encode("utf-8")) for d in task.items)
    return {
      "documents": len(ids),
      "tokens": int(n_tok),
      "bytes": int(n_bytes),
      "loss": nll / max(n_tok, 1),
      "bits_per_byte": loglik.bits_per_byte(nll, n_bytes),
    }


def _fmt(v) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def core(results: dict) -> float | None:
  """The mean centered accuracy of the mc tasks of a results dict (None without any)."""
  c = [r["centered"] for r in results.values() if r.get("kind") == "mc"]
  return float(np.mean(c)) if c else None


def table(results: dict) -> str:
  """A plain-text table: task, metric, value."""
  rows = [("task", "metric", "value")]
  for name, r in results.items():
    for k, v in r.items():
      if k in ("kind", "seconds"):
        continue
      rows.append((name, k, _fmt(v)))
  c = core(results)
  if c is not None:
    rows.append(("core", "mean centered acc_token", _fmt(c)))
  w = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join(x.ljust(w[i]) for i, x in enumerate(r)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * x for x in w))
  return "\n".join(lines)


def parse_mesh(text: str) -> dict:
  parts = str(text).split(",")
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise ConfigError(f"--mesh: expected DATA,FSDP,TENSOR sizes (one may be -1), got {text!r}")
  return dict(zip(sharding.MESH_AXES, sizes))


def is_chat(run, mode: str) -> bool:
  if mode not in CHAT_MODES:
    raise ConfigError(f"--chat: expected one of {', '.join(CHAT_MODES)}, got {mode!r}")
  return run.is_chat if mode == "auto" else mode == "yes"


def build(run, mesh, tasks, **opts):
  """(placed model, tokenizer, Evaluator) of a run: tokenizer and tasks checked, nothing compiled."""
  tok = run.tokenizer()
  cfg = run.model_config()
  tok_lib.check_vocab(tok, cfg.vocab_size)
  model = placed.Model.build(cfg, mesh)
  return model, tok, Evaluator(model, tok, tasks, **opts)


def evaluate_run(
  workdir: str,
  tasks: str,
  *,
  out: str | None = None,
  batch: int = 32,
  max_new_tokens: int = 64,
  samples: int = 0,
  temperature: float = 1.0,
  seed: int = 0,
  mesh: str = "-1,1,1",
  chat: str = "auto",
  log_fn=print,
) -> dict:
  """Evaluates the run at `workdir` on `tasks` (see gpt_jax/eval/tasks.py); writes and returns the record."""
  t0 = time.time()
  specs = tasks_lib.parse(tasks)
  if int(batch) < 1 or int(max_new_tokens) < 1 or int(samples) < 0 or not float(temperature) > 0:
    raise ConfigError(
      f"--batch, --max_new_tokens must be >= 1, --samples >= 0 and --temperature > 0; got "
      f"{batch}, {max_new_tokens}, {samples}, {temperature}"
    )
  mesh_cfg = parse_mesh(mesh)
  run = runs.open(workdir, "--workdir")
  use_chat = is_chat(run, chat)
  space, task_seed = tasks_lib.task_space(run.config)
  loaded = tasks_lib.load(specs, space=space, seed=task_seed, data_cfg=run.config.get("data"))
  model, _, ev = build(
    run,
    sharding.make_mesh(mesh_cfg),
    loaded,
    batch=batch,
    max_new_tokens=max_new_tokens,
    samples=samples,
    temperature=temperature,
    seed=seed,
  )
  params = run.restore(model.abstract())
  results = ev.evaluate(params, use_chat, log_fn=log_fn)
  record = {
    "run": {"workdir": run.workdir, "stage": run.stage, "step": run.step, "checkpoint": run.checkpoint},
    "tasks": str(tasks),
    "chat": use_chat,
    "results": results,
    "core": core(results),
    "seconds": round(time.time() - t0, 1),
  }
  path = out or os.path.join(run.workdir, EVAL_FILE)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  runs.write_json(path, record)
  log_fn(table(results))
  log_fn(f"[eval] {path}")
  return record


# --- the pipeline's evaluation table --------------------------------------------------------------

# The models of a pipeline workdir that the table compares (a reward model's head is no language model).
PIPELINE_MODELS = tuple(s for s in runs.MODEL_ITEM if s not in ("rm", runs.IMPORT))


def check_tasks(text: str, cfg=None) -> None:
  """The eval_tasks of a pipeline config checked before its first stage: the syntax, and with the
  pipeline config `cfg` every task read as the evaluation will (its files, the SFT stage's task space,
  the pretraining stage's data sources). Errors name eval_tasks."""
  if not str(text).strip():
    return
  try:
    specs = tasks_lib.parse(text)
    if cfg is not None:
      from gpt_jax import config as config_lib

      d = config_lib.to_dict(cfg)
      space, seed = tasks_lib.task_space(d.get("sft") or {})
      tasks_lib.load(specs, space=space, seed=seed, data_cfg=(d.get("pretrain") or {}).get("data"))
  except (ConfigError, DataError) as e:
    raise type(e)(f"eval_tasks: {str(e).removeprefix('--tasks: ')}") from None


def evaluate_pipeline(
  workdir: str, tasks: str, *, names=PIPELINE_MODELS, batch: int = 64, log_fn=print
) -> dict | None:
  """Evaluates every finished model of a pipeline workdir (base, SFT, each RL stage) on the same
  tasks and writes <workdir>/eval.json: {"tasks", "models": {stage: {"step", "checkpoint", "chat",
  "results", "core", "seconds"}}}. The embedded prompts are the SFT run's held-out ones for every
  model, and bpb sources are the pretraining run's. A model whose checkpoint and tasks are those of
  the existing eval.json (the same spec, and the same loaded items by their digest) is not evaluated
  again."""
  if not str(tasks).strip():
    return None
  specs = tasks_lib.parse(tasks)
  found = {}
  for name in names:
    d = os.path.join(workdir, name)
    if os.path.exists(os.path.join(d, "DONE")) and runs.has_checkpoint(d):
      found[name] = runs.open(d, f"pipeline {name}")
  if not found:
    return None
  ref = found.get("sft") or next(iter(found.values()))
  space, task_seed = tasks_lib.task_space(ref.config)
  data_run = found.get("pretrain")
  loaded = tasks_lib.load(
    specs, space=space, seed=task_seed, data_cfg=(data_run.config.get("data") if data_run else None)
  )
  # What was loaded, not only the spec string: edited task files or documents are evaluated again.
  digest = hashlib.sha256(repr([(t.spec, t.kind, t.items) for t in loaded]).encode()).hexdigest()
  path = os.path.join(workdir, EVAL_FILE)
  old = {}
  if os.path.isfile(path):
    try:
      with open(path) as f:
        prev = json.load(f)
      if prev.get("tasks") == str(tasks) and prev.get("tasks_sha256") == digest:
        old = prev.get("models") or {}
    except (OSError, ValueError):
      old = {}
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  evaluators: dict = {}
  models = {}
  for stage, run in found.items():
    prev = old.get(stage) or {}
    if prev.get("step") == run.step and prev.get("checkpoint") == run.checkpoint and "results" in prev:
      models[stage] = prev
      continue
    t0 = time.time()
    key = (run.model_config(), tok_lib.load(run.workdir).sha256())
    if key not in evaluators:
      evaluators[key] = build(run, mesh, loaded, batch=batch)
    model, _, ev = evaluators[key]
    results = ev.evaluate(run.restore(model.abstract()), run.is_chat, log_fn=lambda *a: None)
    models[stage] = {
      "step": run.step,
      "checkpoint": run.checkpoint,
      "chat": run.is_chat,
      "results": results,
      "core": core(results),
      "seconds": round(time.time() - t0, 1),
    }
    log_fn(f"[eval] {stage}: {time.time() - t0:.1f}s")
  record = {"tasks": str(tasks), "tasks_sha256": digest, "models": models}
  runs.write_json(path, record)
  return record
