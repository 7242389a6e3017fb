"""Generative tasks: prompts answered in fixed-shape batches (sampling.Replier), replies graded.

A finetuned model is prompted in its chat template and stops at its end of turn; a base model
continues the plain text after the prefix token, stops at eos, and its reply is cut at the first
`until` string. Graders: "exact" (data/tasks.py grade_text: equal after stripping whitespace) and
"number" (the final number of the reply equals the final number of the answer, GSM8K style: after
the last "####" when there is one, else the last number in the text; commas and a trailing period
ignored). Greedy answers give the accuracy; n sampled answers per prompt give pass@1 and pass@n
(the unbiased estimator of Chen et al. 2021 with n samples).
"""

from __future__ import annotations

import jax
import numpy as np

from gpt_jax import grading, sampling
from gpt_jax.eval import loglik
from gpt_jax.eval import tasks as eval_tasks

PROMPT_MULTIPLE = 16  # prompt lengths are rounded up to this: fewer distinct sampler shapes


def cut(text: str, until) -> str:
  """`text` up to the first of the `until` strings."""
  for u in until or ():
    i = text.find(u)
    if i >= 0:
      text = text[:i]
  return text


def pass_at_k(n: int, c: int, k: int) -> float:
  """The chance that at least one of k of n samples (c of them correct) is correct."""
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class Generator:
  """Answers the questions of generative tasks with one model shape; the samplers (one per prompt
  length, reply length and greedy/sampled) are built once and reused for every params passed."""

  def __init__(self, model, tokenizer, *, batch: int):
    self.model, self.tok, self.batch = model, tokenizer, int(batch)
    self._repliers: dict = {}

  def prompt_ids(self, q: eval_tasks.Question, chat: bool) -> list[int]:
    if chat:
      return self.tok.render_chat(q.messages, add_generation_prompt=True)[0]
    return [loglik.prefix_id(self.tok), *self.tok.encode(q.text)]

  def stop_id(self, chat: bool) -> int:
    return int(self.tok.special_id("end_of_turn") if chat else self.tok.eos_id)

  def plan(self, questions, chat: bool, max_new_tokens: int) -> tuple[list[list[int]], int, int]:
    """(prompt ids, padded prompt length P, how many prompts lost their first tokens to fit P)."""
    room = self.model.cfg.max_seq_len - int(max_new_tokens)
    ids = [self.prompt_ids(q, chat) for q in questions]
    longest = max(len(i) for i in ids)
    P = min(-(-longest // PROMPT_MULTIPLE) * PROMPT_MULTIPLE, room)
    truncated = sum(len(i) > P for i in ids)
    return [i[-P:] for i in ids], P, truncated

  def _replier(self, P: int, N: int, stop: int, temperature: float | None):
    key = (P, N, stop, temperature)
    if key not in self._repliers:
      sample_cfg = (
        sampling.SampleConfig(max_new_tokens=N, greedy=True)
        if temperature is None
        else sampling.SampleConfig(max_new_tokens=N, temperature=float(temperature))
      )
      m = self.model
      self._repliers[key] = sampling.Replier(
        m.cfg,
        m.graphdef,
        eos_id=stop,
        pad_id=self.tok.pad_id,
        prompt_len=P,
        batch=self.batch,
        sample_cfg=sample_cfg,
        mesh=m.mesh,
        params_sharding=m.trunk_shardings,
        shards=m.mesh.shape["data"] * m.mesh.shape["fsdp"],
      )
    return self._repliers[key]

  def replies(self, params, task, chat: bool, *, max_new_tokens: int, temperature=None, copies=1, seed=0):
    """(reply texts, one list per question with `copies` replies each; prompts truncated)."""
    qs = task.items
    ids, P, truncated = self.plan(qs, chat, max_new_tokens)
    stop = self.stop_id(chat)
    replier = self._replier(P, int(max_new_tokens), stop, temperature)
    flat = [p for p in ids for _ in range(copies)]
    raw = replier(params, flat, jax.random.key(seed))
    texts = []
    for i, q in enumerate(qs):
      until = q.until if q.until is not None else (() if chat else eval_tasks.BASE_UNTIL)
      texts.append(
        [cut(grading.reply_text(self.tok, r, stop), until) for r in raw[i * copies : (i + 1) * copies]]
      )
    return texts, truncated

  def evaluate(
    self, params, task, chat: bool, *, max_new_tokens: int, samples: int = 0, temperature=1.0, seed=0
  ):
    """{"accuracy", "accuracy_<kind>"..., "n", "truncated"[, "pass@1", "pass@<samples>"]} and the
    greedy replies."""
    N = int(task.max_new_tokens or max_new_tokens)
    greedy, truncated = self.replies(params, task, chat, max_new_tokens=N)
    scores: dict[str, list[float]] = {}
    for q, (reply,) in zip(task.items, greedy):
      scores.setdefault(q.kind, []).append(eval_tasks.grade(task.grader, q.answer, reply))
    every = [x for v in scores.values() for x in v]
    out = {"accuracy": float(np.mean(every)), "n": len(every), "truncated": int(truncated)}
    if len(scores) > 1:
      out.update({f"accuracy_{k}": float(np.mean(v)) for k, v in sorted(scores.items())})
    if samples:
      sampled, _ = self.replies(
        params, task, chat, max_new_tokens=N, temperature=float(temperature), copies=int(samples), seed=seed
      )
      correct = [
        sum(eval_tasks.grade(task.grader, q.answer, r) for r in rs) for q, rs in zip(task.items, sampled)
      ]
      n = int(samples)
      out["pass@1"] = float(np.mean([pass_at_k(n, int(c), 1) for c in correct]))
      out[f"pass@{n}"] = float(np.mean([pass_at_k(n, int(c), n) for c in correct]))
    return out, [r[0] for r in greedy]
