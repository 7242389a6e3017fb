"""Weight layouts: which Hugging Face tensor becomes which gpt_jax parameter, and back.

Legend: D model width, H query heads, K kv heads, Q head dim, F ffn width, V vocab, P positions.
GPT-2's Conv1D stores weights as (in, out); LLaMA's nn.Linear as (out, in). gpt_jax keeps
(in, heads, head_dim) / (in, out) and stacks layers on a leading L axis. gpt_jax's rope is the
half-split form of Hugging Face LLaMA, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from gpt_jax.interop.hf_config import hf_arch
from gpt_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Spec:
  """One gpt_jax parameter read from one Hugging Face tensor (per layer when stacked)."""

  path: tuple[str, ...]  # gpt_jax param path, e.g. ("blocks", "attn", "wq")
  hf_name: str  # canonical HF name; "{l}" is the layer index when stacked
  hf_shape: tuple[int, ...]  # what config.json implies for the HF tensor
  convert: Callable[[np.ndarray], np.ndarray]  # HF layout -> gpt_jax layout (one layer)
  stacked: bool

  def name(self, layer: int | None = None) -> str:
    return self.hf_name.format(l=layer)


def _ident(x):
  return x


def _gpt2_specs(cfg: ModelConfig) -> list[Spec]:
  D, H, Q, F, V = cfg.d_model, cfg.num_heads, cfg.q_dim, cfg.ffn_dim, cfg.vocab_size
  specs = [
    Spec(("embed",), "wte.weight", (V, D), _ident, False),
    Spec(("pos_embed",), "wpe.weight", (cfg.max_seq_len, D), _ident, False),
    Spec(("final_norm", "scale"), "ln_f.weight", (D,), _ident, False),
    Spec(("final_norm", "bias"), "ln_f.bias", (D,), _ident, False),
  ]
  if not cfg.tie_embeddings:
    specs.append(Spec(("lm_head",), "lm_head.weight", (V, D), np.transpose, False))

  def qkv(i):  # c_attn's columns are [q | k | v], each H*Q wide
    return lambda w: w[..., i * D : (i + 1) * D].reshape(*w.shape[:-1], H, Q)

  layer = [
    (("attn_norm", "scale"), "ln_1.weight", (D,), _ident),
    (("attn_norm", "bias"), "ln_1.bias", (D,), _ident),
    (("mlp_norm", "scale"), "ln_2.weight", (D,), _ident),
    (("mlp_norm", "bias"), "ln_2.bias", (D,), _ident),
    (("attn", "wq"), "attn.c_attn.weight", (D, 3 * D), qkv(0)),
    (("attn", "wk"), "attn.c_attn.weight", (D, 3 * D), qkv(1)),
    (("attn", "wv"), "attn.c_attn.weight", (D, 3 * D), qkv(2)),
    (("attn", "bq"), "attn.c_attn.bias", (3 * D,), qkv(0)),
    (("attn", "bk"), "attn.c_attn.bias", (3 * D,), qkv(1)),
    (("attn", "bv"), "attn.c_attn.bias", (3 * D,), qkv(2)),
    (("attn", "wo"), "attn.c_proj.weight", (D, D), lambda w: w.reshape(H, Q, D)),
    (("attn", "bo"), "attn.c_proj.bias", (D,), _ident),
    (("mlp", "w_up"), "mlp.c_fc.weight", (D, F), _ident),
    (("mlp", "b_up"), "mlp.c_fc.bias", (F,), _ident),
    (("mlp", "w_down"), "mlp.c_proj.weight", (F, D), _ident),
    (("mlp", "b_down"), "mlp.c_proj.bias", (D,), _ident),
  ]
  return specs + [Spec(("blocks", *p), "h.{l}." + n, s, c, True) for p, n, s, c in layer]


def _llama_specs(cfg: ModelConfig) -> list[Spec]:
  D, H, K, Q, F, V = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.q_dim, cfg.ffn_dim, cfg.vocab_size
  specs = [
    Spec(("embed",), "embed_tokens.weight", (V, D), _ident, False),
    Spec(("final_norm", "scale"), "norm.weight", (D,), _ident, False),
  ]
  if not cfg.tie_embeddings:
    specs.append(Spec(("lm_head",), "lm_head.weight", (V, D), np.transpose, False))
  layer = [
    (("attn_norm", "scale"), "input_layernorm.weight", (D,), _ident),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", (D,), _ident),
    (("attn", "wq"), "self_attn.q_proj.weight", (H * Q, D), lambda w: w.T.reshape(D, H, Q)),
    (("attn", "wk"), "self_attn.k_proj.weight", (K * Q, D), lambda w: w.T.reshape(D, K, Q)),
    (("attn", "wv"), "self_attn.v_proj.weight", (K * Q, D), lambda w: w.T.reshape(D, K, Q)),
    (("attn", "wo"), "self_attn.o_proj.weight", (D, H * Q), lambda w: w.T.reshape(H, Q, D)),
    (("mlp", "w_gate"), "mlp.gate_proj.weight", (F, D), np.transpose),
    (("mlp", "w_up"), "mlp.up_proj.weight", (F, D), np.transpose),
    (("mlp", "w_down"), "mlp.down_proj.weight", (D, F), np.transpose),
  ]
  return specs + [Spec(("blocks", *p), "layers.{l}." + n, s, c, True) for p, n, s, c in layer]


def import_specs(cfg: ModelConfig) -> list[Spec]:
  """Returns one Spec per gpt_jax parameter of `cfg` (every leaf of model.abstract(cfg))."""
  return _gpt2_specs(cfg) if hf_arch(cfg) == "gpt2" else _llama_specs(cfg)


# --- export -----------------------------------------------------------------------------------

Getter = Callable[[tuple[str, ...], "int | None"], np.ndarray]  # (param path, layer or None) -> host array


def export_tensors(
  cfg: ModelConfig, get: Getter, *, with_lm_head: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (Hugging Face name, tensor) one at a time, with the base-model prefix; layers one by one.

  `get(path, layer)` returns one (layer of a) gpt_jax parameter on the host, so at most one tensor
  of the model is gathered at a time.
  """
  L, D, H, K, Q = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.q_dim
  head = with_lm_head and not cfg.tie_embeddings
  if hf_arch(cfg) == "gpt2":
    p = "transformer."
    yield p + "wte.weight", get(("embed",), None)
    yield p + "wpe.weight", get(("pos_embed",), None)
    for i in range(L):
      b = f"{p}h.{i}."
      for norm, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        yield b + hf + ".weight", get(("blocks", norm, "scale"), i)
        yield b + hf + ".bias", get(("blocks", norm, "bias"), i)
      w = [get(("blocks", "attn", k), i).reshape(D, H * Q) for k in ("wq", "wk", "wv")]
      yield b + "attn.c_attn.weight", np.concatenate(w, axis=1)
      bias = [get(("blocks", "attn", k), i).reshape(H * Q) for k in ("bq", "bk", "bv")]
      yield b + "attn.c_attn.bias", np.concatenate(bias)
      yield b + "attn.c_proj.weight", get(("blocks", "attn", "wo"), i).reshape(H * Q, D)
      yield b + "attn.c_proj.bias", get(("blocks", "attn", "bo"), i)
      yield b + "mlp.c_fc.weight", get(("blocks", "mlp", "w_up"), i)
      yield b + "mlp.c_fc.bias", get(("blocks", "mlp", "b_up"), i)
      yield b + "mlp.c_proj.weight", get(("blocks", "mlp", "w_down"), i)
      yield b + "mlp.c_proj.bias", get(("blocks", "mlp", "b_down"), i)
    yield p + "ln_f.weight", get(("final_norm", "scale"), None)
    yield p + "ln_f.bias", get(("final_norm", "bias"), None)
  else:
    p = "model."
    yield p + "embed_tokens.weight", get(("embed",), None)
    for i in range(L):
      b = f"{p}layers.{i}."
      yield b + "input_layernorm.weight", get(("blocks", "attn_norm", "scale"), i)
      yield b + "post_attention_layernorm.weight", get(("blocks", "mlp_norm", "scale"), i)
      yield b + "self_attn.q_proj.weight", get(("blocks", "attn", "wq"), i).reshape(D, H * Q).T
      yield b + "self_attn.k_proj.weight", get(("blocks", "attn", "wk"), i).reshape(D, K * Q).T
      yield b + "self_attn.v_proj.weight", get(("blocks", "attn", "wv"), i).reshape(D, K * Q).T
      yield b + "self_attn.o_proj.weight", get(("blocks", "attn", "wo"), i).reshape(H * Q, D).T
      yield b + "mlp.gate_proj.weight", get(("blocks", "mlp", "w_gate"), i).T
      yield b + "mlp.up_proj.weight", get(("blocks", "mlp", "w_up"), i).T
      yield b + "mlp.down_proj.weight", get(("blocks", "mlp", "w_down"), i).T
    yield p + "norm.weight", get(("final_norm", "scale"), None)
  if head:
    yield "lm_head.weight", get(("lm_head",), None).T
