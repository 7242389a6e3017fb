"""Reward-model data: pairwise comparisons in JSONL, rendered with the chat template, and a loader of
comparison batches that keeps every pair of one prompt in the same batch.

A JSONL line is one of
  {"prompt": P, "chosen": R, "rejected": R, "margin": 0.5 (optional)}
  {"prompt": P, "ranking": [R_best, ..., R_worst]}          (k-way: all k(k-1)/2 pairs, as InstructGPT)
where P is a text (one user turn) or a list of {"role", "content"} messages, and a response R is a
text, an {"role": "assistant", "content"} message, or a list holding that one message.
A response is scored at the end-of-text token appended after its rendered conversation:
  render_chat(prompt + [assistant: R]) + [eos]   -- the reward head reads the hidden state of that eos.

Comparison batch (every array's leading axis is rows, so the trainer shards them all alike):
  inputs, positions, segment_ids  int32   (B, T)  right-padded; segment_ids 1 on tokens, 0 on padding
  end_index                       int32   (B, 1)  index of each row's final (eos) token
  is_chosen                       int32   (B, 1)  1 on chosen rows, 0 on rejected / padding rows
  pair_mask                       float32 (B, 1)  1 on both rows of a real pair, 0 on padding pairs
  margin                          float32 (B, 1)  the pair's margin (0 when the data gives none)
  group                           int32   (B, 1)  the prompt each pair came from (-1 on padding)
  response_start                  int32   (B, 1)  index of the response's first token (after the prompt)
  and one float32 (B, 1) column per entry of EncodedPairs.row_values (e.g. DPO's reference log-probs)
Rows 2i (chosen) and 2i+1 (rejected) form pair i, so one forward pass scores both. train.global_batch
counts ROWS (= 2 x pairs). The per-row columns are (B, 1), not (B,), because the trainer gives every
batch key the same 2-d row sharding.

Legend: B rows, T time (seq_len), N pairs, G groups (prompts).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from gpt_jax.data import batch as batch_lib
from gpt_jax.data import jsonl
from gpt_jax.data import sft as sft_data
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.tokenizers.base import CHAT_ROLES, Tokenizer

ROW_KEYS = ("end_index", "is_chosen", "pair_mask", "margin", "group", "response_start")
KEYS = ("inputs", "positions", "segment_ids", *ROW_KEYS)


@dataclasses.dataclass
class Comparison:
  """One preference pair; pairs expanded from one k-way ranking share `group`."""

  prompt: list[dict]
  chosen: str
  rejected: str
  group: int
  margin: float = 0.0
  kind: str = ""  # optional labels of the record ("kind", "reason"): held-out accuracy is broken down by them
  reason: str = ""
  where: str = ""


# --- reading ------------------------------------------------------------------------------------


def check_prompt(prompt, where: str) -> list[dict]:
  """The prompt as [{"role", "content"}]: a text becomes one user turn. DataError naming `where`."""
  if isinstance(prompt, str):
    if not prompt.strip():
      raise DataError(f"{where}: 'prompt' is empty")
    return [{"role": "user", "content": prompt}]
  if not isinstance(prompt, list) or not prompt:
    raise DataError(
      f"{where}: 'prompt' must be a text or a non-empty list of messages, got {type(prompt).__name__}"
    )
  out = []
  for i, m in enumerate(prompt):
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
      raise DataError(
        f"{where}: prompt message {i} must be {{role in {CHAT_ROLES}, content: text}}, got {m!r}"
      )
    out.append({"role": m["role"], "content": m["content"]})
  return out


def check_response(resp, where: str, field: str) -> str:
  """The response text of a text / assistant message / [assistant message]; DataError naming the field."""
  if isinstance(resp, list) and len(resp) == 1:
    resp = resp[0]
  if isinstance(resp, dict):
    if resp.get("role", "assistant") != "assistant":
      raise DataError(f"{where}: '{field}' message has role {resp.get('role')!r}; expected 'assistant'")
    resp = resp.get("content")
  if not isinstance(resp, str):
    raise DataError(f"{where}: '{field}' must be a text or one assistant message, got {type(resp).__name__}")
  if not resp.strip():
    raise DataError(f"{where}: '{field}' is empty")
  return resp


def parse_line(row, where: str, group: int) -> list[Comparison]:
  """The pairs of one JSONL record (see the module docstring); DataError naming `where` and the field."""
  if not isinstance(row, dict):
    raise DataError(
      f"{where}: expected an object with prompt and chosen/rejected (or ranking), got {type(row).__name__}"
    )
  if "prompt" not in row:
    raise DataError(f"{where}: missing field 'prompt'")
  prompt = check_prompt(row["prompt"], where)
  kind, reason = str(row.get("kind", "")), str(row.get("reason", ""))
  if "ranking" in row:
    ranking = row["ranking"]
    if not isinstance(ranking, list) or len(ranking) < 2:
      raise DataError(f"{where}: 'ranking' must list at least 2 responses, best first")
    texts = [check_response(r, where, f"ranking[{i}]") for i, r in enumerate(ranking)]
    for i in range(len(texts)):
      for j in range(i + 1, len(texts)):
        if texts[i] == texts[j]:
          raise DataError(
            f"{where}: ranking[{i}] and ranking[{j}] are identical; a ranking must order distinct responses"
          )
    # All k(k-1)/2 ordered pairs, better first (InstructGPT's expansion of a k-way ranking).
    return [
      Comparison(prompt, texts[i], texts[j], group, 0.0, kind, reason, where)
      for i in range(len(texts))
      for j in range(i + 1, len(texts))
    ]
  for field in ("chosen", "rejected"):
    if field not in row:
      raise DataError(
        f"{where}: missing field '{field}' (expected prompt, chosen, rejected; or prompt, ranking)"
      )
  chosen = check_response(row["chosen"], where, "chosen")
  rejected = check_response(row["rejected"], where, "rejected")
  if chosen == rejected:
    raise DataError(f"{where}: chosen and rejected are identical; a comparison needs two different responses")
  margin = row.get("margin", 0.0)
  if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not np.isfinite(margin):
    raise DataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
  return [Comparison(prompt, chosen, rejected, group, float(margin), kind, reason, where)]


def read_comparisons(path: str) -> list[Comparison]:
  """Every pair of a JSONL file (blank lines skipped); each line is one group. DataError names file:line."""
  if not os.path.isfile(path):
    raise DataError(f"comparisons file {path} does not exist")
  out: list[Comparison] = []
  group = 0
  for where, row in jsonl.read_jsonl(path):
    out += parse_line(row, where, group)
    group += 1
  if not out:
    raise DataError(f"comparisons file {path} holds no comparisons")
  return out


def hash_split(comps: Sequence[Comparison], eval_fraction: float) -> tuple[list, list]:
  """(train, eval) by a hash of the prompt, so a held-out prompt (and all its pairs) never trains."""
  train, held = [], []
  for c in comps:
    key = json.dumps(c.prompt, sort_keys=True, ensure_ascii=False)
    (held if tasks_lib.hash_fraction(key) < eval_fraction else train).append(c)
  return train, held


# --- rendering ----------------------------------------------------------------------------------


def response_tokens(tokenizer: Tokenizer, prompt: list[dict] | str, response: str) -> list[int]:
  """The ids the reward model reads: render_chat(prompt + [assistant: response]) + [eos]."""
  messages = check_prompt(prompt, "prompt") if isinstance(prompt, str) else prompt
  ids, _ = tokenizer.render_chat([*messages, {"role": "assistant", "content": response}])
  return ids + [tokenizer.eos_id]


def reward_inputs(tokenizer: Tokenizer, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[int]:
  """The same sequence from ids: a prompt rendered with add_generation_prompt=True, the generated
  response tokens (up to and including <|end_of_turn|> when produced, no padding), then eos."""
  return [int(t) for t in prompt_ids] + [int(t) for t in response_ids] + [tokenizer.eos_id]


def reward_batch(sequences: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads sequences into (B, seq_len) inputs / positions / segment_ids and end_index (B,).

  Each sequence's reward is read at end_index = len - 1 (its eos). DataError if one is empty or longer.
  """
  B, T = len(sequences), int(seq_len)
  inputs = np.full((B, T), pad_id, np.int32)
  segment_ids = np.zeros((B, T), np.int32)
  end_index = np.zeros((B,), np.int32)
  for b, seq in enumerate(sequences):
    n = len(seq)
    if not 0 < n <= T:
      raise DataError(f"reward sequence {b}: has {n} tokens; expected 1..{T} (the model's seq_len)")
    inputs[b, :n] = np.asarray(seq, np.int32)
    segment_ids[b, :n] = 1
    end_index[b] = n - 1
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  return {"inputs": inputs, "positions": positions, "segment_ids": segment_ids, "end_index": end_index}


@dataclasses.dataclass
class EncodedPairs:
  """Rendered pairs: pair i is (chosen[i], rejected[i]) token arrays, each ending with eos."""

  chosen: list[np.ndarray]
  rejected: list[np.ndarray]
  margin: np.ndarray  # float32 (N,)
  group: np.ndarray  # int64 (N,): pairs of one prompt share a group
  where: list[str]  # file:line of each pair (for error messages)
  labels: list[str]  # "kind/reason" of each pair ('' when the data has none)
  stats: dict  # pairs, groups, dropped_too_long, tokens
  response_start: np.ndarray  # int32 (N,): the prompt's length, where both responses start
  row_values: dict = dataclasses.field(default_factory=dict)  # name -> float32 (N, 2) [chosen, rejected]

  def keys(self) -> tuple[str, ...]:
    """The keys of this data's batches."""
    return (*KEYS, *self.row_values)

  def __len__(self) -> int:
    return len(self.chosen)


def encode(comps: Sequence[Comparison], tokenizer: Tokenizer, seq_len: int, name: str) -> EncodedPairs:
  """Renders every pair; a pair with a side longer than seq_len tokens is dropped and counted (never cut:
  the reward is read at the final token, which a cut would remove). DataError when nothing is left."""
  chosen, rejected, margin, group, where, labels, starts = [], [], [], [], [], [], []
  dropped = 0
  cache: dict[tuple, np.ndarray] = {}  # k-way rankings render each response once

  def render(prompt, resp):
    key = (json.dumps(prompt, sort_keys=True), resp)
    if key not in cache:
      cache[key] = np.asarray(response_tokens(tokenizer, prompt, resp), np.int32)
    return cache[key]

  for c in comps:
    a, b = render(c.prompt, c.chosen), render(c.prompt, c.rejected)
    if max(len(a), len(b)) > seq_len:
      dropped += 1
      continue
    chosen.append(a)
    rejected.append(b)
    starts.append(len(tokenizer.render_chat(c.prompt, add_generation_prompt=True)[0]))
    margin.append(c.margin)
    group.append(c.group)
    where.append(c.where)
    labels.append("/".join(x for x in (c.kind, c.reason) if x))
  if not chosen:
    raise DataError(
      f"{name}: all {len(comps)} pairs have a response longer than seq_len = {seq_len} tokens "
      "(prompt + response + eos); raise train.seq_len"
    )
  stats = {
    "pairs": len(chosen),
    "groups": len(set(group)),
    "dropped_too_long": dropped,
    "tokens": int(sum(len(x) for x in chosen) + sum(len(x) for x in rejected)),
  }
  return EncodedPairs(
    chosen,
    rejected,
    np.asarray(margin, np.float32),
    np.asarray(group, np.int64),
    where,
    labels,
    stats,
    np.asarray(starts, np.int32),
  )


# --- batches ------------------------------------------------------------------------------------


def pairs_to_batch(
  enc: EncodedPairs, pairs: Sequence[int], n_pairs: int, seq_len: int
) -> dict[str, np.ndarray]:
  """The comparison batch of `pairs` (indices), padded with empty pairs to n_pairs: (2 n_pairs, ...) arrays."""
  B, T = 2 * int(n_pairs), int(seq_len)
  seqs = []
  for i in pairs:
    seqs += [enc.chosen[i], enc.rejected[i]]
  out = {
    "inputs": np.zeros((B, T), np.int32),
    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
    "segment_ids": np.zeros((B, T), np.int32),
    "end_index": np.zeros((B, 1), np.int32),
    "is_chosen": np.zeros((B, 1), np.int32),
    "pair_mask": np.zeros((B, 1), np.float32),
    "margin": np.zeros((B, 1), np.float32),
    "group": np.full((B, 1), -1, np.int32),
    "response_start": np.zeros((B, 1), np.int32),
    **{k: np.zeros((B, 1), np.float32) for k in enc.row_values},
  }
  for r, seq in enumerate(seqs):
    n = len(seq)
    out["inputs"][r, :n] = seq
    out["segment_ids"][r, :n] = 1
    out["end_index"][r, 0] = n - 1
  n = 2 * len(pairs)
  out["is_chosen"][0:n:2, 0] = 1
  out["pair_mask"][:n, 0] = 1.0
  out["margin"][:n, 0] = np.repeat(enc.margin[list(pairs)], 2) if len(pairs) else 0.0
  out["group"][:n, 0] = np.repeat(enc.group[list(pairs)], 2) if len(pairs) else -1
  if len(pairs):
    out["response_start"][:n, 0] = np.repeat(enc.response_start[list(pairs)], 2)
    for k, v in enc.row_values.items():
      out[k][:n, 0] = v[list(pairs)].reshape(-1)  # rows 2i, 2i+1: pair i's chosen, rejected
  return out


def interleave_for_accum(batch: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
  """Reorders rows so that the train step's microbatch split (microbatch a = rows a, a+n, a+2n, ...,
  see step._microbatches) hands microbatch a the a-th contiguous chunk of pairs, pairs intact."""
  n = int(grad_accum)
  if n == 1:
    return batch
  return {
    k: v.reshape((n, v.shape[0] // n) + v.shape[1:]).swapaxes(0, 1).reshape(v.shape) for k, v in batch.items()
  }


class ComparisonLoader(batch_lib.EpochIndexLoader):
  """Iterator of comparison batches (dict of jax.Arrays, see the module docstring); state {"epoch", "index"}.

  Each epoch shuffles the prompts (groups) with (seed, epoch) and packs them first fit into batches of
  global_batch // 2 pairs, so all pairs of one prompt land in one batch; a batch's free slots are
  padding pairs (pair_mask 0). The sequence is a pure function of (seed, epoch, index): exact resume.
  With repeat=False (eval) iteration stops after one pass.
  """

  name = "comparison loader"

  def __init__(
    self,
    enc: EncodedPairs,
    *,
    global_batch: int,
    seq_len: int,
    sharding,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    grad_accum: int = 1,
  ):
    if global_batch <= 0 or global_batch % (2 * grad_accum):
      raise ConfigError(
        f"train.global_batch: {global_batch} rows must be a positive multiple of 2 x train.grad_accum = "
        f"{2 * grad_accum} (rows 2i, 2i+1 are the chosen and rejected side of pair i)"
      )
    self.enc, self.T, self.n_pairs = enc, int(seq_len), int(global_batch) // 2
    self.sharding, self.seed = sharding, int(seed)
    self.shuffle, self.repeat, self.grad_accum = bool(shuffle), bool(repeat), int(grad_accum)
    self._groups: dict[int, list[int]] = {}
    for i, g in enumerate(enc.group.tolist()):
      self._groups.setdefault(g, []).append(i)
    self._group_ids = list(self._groups)
    biggest = max(self._group_ids, key=lambda g: len(self._groups[g]))
    if len(self._groups[biggest]) > self.n_pairs:
      where = enc.where[self._groups[biggest][0]]
      raise ConfigError(
        f"train.global_batch: {global_batch} rows hold {self.n_pairs} pairs, but the ranking at {where} expands "
        f"to {len(self._groups[biggest])} pairs that must share a batch; raise train.global_batch"
      )
    self._epoch, self._index = 0, 0
    self._cache: tuple[int, list] | None = None

  def batches(self, epoch: int) -> list[list[int]]:
    """The pair indices of every batch of one epoch (cached for the current epoch)."""
    if self._cache is None or self._cache[0] != epoch:
      n = len(self._group_ids)
      order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      groups = [self._groups[self._group_ids[i]] for i in order]
      packed = sft_data.first_fit([len(g) for g in groups], self.n_pairs)
      self._cache = (epoch, [[p for j in b for p in groups[j]] for b in packed])
    return self._cache[1]

  def host_batch(self) -> dict[str, np.ndarray]:
    """The next batch as numpy arrays; advances the position. StopIteration after a pass without repeat."""
    batches = self.batches(self._epoch)
    if self._index >= len(batches):
      if not self.repeat:
        raise StopIteration
      self._epoch, self._index = self._epoch + 1, 0
      batches = self.batches(self._epoch)
    pairs = batches[self._index]
    self._index += 1
    if self.repeat and self._index >= len(batches):
      self._epoch, self._index = self._epoch + 1, 0
    batch = pairs_to_batch(self.enc, pairs, self.n_pairs, self.T)
    return interleave_for_accum(batch, self.grad_accum)


# --- the data of a stage ------------------------------------------------------------------------------


def load_splits(section, tasks_cfg, workdir: str, name: str, log_fn, sampled_pairs=None) -> tuple[list, list]:
  """(train, eval) comparisons of a stage section (data_path, eval_path, eval_fraction,
  rambling_fraction): the configured files, or the embedded task comparisons (data/tasks.py, drawn
  with the `tasks` section) written once into <workdir>/data/ (a resumed run reads what the first run
  wrote). Held-out prompts never train.

  sampled_pairs(tasks, split) -> rows adds more pairs to a split's embedded file (the reward model's
  pairs of the SFT model's own mistakes); every process calls it (it may sample: a collective),
  process 0 writes."""
  import jax

  from gpt_jax import distributed

  if section.data_path:
    train = read_comparisons(section.data_path)
    if section.eval_path:
      return train, read_comparisons(section.eval_path)
    train, held = hash_split(train, float(section.eval_fraction))
    if not train or not held:
      raise DataError(
        f"{name}.data_path: {section.data_path} is too small to hold out {name}.eval_fraction="
        f"{section.eval_fraction}; give {name}.eval_path"
      )
    return train, held
  spec, data_dir = tasks_lib.spec_from_config(tasks_cfg), os.path.join(workdir, "data")
  splits = (
    ("train", int(tasks_cfg.train), int(tasks_cfg.seed)),
    ("eval", int(tasks_cfg.eval), int(tasks_cfg.seed) + 1),
  )
  missing = {split for split, *_ in splits if not os.path.isfile(os.path.join(data_dir, f"{split}.jsonl"))}
  distributed.barrier(f"gpt_jax_{name}_comparisons_checked")  # every process looked before process 0 writes
  for split, n, seed in splits:
    if split not in missing:
      continue
    tasks = tasks_lib.make_tasks(split, n, seed, spec)
    rows = tasks_lib.comparisons(tasks, seed, float(section.rambling_fraction))
    sampled = sampled_pairs(tasks, split) if sampled_pairs else []
    if jax.process_index() == 0:
      path = os.path.join(data_dir, f"{split}.jsonl")
      jsonl.write_jsonl(path, rows + sampled)
      extra = f" + {len(sampled)} of the SFT model's mistakes" if sampled else ""
      log_fn(f"[{name}] wrote {n} {split} comparisons ({', '.join(spec.kinds)}){extra} -> {path}")
  distributed.barrier(f"gpt_jax_{name}_comparisons_written")
  return tuple(read_comparisons(os.path.join(data_dir, f"{s}.jsonl")) for s in ("train", "eval"))
