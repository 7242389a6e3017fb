"""Answering chat prompts in batches and grading the answers: the gold accuracy (greedy) and pass@k
(sampled) that SFT, DPO, the RL stages, the report and `eval` measure on held-out prompts.

A prompt carries its rendered ids, its gold answer (None: not graded) and its kind; answers are
graded by exact match (data/tasks.py grade_text). Every figure is a function of the parameters and a
fixed key alone, so a resumed run reports what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from gpt_jax import sampling
from gpt_jax.data import jsonl
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import DataError


@dataclasses.dataclass
class Prompt:
  ids: list[int]  # the rendered chat, ending with the generation prompt
  answer: str | None  # the gold reply (None: no gold score)
  kind: str
  text: str  # the last user turn, for sample logs


def from_tasks(tasks, tokenizer) -> list[Prompt]:
  """Prompts of embedded tasks (data/tasks.py)."""
  return [
    Prompt(tokenizer.render_chat(t.messages, add_generation_prompt=True)[0], t.answer, t.kind, t.question)
    for t in tasks
  ]


def read_prompts(path: str, tokenizer) -> list[Prompt]:
  """JSONL rows {"messages": [...], "answer"?: str, "kind"?: str}; a trailing assistant turn is dropped
  (an SFT file works as is) and is the gold answer unless "answer" is given. DataError names file:line."""
  out = []
  for where, row in jsonl.read_jsonl(path):
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
      raise DataError(f"{where}: expected {{'messages': [...]}} with at least one message")
    answer = row.get("answer")
    if isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
      answer = answer if answer is not None else msgs[-1].get("content")
      msgs = msgs[:-1]
    if not msgs or not any(isinstance(m, dict) and m.get("role") == "user" for m in msgs):
      raise DataError(f"{where}: the prompt has no user turn")
    try:
      ids = tokenizer.render_chat(msgs, add_generation_prompt=True)[0]
    except DataError as e:
      raise DataError(f"{where}: {e}") from None
    user = [m for m in msgs if m.get("role") == "user"][-1]["content"]
    out.append(Prompt(ids, None if answer is None else str(answer), str(row.get("kind", "chat")), user))
  return out


def reply_text(tokenizer, reply_ids, stop_id: int) -> str:
  """The text of a sampled reply: what comes before the first stop token; ids past the tokenizer (a
  model vocabulary padded beyond it) decode to nothing."""
  ids = [int(t) for t in reply_ids]
  if stop_id in ids:
    ids = ids[: ids.index(stop_id)]
  return tokenizer.decode([t for t in ids if t < tokenizer.vocab_size])


class Answerer:
  """Answers a fixed list of prompts with a model's params, in fixed-shape batches (one compile).

  Prompts that leave fewer than max_new_tokens positions are left out (and counted in `dropped`).
  """

  def __init__(self, model, tokenizer, prompts, *, max_new_tokens: int, batch: int, temperature: float = 0.0):
    self.tokenizer, self.stop = tokenizer, tokenizer.special_id("end_of_turn")
    room = model.cfg.max_seq_len - int(max_new_tokens)
    self.prompts = [p for p in prompts if len(p.ids) <= room]
    self.dropped = len(prompts) - len(self.prompts)
    self.graded = [p for p in self.prompts if p.answer is not None]
    if not self.prompts:
      self.repliers = {}
      return
    P = min(-(-max(len(p.ids) for p in self.prompts) // 16) * 16, room)  # rounded: fewer distinct shapes
    shards = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
    args = dict(
      eos_id=self.stop,
      pad_id=tokenizer.pad_id,
      prompt_len=P,
      batch=min(int(batch), len(self.prompts)),
      mesh=model.mesh,
      params_sharding=model.trunk_shardings,
      shards=shards,
    )
    greedy = sampling.SampleConfig(max_new_tokens=int(max_new_tokens), greedy=True)
    sampled = sampling.SampleConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature or 1.0))
    self.repliers = {
      True: sampling.Replier(model.cfg, model.graphdef, sample_cfg=greedy, **args),
      False: sampling.Replier(model.cfg, model.graphdef, sample_cfg=sampled, **args),
    }

  def answers(self, params, prompts=None, *, greedy: bool = True, key=None) -> list[tuple[list[int], str]]:
    """(reply ids, reply text) per prompt (default: all of this Answerer's)."""
    prompts = self.prompts if prompts is None else prompts
    if not prompts:
      return []
    key = jax.random.key(0) if key is None else key
    replies = self.repliers[greedy](params, [p.ids for p in prompts], key)
    return [(r, reply_text(self.tokenizer, r, self.stop)) for r in replies]

  def accuracy(self, params) -> dict:
    """Greedy exact-match accuracy over the graded prompts: {"accuracy", "accuracy_<kind>"...}."""
    if not self.graded:
      return {}
    answers = self.answers(params, self.graded)
    scores: dict[str, list[float]] = {}
    for p, (_, text) in zip(self.graded, answers):
      scores.setdefault(p.kind, []).append(tasks_lib.grade_text(p.answer, text))
    result = {"accuracy": float(np.mean([x for v in scores.values() for x in v]))}
    if len(scores) > 1:
      result.update({f"accuracy_{k}": float(np.mean(v)) for k, v in sorted(scores.items())})
    return result

  def pass_at_k(self, params, k: int, seed: int = 1) -> dict:
    """k sampled answers per graded prompt: {"pass_at_<k>": share with at least one correct,
    "sample_accuracy": share of correct samples}. The keys are fixed (a function of the params)."""
    if k <= 0 or not self.graded:
      return {}
    flat = [p for p in self.graded for _ in range(k)]
    answers = self.answers(params, flat, greedy=False, key=jax.random.key(seed))
    g_PK = np.asarray([tasks_lib.grade_text(p.answer, t) for p, (_, t) in zip(flat, answers)]).reshape(-1, k)
    return {f"pass_at_{k}": float(g_PK.max(axis=1).mean()), "sample_accuracy": float(g_PK.mean())}
