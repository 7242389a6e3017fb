"""Scoring with a reward model: rewards of token sequences in fixed-shape batches, the model of a
reward-model run, and the `score` command.

  python -m gpt_jax score --workdir=RM_DIR --prompt="Add 2 and 3." --response="5"

A reward model reads its head at the eos after "prompt + response" (data/comparisons.py
reward_inputs), as it was trained.
"""

from __future__ import annotations

import os

import jax

from gpt_jax import placed, runs, sharding
from gpt_jax.data import comparisons as comp_data
from gpt_jax.data import jsonl
from gpt_jax.errors import ConfigError, DataError


def make_scorer(model: placed.Model):
  """jitted `scorer(params, batch) -> (B,)` rewards, activations sharded by the rules table."""

  def run(params, batch):
    with sharding.activation_mesh(model.mesh):
      return model.scores(params, batch)

  return jax.jit(run)


def score_sequences(
  model: placed.Model, params, sequences, pad_id: int, *, batch_size: int = 64, scorer=None
) -> list[float]:
  """Rewards of token sequences (each ending with eos), in order.

  Rows are padded to a multiple of 32 tokens (at most model.max_seq_len) and batches to batch_size
  rows, so few shapes compile. DataError names a sequence longer than model.max_seq_len.
  """
  scorer = scorer or make_scorer(model)
  limit = model.cfg.max_seq_len
  for i, s in enumerate(sequences):
    if len(s) > limit:
      raise DataError(
        f"pair {i}: prompt + response + eos is {len(s)} tokens, more than model.max_seq_len={limit}"
      )
  out: list[float] = []
  for lo in range(0, len(sequences), batch_size):
    chunk = list(sequences[lo : lo + batch_size])
    T = min(-(-max(len(s) for s in chunk) // 32) * 32, limit)
    rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # one batch shape: one compile
    out += [
      float(x) for x in jax.device_get(scorer(params, comp_data.reward_batch(rows, T, pad_id)))[: len(chunk)]
    ]
  return out


def load_reward_model(path: str, mesh=None, what: str = "--workdir"):
  """(the run, its placed.Model with head, params, tokenizer) of a reward-model run.

  mesh defaults to all devices on the data axis. CheckpointError when the run is not a reward model."""
  run = runs.open(path, what)
  runs.check_stage(run, ("rm",), what)
  mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  model = placed.Model.build(run.model_config(), mesh, head=True)
  params = run.restore(model.abstract(), item="params")
  return run, model, params, run.tokenizer()


def read_pairs_file(path: str) -> list[tuple]:
  """[(prompt, response)] of a JSONL of {"prompt": text or messages, "response": text}; DataError names file:line."""
  if not os.path.isfile(path):
    raise DataError(f"--pairs_file: {path} does not exist")
  out = []
  for where, row in jsonl.read_jsonl(path):
    for field in ("prompt", "response"):
      if not isinstance(row, dict) or field not in row:
        raise DataError(f'{where}: missing field \'{field}\' (expected {{"prompt", "response"}})')
    out.append(
      (
        comp_data.check_prompt(row["prompt"], where),
        comp_data.check_response(row["response"], where, "response"),
      )
    )
  if not out:
    raise DataError(f"--pairs_file: {path} holds no pairs")
  return out


def score(workdir: str, pairs, *, mesh=None, batch_size: int = 32) -> list[float]:
  """The reward of each (prompt messages or text, response text) pair, read at the eos after the
  rendered conversation (as in training)."""
  _, model, params, tokenizer = load_reward_model(workdir, mesh)
  seqs = [comp_data.response_tokens(tokenizer, p, resp) for p, resp in pairs]
  if not seqs:
    return []
  return score_sequences(model, params, seqs, tokenizer.pad_id, batch_size=min(batch_size, len(seqs)))


def score_cli(
  workdir: str,
  prompt: str | None = None,
  response: str | None = None,
  pairs_file: str | None = None,
  print_fn=print,
) -> list[float]:
  """`python -m gpt_jax score`: prints one reward per pair (one per line) and returns them."""
  if pairs_file and (prompt is not None or response is not None):
    raise ConfigError("--pairs_file: give either --pairs_file or --prompt with --response, not both")
  if pairs_file:
    pairs = read_pairs_file(pairs_file)
  elif prompt is not None and response is not None:
    pairs = [(prompt, response)]
  else:
    raise ConfigError("--prompt/--response: both are required (or give --pairs_file)")
  rewards = score(workdir, pairs)
  for value in rewards:
    print_fn(f"{value:.6f}")
  return rewards
