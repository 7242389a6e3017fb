"""The decoder-only transformer: GPT-2/GPT-3 and LLaMA families by config, plus presets.

Legend: B batch, T query time, S key time (cache length), D model width, H query heads,
K key/value heads, G query heads per key/value head (H = K * G), Q head dim, F ffn width,
V vocabulary, L layers; lower-case t is the query time within one block of blocked_attention.

The module is a Flax NNX module used purely functionally: `split(cfg)` gives its static graph and a
params pytree (a plain nested dict of arrays), and `apply(graphdef, params, ...)` is a pure function
of pytrees that every jitted function (losses, train step, sampler) calls. Layers are stored stacked
(a leading L axis on every block parameter) and run with `jax.lax.scan` (or fully unrolled), so the
parameter layout is the same whatever the loop choice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gpt_jax import sharding
from gpt_jax.config import Key, check_value
from gpt_jax.errors import ConfigError

Array = jax.Array

# --- configuration -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of one transformer. 0 in num_kv_heads / d_ff / head_dim means "derive it"."""

  family: str = "gpt2"  # only a label; every behaviour below is its own key
  vocab_size: int = 4096
  max_seq_len: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0  # 0: same as num_heads (multi-head attention); fewer: grouped-query attention
  d_model: int = 256
  d_ff: int = 0  # 0: 4 * d_model
  head_dim: int = 0  # 0: d_model // num_heads
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  pos_emb: str = "learned"  # learned | rope
  rope_theta: float = 10000.0
  mlp: str = "gelu"  # gelu (tanh approximation, as GPT-2) | swiglu
  use_bias: bool = True
  tie_embeddings: bool = True
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype of matmuls (bfloat16 on accelerators)
  param_dtype: str = "float32"  # master weights
  scan_layers: bool = True  # lax.scan over layers (fast compile) or fully unrolled
  remat_policy: str = "none"  # none | full | dots | dots_no_batch
  # auto: blocked on CPU, else jax.nn.dot_product_attention's choice (cuDNN flash attention where
  # possible) | xla | cudnn | blocked (causal, one query block at a time; see blocked_attention)
  attention_impl: str = "auto"

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def ffn_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def q_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def validate(self) -> ModelConfig:
    """Raises ConfigError naming the first bad key (as `model.<key>`): each key's type and bounds
    (SCHEMA), then the keys against each other."""
    for f in dataclasses.fields(self):
      check_value(f"model.{f.name}", getattr(self, f.name), SCHEMA[f.name])

    def bad(key, msg):
      raise ConfigError(f"model.{key}: {msg}")

    if not self.head_dim and self.d_model % self.num_heads:
      bad("num_heads", f"{self.num_heads} does not divide d_model={self.d_model}")
    if self.num_heads % self.kv_heads:
      bad("num_kv_heads", f"{self.kv_heads} does not divide num_heads={self.num_heads}")
    if self.pos_emb == "rope" and self.q_dim % 2:
      bad("head_dim", f"rotary embeddings need an even head dim, got {self.q_dim}")
    return self

  @classmethod
  def from_config(cls, cfg) -> ModelConfig:
    """From an ml_collections ConfigDict or a dict; unknown keys raise ConfigError."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"model.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**d).validate()


_GPT2 = dict(
  family="gpt2",
  vocab_size=50257,
  max_seq_len=1024,
  norm="layernorm",
  pos_emb="learned",
  mlp="gelu",
  use_bias=True,
  tie_embeddings=True,
)
_LLAMA = dict(
  family="llama",
  vocab_size=32000,
  max_seq_len=2048,
  norm="rmsnorm",
  norm_eps=1e-6,
  pos_emb="rope",
  mlp="swiglu",
  use_bias=False,
  tie_embeddings=False,
)

PRESETS: dict[str, dict[str, Any]] = {
  # GPT-2 (Radford et al. 2019) and GPT-3 (Brown et al. 2020, table 2.1).
  "gpt2_124m": dict(_GPT2, num_layers=12, num_heads=12, d_model=768),
  "gpt2_350m": dict(_GPT2, num_layers=24, num_heads=16, d_model=1024),
  "gpt2_774m": dict(_GPT2, num_layers=36, num_heads=20, d_model=1280),
  "gpt2_1558m": dict(_GPT2, num_layers=48, num_heads=25, d_model=1600),
  "gpt3_175b": dict(_GPT2, max_seq_len=2048, num_layers=96, num_heads=96, d_model=12288),
  # LLaMA (Touvron et al. 2023, table 2) and a 1.1B LLaMA-shaped model with grouped-query attention.
  "llama_1b": dict(_LLAMA, num_layers=22, num_heads=32, num_kv_heads=4, d_model=2048, d_ff=5632),
  "llama_7b": dict(_LLAMA, num_layers=32, num_heads=32, d_model=4096, d_ff=11008),
  "llama_13b": dict(_LLAMA, num_layers=40, num_heads=40, d_model=5120, d_ff=13824),
  "llama_33b": dict(_LLAMA, num_layers=60, num_heads=52, d_model=6656, d_ff=17920),
  "llama_65b": dict(_LLAMA, num_layers=80, num_heads=64, d_model=8192, d_ff=22016),
  # Small models for CPU runs and tests.
  # Unrolled layers: on XLA's CPU backend the scan's stacked residual and gradient buffers (zero-filled,
  # then written layer by layer) cost ~8 % of the step here, and compile time is about the same.
  "cpu_bench": dict(
    _GPT2, vocab_size=4096, max_seq_len=256, num_layers=6, num_heads=6, d_model=384, scan_layers=False
  ),
  "tiny": dict(
    _LLAMA, vocab_size=4096, max_seq_len=256, num_layers=4, num_heads=4, num_kv_heads=2, d_model=128, d_ff=384
  ),
  "tiny_gpt2": dict(_GPT2, vocab_size=4096, max_seq_len=256, num_layers=4, num_heads=4, d_model=128),
}


def _schema() -> dict:
  """model.* keys: ModelConfig's defaults with their bounds and choices (see config.Key)."""
  spec = {
    "vocab_size": dict(bounds="> 0"),
    "max_seq_len": dict(bounds="> 0"),
    "num_layers": dict(bounds="> 0"),
    "num_heads": dict(bounds="> 0"),
    "num_kv_heads": dict(bounds=">= 0"),  # 0 derives it
    "d_model": dict(bounds="> 0"),
    "d_ff": dict(bounds=">= 0"),
    "head_dim": dict(bounds=">= 0"),
    "norm": dict(choices=("layernorm", "rmsnorm")),
    "norm_eps": dict(bounds="> 0"),
    "pos_emb": dict(choices=("learned", "rope")),
    "rope_theta": dict(bounds="> 0"),
    "mlp": dict(choices=("gelu", "swiglu")),
    "init_std": dict(bounds="> 0"),
    "dtype": dict(choices=("float32", "bfloat16", "float16")),
    "param_dtype": dict(choices=("float32", "bfloat16")),
    # How the same weights are computed: these may change when a run is resumed.
    "scan_layers": dict(resumable=True),
    "remat_policy": dict(choices=tuple(REMAT_POLICIES), resumable=True),
    "attention_impl": dict(choices=("auto", "xla", "cudnn", "blocked"), resumable=True),
  }
  return {f.name: Key(f.default, **spec.get(f.name, {})) for f in dataclasses.fields(ModelConfig)}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"model preset {name!r} is unknown; known: {', '.join(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides}).validate()


def preset_config(name: str, **overrides):
  """A model preset as an ml_collections ConfigDict holding every model key (the `model` section)."""
  import ml_collections

  return ml_collections.ConfigDict(dataclasses.asdict(preset(name, **overrides)))


# --- layers -----------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, shape, axes, std: float | None, dtype) -> nnx.Param:
  """A parameter with its logical axis names; std None means ones, 0.0 means zeros."""
  if std is None:
    value = jnp.ones(shape, dtype)
  elif std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class Norm(nnx.Module):
  """LayerNorm (with bias when use_bias) or RMSNorm; statistics in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.rms = cfg.norm == "rmsnorm"
    self.eps = cfg.norm_eps
    self.scale = _param(rngs, (cfg.d_model,), ("norm",), None, pd)
    self.bias = _param(rngs, (cfg.d_model,), ("norm",), 0.0, pd) if (cfg.use_bias and not self.rms) else None

  def __call__(self, x_BTD: Array) -> Array:
    x = x_BTD.astype(jnp.float32)
    if self.rms:
      y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    else:
      mean = jnp.mean(x, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x_BTD.dtype)


def rope(x_BTNQ: Array, positions_BT: Array, theta: float) -> Array:
  """Rotary position embedding, half-split convention (as LLaMA checkpoints in Hugging Face form)."""
  q = x_BTNQ.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, q, 2, dtype=jnp.float32) / q))
  angles_BTq = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angles_BTq)[:, :, None, :]
  cos = jnp.cos(angles_BTq)[:, :, None, :]
  x = x_BTNQ.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNQ.dtype)


ATTENTION_BLOCK = 128  # query rows per block of blocked_attention (64-128 measured best on CPU at T=256)


def blocked_attention(q_BTHQ: Array, k_BTKQ: Array, v_BTKQ: Array, mask_BTS: Array | None, block: int):
  """Causal self-attention (grouped-query when K < H) computed one block of query rows at a time.

  Each block of queries [lo, hi) is scored only against keys [0, hi): the causal mask makes every
  later key irrelevant, so about half of the score matrix (and its softmax and gradients) is never
  formed. The heads are moved in front of the sequence so that every product is a plain batched
  matrix product. mask_BTS, when given, must already be causal (the model's segment mask is). On
  CPU this runs about 1.8x faster than the one-piece XLA attention for a forward and backward pass
  at B=16, T=256, H=6 (benchmarks/NOTES.md); results agree with it to float rounding.
  """
  B, T, H, Q = q_BTHQ.shape
  K = k_BTKQ.shape[2]
  G = H // K
  q_BKGTQ = jnp.transpose((q_BTHQ * Q**-0.5).reshape(B, T, K, G, Q), (0, 2, 3, 1, 4))
  k_BKSQ = jnp.transpose(k_BTKQ, (0, 2, 1, 3))
  v_BKSQ = jnp.transpose(v_BTKQ, (0, 2, 1, 3))
  outs = []
  for lo in range(0, T, block):
    hi = min(lo + block, T)
    s_BKGtS = jnp.einsum("bkgtq,bksq->bkgts", q_BKGTQ[:, :, :, lo:hi], k_BKSQ[:, :, :hi]).astype(jnp.float32)
    if mask_BTS is None:
      allowed = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]
    else:
      allowed = mask_BTS[:, None, None, lo:hi, :hi]
    # A large finite fill, not -inf: a fully masked row (never made by this model) gives a uniform
    # average instead of NaN. The row max is a constant shift of the softmax, so it needs no gradient.
    s_BKGtS = jnp.where(allowed, s_BKGtS, jnp.finfo(jnp.float32).min)
    s_BKGtS = s_BKGtS - jax.lax.stop_gradient(jnp.max(s_BKGtS, axis=-1, keepdims=True))
    p_BKGtS = jnp.exp(s_BKGtS)
    p_BKGtS = (p_BKGtS / jnp.sum(p_BKGtS, axis=-1, keepdims=True)).astype(v_BKSQ.dtype)
    outs.append(jnp.einsum("bkgts,bksq->bkgtq", p_BKGtS, v_BKSQ[:, :, :hi]))
  out_BKGTQ = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return jnp.transpose(out_BKGTQ, (0, 3, 1, 2, 4)).reshape(B, T, H, Q)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K, Q = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.q_dim
    pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    out_std = std / math.sqrt(2 * cfg.num_layers)  # residual projections scaled as in GPT-2
    self.wq = _param(rngs, (D, H, Q), ("embed", "heads", "head_dim"), std, pd)
    self.wk = _param(rngs, (D, K, Q), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wv = _param(rngs, (D, K, Q), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wo = _param(rngs, (H, Q, D), ("heads", "head_dim", "embed"), out_std, pd)
    if cfg.use_bias:
      self.bq = _param(rngs, (H, Q), ("heads", "head_dim"), 0.0, pd)
      self.bk = _param(rngs, (K, Q), ("kv_heads", "head_dim"), 0.0, pd)
      self.bv = _param(rngs, (K, Q), ("kv_heads", "head_dim"), 0.0, pd)
      self.bo = _param(rngs, (D,), ("norm",), 0.0, pd)

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache_kv, cache_index):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    q_BTHQ = jnp.einsum("btd,dhq->bthq", x_BTD, self.wq[...].astype(dt))
    k_BTKQ = jnp.einsum("btd,dkq->btkq", x_BTD, self.wk[...].astype(dt))
    v_BTKQ = jnp.einsum("btd,dkq->btkq", x_BTD, self.wv[...].astype(dt))
    if cfg.use_bias:
      q_BTHQ = q_BTHQ + self.bq[...].astype(dt)
      k_BTKQ = k_BTKQ + self.bk[...].astype(dt)
      v_BTKQ = v_BTKQ + self.bv[...].astype(dt)
    if cfg.pos_emb == "rope":
      q_BTHQ = rope(q_BTHQ, positions_BT, cfg.rope_theta)
      k_BTKQ = rope(k_BTKQ, positions_BT, cfg.rope_theta)
    q_BTHQ = sharding.constrain(q_BTHQ, ("batch", "act_seq", "act_heads", None))
    new_cache = None
    if cache_kv is not None:
      # The stacked (L, B, S, K, Q) cache rides in the layer loop's carry: write this layer's new
      # rows in place, then read the layer's slots back for attention.
      k_all, v_all, layer = cache_kv
      k_all = jax.lax.dynamic_update_slice(
        k_all, k_BTKQ.astype(k_all.dtype)[None], (layer, 0, cache_index, 0, 0)
      )
      v_all = jax.lax.dynamic_update_slice(
        v_all, v_BTKQ.astype(v_all.dtype)[None], (layer, 0, cache_index, 0, 0)
      )
      new_cache = (k_all, v_all)
      k_BTKQ = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
      v_BTKQ = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
    impl = cfg.attention_impl
    if impl == "auto":
      impl = "blocked" if jax.default_backend() == "cpu" else None
    if impl == "blocked" and cache_kv is None:
      out_BTHQ = blocked_attention(q_BTHQ, k_BTKQ, v_BTKQ, mask_BTS, ATTENTION_BLOCK)
    else:
      # Cached decoding (queries shorter than the cache: no block to skip) or an explicit choice.
      impl = None if impl == "blocked" else impl
      if mask_BTS is None:
        out_BTHQ = jax.nn.dot_product_attention(q_BTHQ, k_BTKQ, v_BTKQ, is_causal=True, implementation=impl)
      else:
        out_BTHQ = jax.nn.dot_product_attention(
          q_BTHQ, k_BTKQ, v_BTKQ, mask=mask_BTS[:, None, :, :], implementation=impl
        )
    y_BTD = jnp.einsum("bthq,hqd->btd", out_BTHQ, self.wo[...].astype(dt))
    if cfg.use_bias:
      y_BTD = y_BTD + self.bo[...].astype(dt)
    return y_BTD, new_cache


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F = cfg.d_model, cfg.ffn_dim
    pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    out_std = std / math.sqrt(2 * cfg.num_layers)
    if cfg.mlp == "swiglu":
      self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), std, pd)
    self.w_up = _param(rngs, (D, F), ("embed", "mlp"), std, pd)
    self.w_down = _param(rngs, (F, D), ("mlp", "embed"), out_std, pd)
    if cfg.use_bias:
      self.b_up = _param(rngs, (F,), ("mlp",), 0.0, pd)
      self.b_down = _param(rngs, (D,), ("norm",), 0.0, pd)

  def __call__(self, x_BTD):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    h_BTF = jnp.einsum("btd,df->btf", x_BTD, self.w_up[...].astype(dt))
    if cfg.use_bias:
      h_BTF = h_BTF + self.b_up[...].astype(dt)
    if cfg.mlp == "swiglu":
      gate_BTF = jnp.einsum("btd,df->btf", x_BTD, self.w_gate[...].astype(dt))
      h_BTF = jax.nn.silu(gate_BTF) * h_BTF
    else:
      h_BTF = jax.nn.gelu(h_BTF, approximate=True)
    h_BTF = sharding.constrain(h_BTF, ("batch", "act_seq", "act_mlp"))
    y_BTD = jnp.einsum("btf,fd->btd", h_BTF, self.w_down[...].astype(dt))
    if cfg.use_bias:
      y_BTD = y_BTD + self.b_down[...].astype(dt)
    return y_BTD


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache_kv=None, cache_index=None):
    h_BTD, new_cache = self.attn(self.attn_norm(x_BTD), positions_BT, mask_BTS, cache_kv, cache_index)
    x_BTD = x_BTD + h_BTD
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return sharding.constrain(x_BTD, ("batch", "act_seq", "act_embed")), new_cache


REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
SCHEMA = _schema()
# Keys that change neither the shapes nor the meaning of the weights: a checkpoint trained with other
# values of these starts another run as well (every other model key must match the checkpoint's).
WEIGHT_NEUTRAL_KEYS = (
  "family",
  "init_std",
  "dtype",
  "param_dtype",
  "scan_layers",
  "remat_policy",
  "attention_impl",
)


class Output(NamedTuple):
  logits: Array | None  # (B, T, V) in the compute dtype; None when compute_logits=False
  hidden: Array  # (B, T, D) final hidden states after the last norm (reward/value heads read these)
  cache: dict | None  # updated KV cache when one was given


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std, pd)
    if cfg.pos_emb == "learned":
      self.pos_embed = _param(rngs, (cfg.max_seq_len, cfg.d_model), ("pos", "embed"), std / 2, pd)
    # Stacked blocks: build one block's state per layer key with vmap, then merge into one module
    # whose every parameter has a leading L axis.
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    block_graph = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
    stacked = jax.vmap(lambda k: nnx.state(Block(cfg, rngs=nnx.Rngs(k))))(keys)
    self.blocks = nnx.merge(block_graph, stacked)
    self.final_norm = Norm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std, pd)

  def __call__(
    self,
    inputs_BT: Array,
    positions_BT: Array | None = None,
    segment_ids_BT: Array | None = None,
    *,
    attn_mask_BTS: Array | None = None,
    cache: dict | None = None,
    cache_index: Array | int | None = None,
    compute_logits: bool = True,
  ) -> Output:
    """Runs the model.

    Attention is causal; with segment_ids, tokens attend only within their own segment (packed
    documents). For cached decoding pass `cache` (from `init_cache`), the write offset `cache_index`
    and an explicit boolean `attn_mask_BTS` over the cache's S slots. Any mask must be causal: without
    a cache, blocked attention never scores a key after its query block.
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    B, T = inputs_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask_BTS = attn_mask_BTS
    if mask_BTS is None and segment_ids_BT is not None:
      causal_TT = jnp.tril(jnp.ones((T, T), bool))
      mask_BTS = causal_TT & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    x_BTD = jnp.take(self.embed[...], inputs_BT, axis=0).astype(dt)
    if cfg.pos_emb == "learned":
      x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(dt)
    x_BTD = sharding.constrain(x_BTD, ("batch", "act_seq", "act_embed"))

    block_graph, block_params = nnx.split(self.blocks)

    def layer(carry, xs):
      x_BTD, kv = carry
      params, idx = xs
      block = nnx.merge(block_graph, params)
      cache_kv = None if kv is None else (kv[0], kv[1], idx)
      x_BTD, new_kv = block(x_BTD, positions_BT, mask_BTS, cache_kv, cache_index)
      return (x_BTD, new_kv), None

    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)
    kv0 = None if cache is None else (cache["k"], cache["v"])
    (x_BTD, new_kv), _ = jax.lax.scan(
      layer,
      (x_BTD, kv0),
      (block_params, jnp.arange(cfg.num_layers)),
      unroll=1 if cfg.scan_layers else cfg.num_layers,
    )
    hidden_BTD = self.final_norm(x_BTD)
    logits_BTV = None
    if compute_logits:
      if cfg.tie_embeddings:
        logits_BTV = jnp.einsum("btd,vd->btv", hidden_BTD, self.embed[...].astype(dt))
      else:
        logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, self.lm_head[...].astype(dt))
      logits_BTV = sharding.constrain(logits_BTV, ("batch", "act_seq", "act_vocab"))
    new_cache = None if cache is None else {"k": new_kv[0], "v": new_kv[1]}
    return Output(logits_BTV, hidden_BTD, new_cache)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty KV cache: {"k", "v"} each (L, B, S, K, Q)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.q_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# --- functional interface ------------------------------------------------------------------------


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def init_params(cfg: ModelConfig, key: Array) -> dict:
  """Freshly initialised params (a nested dict of arrays); pure, so it can run under jit."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=key))))


# One compiled program per config: initialising op by op would compile every small op separately.
_init_params_jit = jax.jit(init_params, static_argnums=0)


def split(cfg: ModelConfig, seed: int | Array = 0):
  """Builds the model and returns (graphdef, params): params a nested dict of arrays."""
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  graphdef, _, _ = abstract(cfg)
  return graphdef, _init_params_jit(cfg, key)


def abstract(cfg: ModelConfig):
  """(graphdef, params as ShapeDtypeStructs, logical axes per param) without allocating anything."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  shapes = nnx.to_pure_dict(state)

  def axes_of(path, var):
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.get_value().shape)
    return ("layers", *axes) if path[0] == "blocks" else axes

  flat = {path: axes_of(path, v) for path, v in nnx.to_flat_state(state)}
  axes = _unflatten(flat)
  return graphdef, shapes, axes


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def apply(graphdef, params, inputs_BT, positions_BT=None, segment_ids_BT=None, **kwargs) -> Output:
  """Pure forward pass: params pytree in, Output out."""
  return nnx.merge(graphdef, params)(inputs_BT, positions_BT, segment_ids_BT, **kwargs)


def output_head_DV(cfg: ModelConfig, params) -> Array:
  """The (D, V) output projection in the compute dtype: the transposed input embedding when tied,
  else lm_head. With `Output.hidden` it feeds losses.chunked_next_token_xent."""
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  return w.astype(jnp.dtype(cfg.dtype))


def param_count(cfg: ModelConfig) -> int:
  _, shapes, _ = abstract(cfg)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def flops_param_count(cfg: ModelConfig) -> int:
  """Parameters that take part in matrix products per token (excludes embedding lookups)."""
  n = param_count(cfg)
  if cfg.pos_emb == "learned":
    n -= cfg.max_seq_len * cfg.d_model
  if not cfg.tie_embeddings:  # the input embedding is a lookup; the untied head is a product
    n -= cfg.vocab_size * cfg.d_model
  return n


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
  """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T (forward + backward)."""
  T = seq_len or cfg.max_seq_len
  return 6 * flops_param_count(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.q_dim * T
