"""Log-likelihood of token continuations, batched and length-bucketed over a model placed on a mesh.

A request is (ids, n): the log-probability of the last n tokens of `ids` given the ones before. Rows
are sorted by length, cut into batches of a fixed number of rows, and each batch is right-padded to
a bucket length (16, 32, 64, ... up to the model's max_seq_len), so the jitted scorer compiles once per
bucket, never per example. A causal model never attends to the right padding, so no mask is needed
beyond the scored positions. The output head runs over time chunks (the logits of a whole batch of a
50k vocabulary are never held at once); log-softmax is taken in float32.

Text is tokenized the way lm-evaluation-harness does for causal models (encode_pair): the context's
trailing whitespace moves to the continuation, the continuation's tokens are those of
encode(context + continuation) past the context's, and the sequence starts with the model's document
prefix token (prefix_id). Sequences longer than the model's context keep their last max_seq_len + 1
tokens. Documents longer than it are scored in rolling windows: every token is predicted exactly
once, each window with as much preceding text as fits (rolling_requests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import model as model_lib
from gpt_jax import sharding
from gpt_jax.data import batch as batch_lib

MIN_BUCKET = 16


def prefix_id(tokenizer) -> int:
  """The token a scored text starts after: an imported model's bos (GPT-2's is its <|endoftext|>); for
  the project's tokenizer eos, the separator every pretraining document follows."""
  return int(tokenizer.bos_id if getattr(tokenizer, "kind", "") == "hf" else tokenizer.eos_id)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
  """(context ids with the prefix token first, continuation ids) of each (context, continuation)."""
  prefix = prefix_id(tokenizer)
  moved = []
  for context, continuation in pairs:
    n = len(context) - len(context.rstrip())
    moved.append(
      (context[: len(context) - n], context[len(context) - n :] + continuation)
      if n
      else (context, continuation)
    )
  contexts = sorted({c for c, _ in moved if c})
  ctx_ids = dict(zip(contexts, tokenizer.encode_batch(contexts))) if contexts else {}
  wholes = tokenizer.encode_batch([c + k for c, k in moved])
  out = []
  for (c, _), whole in zip(moved, wholes):
    if not c:
      out.append(([prefix], list(whole)))
    else:
      head = ctx_ids[c]
      out.append(([prefix, *head], list(whole[len(head) :])))
  return out


def rolling_requests(ids: list[int], prefix: int, window: int) -> list[tuple[list[int], int]]:
  """Requests that score every token of `ids` once, after `prefix`, in windows of `window` inputs."""
  seq = [prefix, *ids]
  out = []
  for a in range(1, len(seq), window):
    b = min(a + window, len(seq))
    out.append((seq[max(0, b - 1 - window) : b], b - a))
  return out


def bucket(n: int, cap: int) -> int:
  """The padded length of a row of n inputs: the next power of two from MIN_BUCKET, at most `cap`."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return min(b, cap)


def _token_scores(hidden_BTD, head_DV, targets_BT, chunk: int):
  """(log p(target), target is the argmax) per position, computed `chunk` time steps at a time."""
  B, T, D = hidden_BTD.shape
  c = max(1, min(chunk, T))
  n = -(-T // c)
  pad = n * c - T
  if pad:
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  h_NBCD = jnp.swapaxes(hidden_BTD.reshape(B, n, c, D), 0, 1)
  t_NBC = jnp.swapaxes(targets_BT.reshape(B, n, c), 0, 1)

  def one(_, xs):
    h_BCD, t_BC = xs
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, head_DV).astype(jnp.float32)
    target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    lp_BC = target_BC - jax.nn.logsumexp(logits_BCV, axis=-1)
    greedy_BC = jnp.argmax(logits_BCV, axis=-1) == t_BC
    return None, (lp_BC, greedy_BC)

  _, (lp_NBC, greedy_NBC) = jax.lax.scan(one, None, (h_NBCD, t_NBC))
  lp_BT = jnp.swapaxes(lp_NBC, 0, 1).reshape(B, n * c)[:, :T]
  greedy_BT = jnp.swapaxes(greedy_NBC, 0, 1).reshape(B, n * c)[:, :T]
  return lp_BT, greedy_BT


class Scorer:
  """Scores requests with a placed model's params: `score(params, [(ids, n), ...])` ->
  [(log-likelihood of the last n tokens, whether greedy decoding would produce them), ...].

  Rows are sharded over the mesh's data and fsdp axes (`batch` is rounded up to a multiple of them),
  the params keep their own shardings; the results come back replicated, so every process of a
  multi-process job gets them all.
  """

  def __init__(self, model, *, batch: int = 32, chunk: int = 128):
    self.model, self.cfg = model, model.cfg
    shards = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
    self.batch = -(-max(int(batch), 1) // shards) * shards
    self.max_len = int(model.cfg.max_seq_len)
    self.compiled_shapes: set[tuple[int, int]] = set()
    mesh, trunk_shardings = model.mesh, model.trunk_shardings

    def fn(params, inputs_BT, targets_BT, mask_BT):
      params = jax.lax.with_sharding_constraint(model.trunk(params), trunk_shardings)
      with sharding.activation_mesh(mesh):
        out = model_lib.apply(model.graphdef, params, inputs_BT, compute_logits=False)
        head_DV = model_lib.output_head_DV(model.cfg, params)
        lp_BT, greedy_BT = _token_scores(out.hidden, head_DV, targets_BT, chunk)
      return jnp.sum(jnp.where(mask_BT, lp_BT, 0.0), axis=-1), jnp.all(greedy_BT | ~mask_BT, axis=-1)

    self._fn = jax.jit(fn, out_shardings=sharding.replicated(mesh))
    self._in = sharding.batch_sharding(mesh)

  def truncate(self, ids: list[int]) -> list[int]:
    return ids[-(self.max_len + 1) :]

  def score(self, params, requests: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    reqs = [(self.truncate(list(ids)), int(n)) for ids, n in requests]
    for ids, n in reqs:
      if not 1 <= n <= len(ids) - 1:
        raise ValueError(f"a request scores {n} tokens of {len(ids)}; expected 1..{len(ids) - 1}")
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))
    out: list = [None] * len(reqs)
    for lo in range(0, len(order), self.batch):
      rows = order[lo : lo + self.batch]
      T = bucket(len(reqs[rows[0]][0]) - 1, self.max_len)
      inputs = np.zeros((self.batch, T), np.int32)
      targets = np.zeros((self.batch, T), np.int32)
      mask = np.zeros((self.batch, T), bool)
      for r, i in enumerate(rows):
        ids, n = reqs[i]
        L = len(ids) - 1
        inputs[r, :L], targets[r, :L] = ids[:-1], ids[1:]
        mask[r, L - n : L] = True
      host = {"inputs": inputs, "targets": targets, "mask": mask}
      dev = batch_lib.to_global(host, self._in)
      self.compiled_shapes.add((self.batch, T))
      lp, greedy = jax.device_get(self._fn(params, dev["inputs"], dev["targets"], dev["mask"]))
      for r, i in enumerate(rows):
        out[i] = (float(lp[r]), bool(greedy[r]))
    return out

  def rolling(self, params, docs_ids: list[list[int]], prefix: int) -> list[float]:
    """The log-likelihood of each whole token list after `prefix` (rolling windows past max_seq_len)."""
    reqs, owner = [], []
    for d, ids in enumerate(docs_ids):
      for r in rolling_requests(list(ids), prefix, self.max_len):
        reqs.append(r)
        owner.append(d)
    sums = [0.0] * len(docs_ids)
    for d, (lp, _) in zip(owner, self.score(params, reqs)):
      sums[d] += lp
    return sums


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
  """Bits per UTF-8 byte of a summed negative log-likelihood in nats."""
  return nll_nats / math.log(2) / max(int(n_bytes), 1)
