"""Hugging Face config.json <-> ModelConfig, for the GPT-2 and LLaMA families.

Only configs whose forward pass gpt_jax reproduces exactly are accepted; anything else (another
activation, rope scaling, biases LLaMA does not have) is a ConfigError naming the config.json key,
because a silently different model is worse than none.
"""

from __future__ import annotations

from typing import Any

from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig

GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation gpt_jax uses
LLAMA_TYPES = ("llama", "mistral")  # mistral is the LLaMA layout (plus an optional sliding window)
SUPPORTED_TYPES = ("gpt2", *LLAMA_TYPES)


def _need(hf: dict, key: str, where: str = "config.json") -> Any:
  if hf.get(key) is None:
    raise ConfigError(f"{where}: key {key!r} is missing")
  return hf[key]


def _expect(hf: dict, key: str, allowed: tuple, default: Any, what: str) -> None:
  value = hf.get(key, default)
  if value not in allowed:
    raise ConfigError(f"config.json: {key}={value!r} is not supported ({what})")


def _rope_theta(hf: dict) -> float:
  """Returns the rope base; transformers 5 keeps it in rope_parameters, 4.x in rope_theta/rope_scaling."""
  scaling = hf.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ConfigError(
      f"config.json: rope_scaling={scaling!r} is not supported; gpt_jax implements plain rope only"
    )
  params = hf.get("rope_parameters") or {}
  if params.get("rope_type", params.get("type", "default")) != "default":
    raise ConfigError(
      f"config.json: rope_parameters={params!r} is not supported; gpt_jax implements plain rope only"
    )
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_type(hf: dict) -> str:
  """Returns config.json's model_type if gpt_jax supports it, else raises ConfigError naming it."""
  mt = hf.get("model_type")
  if mt not in SUPPORTED_TYPES:
    arch = hf.get("architectures")
    raise ConfigError(
      f"config.json: model_type {mt!r} (architectures {arch}) is not supported; expected one of {SUPPORTED_TYPES}"
    )
  return mt


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """Returns the ModelConfig of a Hugging Face config.json dict; overrides set other ModelConfig keys (e.g. dtype)."""
  mt = model_type(hf)
  if mt == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
      raise ConfigError(
        f"config.json: activation_function {act!r} is not supported; expected one of {GPT2_ACTIVATIONS}"
      )
    _expect(hf, "scale_attn_weights", (True,), True, "gpt_jax always scales attention by 1/sqrt(head_dim)")
    _expect(
      hf, "scale_attn_by_inverse_layer_idx", (False,), False, "no per-layer attention scaling in gpt_jax"
    )
    _expect(hf, "add_cross_attention", (False,), False, "decoder-only models only")
    d_model, heads = int(_need(hf, "n_embd")), int(_need(hf, "n_head"))
    if d_model % heads:
      raise ConfigError(f"config.json: n_head={heads} does not divide n_embd={d_model}")
    fields = dict(
      family="gpt2",
      vocab_size=int(_need(hf, "vocab_size")),
      max_seq_len=int(_need(hf, "n_positions")),
      num_layers=int(_need(hf, "n_layer")),
      num_heads=heads,
      d_model=d_model,
      d_ff=0 if int(hf.get("n_inner") or 0) in (0, 4 * d_model) else int(hf["n_inner"]),  # 0: 4 * d_model
      norm="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      pos_emb="learned",
      mlp="gelu",
      use_bias=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
  else:
    _expect(hf, "hidden_act", ("silu", "swish"), "silu", "the LLaMA MLP is SwiGLU")
    _expect(hf, "attention_bias", (False,), False, "gpt_jax's LLaMA layout has no attention biases")
    _expect(hf, "mlp_bias", (False,), False, "gpt_jax's LLaMA layout has no MLP biases")
    window = hf.get("sliding_window")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    if window is not None and int(window) < max_pos:
      raise ConfigError(
        f"config.json: sliding_window={window} is not supported (gpt_jax attends to the full context)"
      )
    rope_theta = _rope_theta(hf)
    d_model, heads = int(_need(hf, "hidden_size")), int(_need(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or 0)
    if not head_dim and d_model % heads:
      raise ConfigError(f"config.json: num_attention_heads={heads} does not divide hidden_size={d_model}")
    fields = dict(
      family="llama",
      vocab_size=int(_need(hf, "vocab_size")),
      max_seq_len=max_pos,
      num_layers=int(_need(hf, "num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      d_model=d_model,
      d_ff=int(_need(hf, "intermediate_size")),
      head_dim=0 if head_dim in (0, d_model // heads) and not d_model % heads else head_dim,
      norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      pos_emb="rope",
      rope_theta=rope_theta,
      mlp="swiglu",
      use_bias=False,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
  return ModelConfig(**{**fields, **overrides}).validate()


def hf_arch(cfg: ModelConfig) -> str:
  """Returns "gpt2" or "llama": the Hugging Face layout that computes exactly what `cfg` does.

  Decided by the behaviour keys (the `family` label is not trusted); ConfigError names the key
  that no Hugging Face layout can express.
  """
  gpt2 = (cfg.norm, cfg.pos_emb, cfg.mlp, cfg.use_bias) == ("layernorm", "learned", "gelu", True)
  llama = (cfg.norm, cfg.pos_emb, cfg.mlp, cfg.use_bias) == ("rmsnorm", "rope", "swiglu", False)
  if gpt2:
    if cfg.kv_heads != cfg.num_heads:
      raise ConfigError(f"model.num_kv_heads: GPT-2 has no grouped-query attention, got {cfg.num_kv_heads}")
    if cfg.q_dim * cfg.num_heads != cfg.d_model:
      raise ConfigError(f"model.head_dim: GPT-2 needs head_dim * num_heads == d_model, got {cfg.q_dim}")
    return "gpt2"
  if llama:
    return "llama"
  raise ConfigError(
    f"model: norm={cfg.norm}, pos_emb={cfg.pos_emb}, mlp={cfg.mlp}, use_bias={cfg.use_bias} matches neither "
    "GPT-2 (layernorm, learned, gelu, biases) nor LLaMA (rmsnorm, rope, swiglu, no biases)"
  )


def hf_config(cfg: ModelConfig, *, classifier: bool = False, bos_id=None, eos_id=None, pad_id=None) -> dict:
  """Returns the config.json dict of `cfg` as GPT2/Llama ForCausalLM (or ForSequenceClassification, 1 label)."""
  arch = hf_arch(cfg)
  common = dict(
    vocab_size=cfg.vocab_size,
    tie_word_embeddings=cfg.tie_embeddings,
    bos_token_id=bos_id,
    eos_token_id=eos_id,
    pad_token_id=pad_id,
    torch_dtype=cfg.param_dtype,
    dtype=cfg.param_dtype,
    initializer_range=cfg.init_std,
  )
  if arch == "gpt2":
    out = dict(
      architectures=["GPT2ForSequenceClassification" if classifier else "GPT2LMHeadModel"],
      model_type="gpt2",
      n_positions=cfg.max_seq_len,
      n_embd=cfg.d_model,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_inner=cfg.ffn_dim,
      activation_function="gelu_new",
      layer_norm_epsilon=cfg.norm_eps,
      # gpt_jax trains without dropout; keep the exported model the same function in train mode too.
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      summary_first_dropout=0.0,
      scale_attn_weights=True,
      **common,
    )
  else:
    out = dict(
      architectures=["LlamaForSequenceClassification" if classifier else "LlamaForCausalLM"],
      model_type="llama",
      hidden_size=cfg.d_model,
      intermediate_size=cfg.ffn_dim,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads,
      head_dim=cfg.q_dim,
      hidden_act="silu",
      max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps,
      # Both spellings: transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters.
      rope_theta=cfg.rope_theta,
      rope_scaling=None,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      attention_bias=False,
      mlp_bias=False,
      attention_dropout=0.0,
      **common,
    )
  if classifier:
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  return out
