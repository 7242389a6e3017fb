"""KV-cache sampler: prefill a batch of prompts, then decode one token per step in one compiled loop.

Used by the chat command (`stream`), PPO rollouts (`make_sampler`) and notebooks (`generate`).

Legend: B batch, P padded prompt length, N max new tokens, S cache length (P + N), V vocabulary.

    sampler = make_sampler(cfg, graphdef, eos_id=eos, pad_id=pad, max_prompt_len=P,
                           sample_cfg=SampleConfig(max_new_tokens=N, temperature=0.7, top_p=0.9))
    tokens_BP, lengths_B = pad_prompts(prompts, pad_id=pad, max_len=P)
    out = sampler(params, tokens_BP, lengths_B, jax.random.key(0))   # SampleOutput, all (B, N)

Prompts are left-padded to P so that every row writes the cache at the same offset: the prompt
fills slots [0, P), generated token j goes to slot P + j. Each row's positions start at 0 on its
first real token (positions = slot - pad), and the attention mask hides each row's left padding
and the not-yet-written slots. Decoding runs in a `lax.while_loop` that ends after N tokens or as
soon as every row has produced `eos_id` (a negative eos_id never matches: fixed-length decoding).

Sampling follows the usual order: temperature, then top-k (`lax.top_k`), then top-p (nucleus,
sort-based); `greedy` (or temperature 0) takes the argmax. The key for step j is
`fold_in(rng, j)`; with JAX's partitionable threefry (the default) the noise of row i depends only
on the key and i, so a seed reproduces its samples whatever the sharding or the prompt padding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import model as model_lib
from gpt_jax import sharding
from gpt_jax.errors import ConfigError

Array = jax.Array

# Logical axes of the cache (L, B, S, K, Q): rows over (data, fsdp) like the batch, kv heads over
# tensor like the attention weights that produce them.
CACHE_AXES = ("layers", "batch", "act_seq", "act_kv_heads", None)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """How to pick each token. temperature 0 means greedy; top_k 0 and top_p 1 disable filtering."""

  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0.0

  def validate(self) -> SampleConfig:
    """Raises ConfigError naming the first bad key (as `sample.<key>`)."""
    if int(self.max_new_tokens) < 1:
      raise ConfigError(f"sample.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
    if not self.temperature >= 0:  # NaN too
      raise ConfigError(f"sample.temperature: must be >= 0 (0 is greedy), got {self.temperature}")
    if int(self.top_k) < 0:
      raise ConfigError(f"sample.top_k: must be >= 0 (0 disables it), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"sample.top_p: must be in (0, 1] (1 disables it), got {self.top_p}")
    return self


class SampleOutput(NamedTuple):
  """What the sampler returns; every (B, N) array is indexed by generated-token number."""

  tokens: Array  # (B, N) int32 generated ids; pad_id after a row has finished
  logprobs: (
    Array  # (B, N) float32 log-prob of each token under the model (log_softmax of raw logits); 0 where masked
  )
  sampled_logprobs: Array  # (B, N) float32 log-prob under the distribution actually sampled from (after temperature/top-k/top-p; 0 for greedy)
  response_mask: Array  # (B, N) bool: True for generated tokens, up to and including eos
  lengths: Array  # (B,) int32 number of generated tokens per row, eos included


# --- token choice ------------------------------------------------------------------------------


def process_logits(logits_BV: Array, sample_cfg: SampleConfig) -> Array:
  """Applies temperature, top-k and top-p. Returns float32 (B, V) logits, -inf outside the kept set."""
  x = logits_BV.astype(jnp.float32)
  if sample_cfg.is_greedy:
    return x
  x = x / sample_cfg.temperature
  V = x.shape[-1]
  if 0 < sample_cfg.top_k < V:
    kth_B1 = jax.lax.top_k(x, sample_cfg.top_k)[0][:, -1:]
    x = jnp.where(x < kth_B1, -jnp.inf, x)
  if sample_cfg.top_p < 1.0:
    # Keep the smallest set of most likely tokens whose mass reaches top_p: a sorted token stays if
    # the mass strictly before it is below top_p (so the most likely one always stays).
    sorted_BV = jnp.sort(x, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = mass_before_BV < sample_cfg.top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff_B1, -jnp.inf, x)
  return x


def choose_tokens(logits_BV: Array, key: Array, sample_cfg: SampleConfig) -> tuple[Array, Array, Array]:
  """Picks one token per row. Returns (tokens_B int32, model logprob_B, sampled-distribution logprob_B)."""
  processed_BV = process_logits(logits_BV, sample_cfg)
  if sample_cfg.is_greedy:
    tokens_B = jnp.argmax(processed_BV, axis=-1).astype(jnp.int32)
    sampled_lp_B = jnp.zeros(tokens_B.shape, jnp.float32)
  else:
    tokens_B = jax.random.categorical(key, processed_BV, axis=-1).astype(jnp.int32)
    sampled_lp_B = _gather(jax.nn.log_softmax(processed_BV, axis=-1), tokens_B)
  model_lp_B = _gather(jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1), tokens_B)
  return tokens_B, model_lp_B, sampled_lp_B


def _gather(x_BV: Array, idx_B: Array) -> Array:
  return jnp.take_along_axis(x_BV, idx_B[:, None], axis=-1)[:, 0]


# --- model calls -------------------------------------------------------------------------------


def _head(cfg: model_lib.ModelConfig, params, hidden_BD: Array) -> Array:
  """Logits (B, V) of the last position only: the full (B, P, V) prefill logits can be gigabytes.
  Mirrors the output projection of model.Transformer."""
  dt = jnp.dtype(cfg.dtype)
  if cfg.tie_embeddings:
    logits_BV = jnp.einsum("bd,vd->bv", hidden_BD, params["embed"].astype(dt))
  else:
    logits_BV = jnp.einsum("bd,dv->bv", hidden_BD, params["lm_head"].astype(dt))
  return sharding.constrain(logits_BV, ("batch", "act_vocab"))


def prefill(graphdef, cfg, params, tokens_BP: Array, lengths_B: Array, cache_len: int):
  """Runs the left-padded prompts into a fresh cache of `cache_len` slots.

  Returns (cache {"k","v"} (L, B, S, K, Q), logits_BV float of each row's last prompt token).
  """
  B, P = tokens_BP.shape
  pad_B = P - lengths_B
  slots_S = jnp.arange(cache_len)
  t_P = jnp.arange(P)
  positions_BP = jnp.maximum(t_P[None, :] - pad_B[:, None], 0)
  causal_PS = slots_S[None, :] <= t_P[:, None]
  mask_BPS = causal_PS[None] & (slots_S[None, None, :] >= pad_B[:, None, None])
  # Padding queries attend to themselves only, so that no softmax row is empty.
  mask_BPS = mask_BPS | (slots_S[None, None, :] == t_P[None, :, None])
  cache = model_lib.init_cache(cfg, B, cache_len)
  cache = jax.tree.map(lambda c: sharding.constrain(c, CACHE_AXES), cache)
  out = model_lib.apply(
    graphdef,
    params,
    tokens_BP,
    positions_BP,
    attn_mask_BTS=mask_BPS,
    cache=cache,
    cache_index=0,
    compute_logits=False,
  )
  return out.cache, _head(cfg, params, out.hidden[:, -1])


def decode_step(graphdef, cfg, params, cache, token_B: Array, lengths_B: Array, prompt_len: int, j: Array):
  """Feeds generated token number j (written to slot prompt_len + j) and returns (cache, logits_BV)."""
  P = prompt_len
  S = cache["k"].shape[2]
  slot = P + j
  pad_B = P - lengths_B
  slots_S = jnp.arange(S)
  mask_B1S = ((slots_S[None, :] >= pad_B[:, None]) & (slots_S[None, :] <= slot))[:, None, :]
  positions_B1 = (lengths_B + j)[:, None]
  out = model_lib.apply(
    graphdef,
    params,
    token_B[:, None],
    positions_B1,
    attn_mask_BTS=mask_B1S,
    cache=cache,
    cache_index=slot,
    compute_logits=False,
  )
  cache = jax.tree.map(lambda c: sharding.constrain(c, CACHE_AXES), out.cache)
  return cache, _head(cfg, params, out.hidden[:, 0])


# --- the compiled sampler ----------------------------------------------------------------------


def check_lengths(cfg: model_lib.ModelConfig, prompt_len: int, sample_cfg: SampleConfig) -> None:
  """Raises ConfigError when prompt + generated tokens do not fit the model's context."""
  if prompt_len < 1:
    raise ConfigError(f"max_prompt_len: must be >= 1, got {prompt_len}")
  total = prompt_len + sample_cfg.max_new_tokens
  if total > cfg.max_seq_len:
    raise ConfigError(
      f"sample.max_new_tokens: prompt length {prompt_len} + max_new_tokens {sample_cfg.max_new_tokens}"
      f" = {total} exceeds model.max_seq_len {cfg.max_seq_len}"
    )


def _sample_loop(
  graphdef, cfg, sample_cfg, eos_id, pad_id, params, tokens_BP, lengths_B, rng
) -> SampleOutput:
  B, P = tokens_BP.shape
  N = sample_cfg.max_new_tokens
  tokens_BP = sharding.constrain(tokens_BP, ("batch", None))
  cache, logits_BV = prefill(graphdef, cfg, params, tokens_BP, lengths_B, P + N)

  tok_B, lp_B, slp_B = choose_tokens(logits_BV, jax.random.fold_in(rng, 0), sample_cfg)
  done_B = tok_B == eos_id
  out_tokens_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok_B)
  out_lp_BN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp_B)
  out_slp_BN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(slp_B)
  mask_BN = jnp.zeros((B, N), bool).at[:, 0].set(True)

  def cond(carry):
    j, _, _, done_B, *_ = carry
    return (j < N) & ~jnp.all(done_B)

  def body(carry):
    j, cache, tok_B, done_B, out_tokens_BN, out_lp_BN, out_slp_BN, mask_BN = carry
    # Finished rows keep running (the batch is one computation) but feed pad and record nothing.
    cache, logits_BV = decode_step(graphdef, cfg, params, cache, tok_B, lengths_B, P, j - 1)
    new_B, lp_B, slp_B = choose_tokens(logits_BV, jax.random.fold_in(rng, j), sample_cfg)
    live_B = ~done_B
    new_B = jnp.where(live_B, new_B, pad_id)
    out_tokens_BN = jax.lax.dynamic_update_slice(out_tokens_BN, new_B[:, None], (0, j))
    out_lp_BN = jax.lax.dynamic_update_slice(out_lp_BN, jnp.where(live_B, lp_B, 0.0)[:, None], (0, j))
    out_slp_BN = jax.lax.dynamic_update_slice(out_slp_BN, jnp.where(live_B, slp_B, 0.0)[:, None], (0, j))
    mask_BN = jax.lax.dynamic_update_slice(mask_BN, live_B[:, None], (0, j))
    done_B = done_B | (new_B == eos_id)
    return j + 1, cache, new_B, done_B, out_tokens_BN, out_lp_BN, out_slp_BN, mask_BN

  carry = (jnp.int32(1), cache, tok_B, done_B, out_tokens_BN, out_lp_BN, out_slp_BN, mask_BN)
  _, _, _, _, out_tokens_BN, out_lp_BN, out_slp_BN, mask_BN = jax.lax.while_loop(cond, body, carry)
  lengths_out_B = jnp.sum(mask_BN, axis=-1, dtype=jnp.int32)
  return SampleOutput(out_tokens_BN, out_lp_BN, out_slp_BN, mask_BN, lengths_out_B)


def make_sampler(
  cfg: model_lib.ModelConfig,
  graphdef,
  *,
  eos_id: int,
  pad_id: int,
  max_prompt_len: int,
  sample_cfg: SampleConfig,
  mesh=None,
  params_sharding=None,
) -> Callable[..., SampleOutput]:
  """Builds `sampler(params, tokens_BP, lengths_B, rng) -> SampleOutput`, compiled once per batch size.

  tokens_BP: int32 (B, max_prompt_len) prompts left-padded (see `pad_prompts`); lengths_B: int32 (B,)
  real prompt lengths (>= 1); rng: a jax.random key. With `mesh`, the cache and the rows are sharded
  by the rules table (rows over data*fsdp when B divides, kv heads over tensor) and params are pinned
  to `params_sharding` when given (else they keep whatever sharding they arrive with).
  eos_id < 0 never stops a row (fixed-length decoding, e.g. for benchmarks).
  """
  sample_cfg.validate()
  check_lengths(cfg, max_prompt_len, sample_cfg)

  def run(params, tokens_BP, lengths_B, rng):
    if params_sharding is not None:
      params = jax.lax.with_sharding_constraint(params, params_sharding)
    with sharding.activation_mesh(mesh):
      return _sample_loop(graphdef, cfg, sample_cfg, eos_id, pad_id, params, tokens_BP, lengths_B, rng)

  jitted = jax.jit(run)

  def sampler(params, tokens_BP, lengths_B, rng) -> SampleOutput:
    if tokens_BP.ndim != 2 or tokens_BP.shape[1] != max_prompt_len:
      raise ConfigError(f"tokens_BP: expected shape (B, {max_prompt_len}) left-padded, got {tokens_BP.shape}")
    if tuple(lengths_B.shape) != (tokens_BP.shape[0],):
      raise ConfigError(f"lengths_B: expected shape ({tokens_BP.shape[0]},), got {tuple(lengths_B.shape)}")
    if (
      isinstance(lengths_B, np.ndarray)
      and lengths_B.size
      and not (lengths_B.min() >= 1 and lengths_B.max() <= max_prompt_len)
    ):
      raise ConfigError(
        f"lengths_B: prompt lengths must be in [1, {max_prompt_len}], got {lengths_B.tolist()}"
      )
    return jitted(params, jnp.asarray(tokens_BP, jnp.int32), jnp.asarray(lengths_B, jnp.int32), rng)

  return sampler


# --- conveniences for chat and notebooks -------------------------------------------------------


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, max_len: int | None = None):
  """Left-pads token lists. Returns (tokens_BP np.int32 (B, P), lengths_B np.int32 (B,)).

  P is `max_len` when given (a longer prompt raises ConfigError), else the longest prompt.
  """
  if not prompts:
    raise ConfigError("prompts: expected at least one prompt, got none")
  lengths = [len(p) for p in prompts]
  if min(lengths) < 1:
    raise ConfigError(f"prompts[{lengths.index(0)}]: is empty; every prompt needs at least one token")
  P = max(lengths) if max_len is None else int(max_len)
  if max(lengths) > P:
    i = int(np.argmax(lengths))
    raise ConfigError(f"prompts[{i}]: has {lengths[i]} tokens, more than max_len {P}")
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p) :] = np.asarray(p, np.int32)
  return tokens, np.asarray(lengths, np.int32)


def _bucket(n: int, limit: int, multiple: int = 32) -> int:
  """Rounds a prompt length up to a multiple (fewer recompiles), never beyond `limit`."""
  return max(n, min(-(-n // multiple) * multiple, limit))


@functools.lru_cache(maxsize=16)
def _cached_sampler(cfg, graphdef, eos_id, pad_id, max_prompt_len, sample_cfg, mesh):
  return make_sampler(
    cfg,
    graphdef,
    eos_id=eos_id,
    pad_id=pad_id,
    max_prompt_len=max_prompt_len,
    sample_cfg=sample_cfg,
    mesh=mesh,
  )


def generate(
  params,
  graphdef,
  cfg,
  prompts: Sequence[Sequence[int]],
  *,
  eos_id: int,
  pad_id: int,
  sample_cfg: SampleConfig = SampleConfig(),
  seed: int = 0,
  mesh=None,
) -> list[list[int]]:
  """Samples a continuation of each prompt. Returns one token list per prompt (eos included if produced)."""
  sample_cfg.validate()
  _, lengths_B = pad_prompts(prompts, pad_id)  # validates the prompts
  longest = int(lengths_B.max())
  check_lengths(cfg, longest, sample_cfg)
  P = _bucket(longest, cfg.max_seq_len - sample_cfg.max_new_tokens)
  tokens_BP, lengths_B = pad_prompts(prompts, pad_id, P)
  sampler = _cached_sampler(cfg, graphdef, eos_id, pad_id, P, sample_cfg, mesh)
  out = jax.device_get(sampler(params, tokens_BP, lengths_B, jax.random.key(seed)))
  return [row[: int(n)].tolist() for row, n in zip(out.tokens, out.lengths)]


@functools.lru_cache(maxsize=16)
def _stream_fns(cfg, graphdef, sample_cfg, prompt_len):
  S = prompt_len + sample_cfg.max_new_tokens

  @jax.jit
  def first(params, tokens_BP, lengths_B, key):
    cache, logits_BV = prefill(graphdef, cfg, params, tokens_BP, lengths_B, S)
    return cache, choose_tokens(logits_BV, key, sample_cfg)[0]

  @functools.partial(jax.jit, donate_argnums=(1,))  # the cache is updated in place
  def step(params, cache, tok_B, lengths_B, j, key):
    cache, logits_BV = decode_step(graphdef, cfg, params, cache, tok_B, lengths_B, prompt_len, j)
    return cache, choose_tokens(logits_BV, key, sample_cfg)[0]

  return first, step


def stream(
  params,
  graphdef,
  cfg,
  prompt: Sequence[int],
  *,
  eos_id: int,
  sample_cfg: SampleConfig = SampleConfig(),
  seed: int = 0,
) -> Iterator[int]:
  """Yields the continuation of one prompt token by token (for interactive chat), eos included.

  Each token costs one call of a jitted decode step that reuses (and donates) the cache; the tokens
  and the rng schedule are those of row 0 of `make_sampler` with the same seed.
  """
  sample_cfg.validate()
  pad_prompts([prompt], pad_id=0)  # validates the prompt
  check_lengths(cfg, len(prompt), sample_cfg)
  P = _bucket(len(prompt), cfg.max_seq_len - sample_cfg.max_new_tokens)
  tokens_BP, lengths_B = pad_prompts([prompt], pad_id=0, max_len=P)
  first, step = _stream_fns(cfg, graphdef, sample_cfg, P)
  rng = jax.random.key(seed)
  lengths_B = jnp.asarray(lengths_B)
  cache, tok_B = first(params, jnp.asarray(tokens_BP), lengths_B, jax.random.fold_in(rng, 0))
  for j in range(1, sample_cfg.max_new_tokens + 1):
    token = int(tok_B[0])
    yield token
    if token == eos_id or j == sample_cfg.max_new_tokens:
      return
    cache, tok_B = step(params, cache, tok_B, lengths_B, jnp.int32(j - 1), jax.random.fold_in(rng, j))


class Replier:
  """Replies to many token prompts in fixed-shape batches: one compiled sampler for the whole set.

  Every call pads the prompts to `prompt_len` and the last chunk to `batch` rows (repeating its first
  prompt), so every chunk has one shape. `batch` is rounded up to a multiple of `shards` (the
  data-parallel shards), so every device gets rows. Chunk k samples with fold_in(key, k).
  """

  def __init__(
    self,
    cfg,
    graphdef,
    *,
    eos_id: int,
    pad_id: int,
    prompt_len: int,
    batch: int,
    sample_cfg: SampleConfig,
    mesh=None,
    params_sharding=None,
    shards: int = 1,
  ):
    self.pad_id, self.prompt_len = pad_id, int(prompt_len)
    self.batch = -(-max(int(batch), 1) // shards) * shards
    self.sampler = make_sampler(
      cfg,
      graphdef,
      eos_id=eos_id,
      pad_id=pad_id,
      max_prompt_len=self.prompt_len,
      sample_cfg=sample_cfg,
      mesh=mesh,
      params_sharding=params_sharding,
    )

  def outputs(self, params, prompts: Sequence[Sequence[int]], key) -> Iterator[tuple[int, SampleOutput]]:
    """Yields (offset of the chunk's first prompt, host SampleOutput of the chunk's real rows)."""
    for k, lo in enumerate(range(0, len(prompts), self.batch)):
      chunk = list(prompts[lo : lo + self.batch])
      rows = chunk + [chunk[0]] * (self.batch - len(chunk))
      tokens_BP, lengths_B = pad_prompts(rows, self.pad_id, self.prompt_len)
      out = jax.device_get(self.sampler(params, tokens_BP, lengths_B, jax.random.fold_in(key, k)))
      yield lo, SampleOutput(*(x[: len(chunk)] for x in out))

  def __call__(self, params, prompts: Sequence[Sequence[int]], key) -> list[list[int]]:
    """One reply per prompt: its generated ids (ending with eos unless cut at max_new_tokens)."""
    replies = []
    for _, out in self.outputs(params, prompts, key):
      replies += [row[: int(n)].tolist() for row, n in zip(out.tokens, out.lengths)]
    return replies
