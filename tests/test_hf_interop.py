"""Hugging Face interop: logit parity of imports, round trips through transformers, bad inputs, tokenizers."""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax import runs, sharding
from gpt_jax import tokenizers as tok_lib
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.interop import hf

torch = pytest.importorskip(
  "torch", reason="torch (CPU build, test-only) is needed to build reference models"
)
transformers = pytest.importorskip(
  "transformers", reason="transformers (test-only) is needed for parity tests"
)

MESH = {"data": 1, "fsdp": 4, "tensor": 2}  # 8 fake CPU devices: params really get sharded on import


def _gpt2(tie=True):
  cfg = transformers.GPT2Config(
    vocab_size=97,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    tie_word_embeddings=tie,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
  )
  return transformers.GPT2LMHeadModel(cfg)


def _llama(tie=False, head_dim=None):
  cfg = transformers.LlamaConfig(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=tie,
    rope_theta=5000.0,
    rms_norm_eps=1e-5,
    head_dim=head_dim,
    bos_token_id=1,
    eos_token_id=2,
  )
  return transformers.LlamaForCausalLM(cfg)


MODELS = {
  "gpt2_tied": lambda: _gpt2(True),
  "gpt2_untied": lambda: _gpt2(False),
  "llama_gqa_untied": lambda: _llama(False),
  "llama_gqa_tied_headdim": lambda: _llama(True, head_dim=8),  # 4 heads x 8 != 64: explicit head_dim
}


def _build(name, seed=0):
  """A random HF model in eval mode, fp32 eager attention, with every weight perturbed (norms, biases too)."""
  torch.manual_seed(seed)
  m = MODELS[name]()
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  m.config._attn_implementation = "eager"
  return m.eval()


def _save(m, path, **kw):
  m.save_pretrained(path, safe_serialization=True, **kw)
  return str(path)


def _tokens(vocab, shape=(2, 16), seed=1):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _hf_logits(m, tokens):
  with torch.no_grad():
    return m(torch.from_numpy(tokens).long()).logits.numpy()


def _random_params(cfg, seed=0):
  """Random params of cfg's shapes, made with numpy (much faster than initializing the module on CPU)."""
  rng = np.random.default_rng(seed)
  _, shapes, _ = model_lib.abstract(cfg)
  return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _jax_out(cfg, params, tokens):
  graphdef, _, _ = model_lib.abstract(cfg)
  return model_lib.apply(graphdef, params, jax.numpy.asarray(tokens))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(MESH)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, mesh):
  """name -> the reference HF model, its import (sharded on the mesh) and the gpt_jax forward; built once."""
  cache = {}

  def get(name):
    if name not in cache:
      d = tmp_path_factory.mktemp(name)
      ref = _build(name)
      cfg = hf.import_hf(_save(ref, d / "hf"), str(d / "ckpt"), mesh_cfg=MESH)
      loaded_cfg, params = hf.load_imported(str(d / "ckpt"), mesh)
      tokens = _tokens(cfg.vocab_size - 1)  # never vocab-1: the reward test's pad id
      out = _jax_out(cfg, params, tokens)
      cache[name] = types.SimpleNamespace(
        ref=ref, dir=d, cfg=cfg, loaded_cfg=loaded_cfg, params=params, tokens=tokens, out=out
      )
    return cache[name]

  return get


@pytest.mark.parametrize("name", list(MODELS))
def test_import_parity_and_export_round_trip(name, tmp_path, imported):
  m = imported(name)
  ref, cfg, params, tokens = m.ref, m.cfg, m.params, m.tokens
  assert sorted(os.listdir(m.dir / "ckpt")) == ["_INTEGRITY.json", "model_config.json", "state"]
  assert m.loaded_cfg == cfg
  # Params land sharded by the rules: model width over fsdp, ffn width over tensor.
  assert params["blocks"]["mlp"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

  want = _hf_logits(ref, tokens)
  got = np.asarray(m.out.logits)
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= 1e-4

  out = tmp_path / "export"
  files = hf.export_hf(cfg, params, str(out))
  assert "model.safetensors" in files
  back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
  assert type(back) is type(ref)
  ref_sd, back_sd = ref.state_dict(), back.state_dict()
  for k, v in ref_sd.items():
    assert torch.equal(v, back_sd[k]), k
  np.testing.assert_array_equal(_hf_logits(back, tokens), want)


def test_import_matches_direct_load_and_bad_output_dir_is_kept(tmp_path):
  """load_hf_params without a mesh equals the checkpointed import; an occupied output is refused, untouched."""
  ref = _build("llama_gqa_untied")
  hf_dir = _save(ref, tmp_path / "hf")
  cfg = hf.config_from_hf(hf.read_hf_config(hf_dir))
  params = hf.load_hf_params(hf_dir, cfg)
  np.testing.assert_array_equal(
    np.asarray(params["blocks"]["attn"]["wk"][1]),
    ref.model.layers[1].self_attn.k_proj.weight.detach().numpy().T.reshape(64, 2, 16),
  )
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("mine")
  with pytest.raises(CheckpointError, match="occupied already exists and is not empty"):
    hf.import_hf(hf_dir, str(occupied))
  assert (occupied / "keep.txt").read_text() == "mine"


def test_sharded_bf16_and_pytorch_bin_inputs(tmp_path, mesh):
  ref = _build("llama_gqa_tied_headdim")
  cfg = hf.config_from_hf(ref.config.to_dict())
  base = hf.load_hf_params(_save(ref, tmp_path / "single"), cfg)
  # Sharded safetensors with an index.
  sharded = _save(ref, tmp_path / "sharded", max_shard_size="40KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  got = hf.load_hf_params(sharded, cfg, mesh=mesh)
  jax.tree.map(np.testing.assert_array_equal, got, base)
  # PyTorch pickle.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
  jax.tree.map(np.testing.assert_array_equal, hf.load_hf_params(str(bin_dir), cfg), base)
  # bfloat16 weights (numpy has no bfloat16: read through the raw safetensors layout).
  bf16 = _save(_build("llama_gqa_tied_headdim").to(torch.bfloat16), tmp_path / "bf16")
  want = ref.model.layers[0].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy().T
  got = hf.load_hf_params(bf16, cfg)
  np.testing.assert_array_equal(np.asarray(got["blocks"]["mlp"]["w_down"][0]), want)
  # Export in several shards reloads in transformers.
  out = tmp_path / "export"
  files = hf.export_hf(cfg, base, str(out), max_shard_bytes=30_000)
  assert "model.safetensors.index.json" in files and len(files) > 3
  back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_array_equal(_hf_logits(back, tokens), _hf_logits(ref, tokens))


@pytest.mark.parametrize("name", ["gpt2_tied", "llama_gqa_untied"])
def test_reward_head_exports_as_sequence_classifier(name, tmp_path, imported):
  m = imported(name)
  cfg, params, tokens = m.cfg, m.params, m.tokens
  rng = np.random.default_rng(3)
  head = {"w": rng.normal(size=(cfg.d_model,)).astype(np.float32), "b": np.float32(0.37)}
  pad = cfg.vocab_size - 1  # absent from the tokens, so HF scores the last token of each row
  want = np.asarray(m.out.hidden)[:, -1] @ head["w"] + head["b"]

  out = tmp_path / "rm"
  hf.export_hf(cfg, params, str(out), reward_head=head, pad_id=pad)
  config = json.loads((out / "config.json").read_text())
  rm = transformers.AutoModelForSequenceClassification.from_pretrained(
    str(out), attn_implementation="eager"
  ).eval()
  assert type(rm).__name__.endswith("ForSequenceClassification") and rm.config.num_labels == 1
  with torch.no_grad():
    score = rm(torch.from_numpy(tokens).long()).logits.numpy()[:, 0]
  # GPT-2 carries the bias exactly (folded into the final LayerNorm); LLaMA's score has no bias slot.
  score = score + config.get("gpt_jax_score_bias", 0.0)
  assert ("gpt_jax_score_bias" in config) == name.startswith("llama")
  np.testing.assert_allclose(score, want, atol=1e-4, rtol=0)


# --- bad inputs ---------------------------------------------------------------------------------


def _write_config(path, config):
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  return str(path)


@pytest.mark.parametrize(
  "config, match",
  [
    ({"model_type": "bert", "architectures": ["BertModel"]}, "model_type 'bert'.*not supported"),
    ({"model_type": "gpt2", "activation_function": "relu", "n_embd": 32}, "activation_function 'relu'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias=True"),
    ({"model_type": "llama", "hidden_size": 64}, "'num_attention_heads' is missing"),
  ],
)
def test_unsupported_configs_are_named(tmp_path, config, match):
  hf_dir = _write_config(tmp_path / "m", config)
  with pytest.raises(ConfigError, match=match):
    hf.import_hf(hf_dir, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_missing_or_mismatched_weights_name_the_culprit(tmp_path):
  from safetensors.numpy import load_file, save_file

  ref = _build("gpt2_tied")
  hf_dir = tmp_path / "hf"
  _save(ref, hf_dir)
  config = hf.read_hf_config(str(hf_dir))

  no_weights = _write_config(tmp_path / "no_weights", config)
  with pytest.raises(CheckpointError, match="no weights"):
    hf.import_hf(no_weights, str(tmp_path / "o1"))

  lost_shard = _write_config(tmp_path / "lost_shard", config)
  index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
  (tmp_path / "lost_shard" / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors listed in .* is missing"):
    hf.import_hf(lost_shard, str(tmp_path / "o2"))

  tensors = load_file(str(hf_dir / "model.safetensors"))
  bad_shape = _write_config(tmp_path / "bad_shape", config)
  save_file(
    {**tensors, "transformer.h.1.mlp.c_fc.weight": np.zeros((32, 64), np.float32)},
    os.path.join(bad_shape, "model.safetensors"),
    metadata={"format": "pt"},
  )
  with pytest.raises(
    CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(32, 64\) but config.json implies \(32, 128\)"
  ):
    hf.import_hf(bad_shape, str(tmp_path / "o3"))

  missing = _write_config(tmp_path / "missing", config)
  del tensors["transformer.h.0.attn.c_proj.bias"]
  save_file(tensors, os.path.join(missing, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"tensor h\.0\.attn\.c_proj\.bias \(blocks/attn/bo\) is missing"):
    hf.import_hf(missing, str(tmp_path / "o4"))
  for i in range(1, 5):
    assert not (tmp_path / f"o{i}").exists()


def test_export_refuses_inexpressible_configs_and_occupied_dirs(tmp_path):
  cfg = model_lib.preset("tiny_gpt2", num_layers=1, d_model=32, vocab_size=64, num_kv_heads=2)
  params = _random_params(cfg)
  with pytest.raises(ConfigError, match="model.num_kv_heads: GPT-2 has no grouped-query attention"):
    hf.export_hf(cfg, params, str(tmp_path / "a"))
  cfg = model_lib.preset("tiny", num_layers=1, d_model=32, vocab_size=64, mlp="gelu")
  with pytest.raises(ConfigError, match="matches neither GPT-2"):
    hf.export_hf(cfg, _random_params(cfg), str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  occupied = tmp_path / "c"
  occupied.mkdir()
  (occupied / "config.json").write_text("{}")
  cfg = model_lib.preset("tiny", num_layers=1, d_model=32, vocab_size=64)
  with pytest.raises(CheckpointError, match="already has config.json"):
    hf.export_hf(cfg, _random_params(cfg), str(occupied))
  assert (occupied / "config.json").read_text() == "{}"


# --- tokenizers ---------------------------------------------------------------------------------

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Byte-level BPE: naïve café, 東京, emoji 🙂!"] * 20


def byte_level_bpe(texts, vocab_size: int):
  """A GPT-2-style byte-level BPE (special token <|endoftext|>) trained on `texts` with `tokenizers`."""
  tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers package ships with transformers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer)
  return tok


def test_byte_level_bpe_tokenizer(tmp_path):
  tok = byte_level_bpe(TEXTS, 300)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))

  wrapped = tok_lib.load_hf_tokenizer(str(tmp_path))
  assert (
    wrapped.vocab_size == tok.get_vocab_size() and wrapped.eos_id == tok.token_to_id("<|endoftext|>") == 0
  )
  for text in TEXTS[:2] + ["unseen wörds ✓"]:
    ids = wrapped.encode(text)
    assert ids == tok.encode(text).ids
    assert wrapped.decode(ids) == text
  assert wrapped.decode([*wrapped.encode("a b"), wrapped.eos_id]) == "a b"
  assert wrapped.encode_batch(TEXTS[:3]) == [tok.encode(t).ids for t in TEXTS[:3]]


def test_sentencepiece_tokenizer_loads_and_exports(tmp_path):
  import sentencepiece as spm

  (tmp_path / "corpus.txt").write_text("\n".join(TEXTS))
  spm.SentencePieceTrainer.train(
    input=str(tmp_path / "corpus.txt"),
    model_prefix=str(tmp_path / "sp"),
    vocab_size=320,
    model_type="bpe",
    byte_fallback=True,
    hard_vocab_limit=False,
    bos_id=1,
    eos_id=2,
    unk_id=0,
    minloglevel=2,
  )
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  cfg = model_lib.preset("tiny", num_layers=1, d_model=32, vocab_size=sp.get_piece_size() + 4)
  out = tmp_path / "export"
  files = hf.export_hf(
    cfg, _random_params(cfg), str(out), tokenizer_model=str(tmp_path / "sp.model"), eos_id=2
  )
  assert "tokenizer.model" in files
  wrapped = tok_lib.load_hf_tokenizer(str(out))
  assert (wrapped.vocab_size, wrapped.eos_id, wrapped.bos_id) == (sp.get_piece_size(), 2, 1)
  assert wrapped.encode(TEXTS[0]) == sp.encode(TEXTS[0])
  assert wrapped.encode_batch(TEXTS[:3], num_threads=2) == [sp.encode(t) for t in TEXTS[:3]]
  assert wrapped.decode(wrapped.encode(TEXTS[0])) == TEXTS[0]
  # An import carries the tokenizer along.
  hf.import_hf(str(out), str(tmp_path / "ckpt"))
  carried = tok_lib.load_hf_tokenizer(str(tmp_path / "ckpt" / "hf_tokenizer"))
  assert carried.encode(TEXTS[1]) == sp.encode(TEXTS[1])
  with pytest.raises(DataError, match="neither tokenizer.model nor tokenizer.json"):
    tok_lib.load_hf_tokenizer(str(tmp_path))
  shutil.rmtree(out)


def test_cli_exports_imports_and_training_workdirs(tmp_path, imported):
  import dataclasses

  from gpt_jax import checkpoint as ckpt_lib
  from gpt_jax.interop import cli

  m = imported("gpt2_tied")
  want = _hf_logits(m.ref, m.tokens)
  logs = []
  files = cli.cmd_export(workdir=str(m.dir / "ckpt"), out_dir=str(tmp_path / "a"), log_fn=logs.append)
  assert files == ["model.safetensors", "config.json"] and "exported" in logs[0]
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"), attn_implementation="eager")
  np.testing.assert_array_equal(_hf_logits(back.eval(), m.tokens), want)

  # A training workdir: config.json with a "model" section, params in the newest checkpoint's state.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"model": dataclasses.asdict(m.cfg)}))
  with ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(7, {"params": m.params, "step": np.int32(7)}, extra={"stage": "sft"})
  cli.cmd_export(workdir=str(workdir), out_dir=str(tmp_path / "b"), log_fn=logs.append)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), attn_implementation="eager")
  np.testing.assert_array_equal(_hf_logits(back.eval(), m.tokens), want)

  cfg = cli.cmd_import(hf_dir=str(tmp_path / "b"), out_dir=str(tmp_path / "c"), log_fn=logs.append)
  assert cfg == m.cfg and "imported" in logs[-1]
  with pytest.raises(CheckpointError, match=r"--workdir: .* holds no valid checkpoint"):
    cli.cmd_export(workdir=str(tmp_path), out_dir=str(tmp_path / "d"))


# --- finetuning an import (train.init_from=<import dir>) --------------------------------------------

CHAT = [
  {"role": "system", "content": "Answer tersely."},
  {"role": "user", "content": "Add 12 and 30."},
  {"role": "assistant", "content": "42"},
  {"role": "user", "content": "Uppercase: dog"},
  {"role": "assistant", "content": "DOG"},
]


def _corpus():
  from gpt_jax.data import tasks

  return [f"{t.question} {t.answer}" for t in tasks.make_tasks("train", 300, 0)] + TEXTS


def _gpt2_with_tokenizer(hf_dir):
  """A tiny GPT-2 with its own byte-level BPE (eos <|endoftext|>, no bos, as GPT-2 without a bos_token)."""
  tok = byte_level_bpe(_corpus(), 320)
  eos = tok.token_to_id("<|endoftext|>")
  cfg = transformers.GPT2Config(
    vocab_size=tok.get_vocab_size(),
    n_positions=128,
    n_embd=32,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=eos,
    eos_token_id=eos,
  )
  torch.manual_seed(0)
  _save(transformers.GPT2LMHeadModel(cfg), hf_dir)
  tok.save(str(hf_dir / "tokenizer.json"))
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def _llama_with_tokenizer(hf_dir):
  """A tiny LLaMA with its own SentencePiece model (<s> = 1, </s> = 2), trained in memory."""
  import io

  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_corpus()),
    model_writer=model,
    vocab_size=400,
    model_type="bpe",
    byte_fallback=True,
    hard_vocab_limit=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    minloglevel=2,
  )
  vocab = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
  cfg = transformers.LlamaConfig(
    vocab_size=vocab,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
  )
  torch.manual_seed(0)
  _save(transformers.LlamaForCausalLM(cfg), hf_dir)
  (hf_dir / "tokenizer.model").write_bytes(model.getvalue())
  (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def chat_import(tmp_path_factory):
  """family -> an import-hf directory of a tiny model that has a tokenizer; built once."""
  cache = {}

  def get(family):
    if family not in cache:
      d = tmp_path_factory.mktemp(f"chat_{family}")
      (d / "hf").mkdir()
      {"gpt2": _gpt2_with_tokenizer, "llama": _llama_with_tokenizer}[family](d / "hf")
      hf.import_hf(str(d / "hf"), str(d / "ckpt"), mesh_cfg={"data": 1, "fsdp": -1, "tensor": 1})
      cache[family] = str(d / "ckpt")
    return cache[family]

  return get


def _sft_cfg(import_dir, **over):
  from gpt_jax import config as config_lib

  with open(os.path.join(import_dir, hf.MODEL_CONFIG)) as f:
    model = {f"model.{k}": v for k, v in json.load(f).items() if not k.startswith("_")}
  overrides = {
    **model,
    "train.steps": 2,
    "train.global_batch": 8,
    "train.seq_len": 64,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.eval_batches": 0,
    "train.log_every": 1,
    "train.progress_bar": False,
    "train.async_checkpoint": False,
    "train.init_from": import_dir,
    "optim.warmup_steps": 1,
    "optim.decay_steps": 2,
    "metrics.tensorboard": False,
    "tasks.train": 64,
    "tasks.eval": 8,
    "sft.eval_samples": 0,
    **over,
  }
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return config_lib.load(os.path.join(root, "experiments", "sft.py:tiny"), overrides)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sft_starts_from_an_import_in_its_own_vocabulary(family, chat_import, tmp_path):
  from gpt_jax import metrics
  from gpt_jax.data import sft as sft_data
  from gpt_jax.interop import cli
  from gpt_jax.stages import rm, sft

  import_dir = chat_import(family)
  workdir = str(tmp_path / "sft")
  # GPT-2 also runs the greedy-accuracy eval (sampling stops at the model's eos = end of turn).
  over = {"train.eval_batches": 1, "sft.eval_samples": 4, "sft.max_new_tokens": 4, "sft.sample_batch": 8}
  cfg_ = _sft_cfg(import_dir, **(over if family == "gpt2" else {}))
  result = sft.run(cfg_, workdir, log_fn=lambda *a: None)
  if family == "gpt2":
    assert 0.0 <= result.eval["accuracy"] <= 1.0

  # The workdir's tokenizer is the import's, behind the chat adapter, in the model's own vocabulary.
  tok = tok_lib.load(workdir)
  assert isinstance(tok, tok_lib.ChatTokenizer)
  assert tok.sha256() == tok_lib.load(import_dir).sha256()
  assert sorted(os.listdir(os.path.join(workdir, tok_lib.HF_TOKENIZER_DIR))) == sorted(
    os.listdir(os.path.join(import_dir, tok_lib.HF_TOKENIZER_DIR))
  )
  eos = {"gpt2": "<|endoftext|>", "llama": "</s>"}[family]
  assert tok.eos_id == tok.hf.token_to_id(eos) == tok.special_id("end_of_turn") == tok.pad_id
  assert tok.bos_id == (tok.eos_id if family == "gpt2" else 1)  # GPT-2 has no bos: eos opens the text
  texts = ("Add 12 and 30. 42", "Reverse: a b c", TEXTS[1], f"text that names {eos}")
  for text in texts:
    assert tok.decode(tok.encode(text)) == text
  assert tok.kind == "hf" and tok.encode_batch(list(texts)) == [tok.encode(t) for t in texts]
  assert tok.eos_id not in tok.encode(f"a message cannot end its turn with {eos} in it")
  ids, mask = tok.render_chat(CHAT)
  assert len(ids) == len(mask) and ids[0] == tok.bos_id and mask[0] == 0
  learned = [i for i, m in zip(ids, mask) if m]
  assert learned == [*tok.encode("42"), tok.eos_id, *tok.encode("DOG"), tok.eos_id]
  assert ids[: 1 + len(tok.marker_ids("system"))] == [tok.bos_id, *tok.encode("<|system|>\n")]
  prompt = tok.render_chat(CHAT[:2], add_generation_prompt=True)[0]
  assert prompt[-len(tok.marker_ids("assistant")) :] == tok.encode("<|assistant|>\n")
  with pytest.raises(DataError, match="role 'user' has no token of its own"):
    tok.special_id("user")

  # Step 1's loss is the imported params' loss on the first batch: the run started from the import.
  losses = {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r}
  assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
  convs = sft_data.read_conversations(os.path.join(workdir, "data", "train.jsonl"))
  enc = sft_data.encode(convs, tok, 64, "drop", "check")
  batch = sft_data.SftLoader(enc, global_batch=8, seq_len=64, sharding=None).host_batch()
  cfg, params = hf.load_imported(import_dir)
  graphdef, _, _ = model_lib.abstract(cfg)
  logits = model_lib.apply(graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"]).logits
  from gpt_jax.losses import next_token_xent

  loss_sum, weight, _ = next_token_xent(logits, batch["targets"], batch["loss_mask"])
  np.testing.assert_allclose(losses[1], float(loss_sum) / float(weight), rtol=2e-5)

  # Later stages read the same adapter: a reward-model workdir made from this SFT workdir, and export.
  rm_dir = str(tmp_path / "rm")
  rm_tok = runs.install_tokenizer(runs.open(workdir), rm_dir, lambda *a: None)
  assert rm_tok.sha256() == tok.sha256() and tok_lib.load(rm_dir).sha256() == tok.sha256()
  for require_sft in (False, True):  # an import has the SFT model's shape but is no SFT run
    rm_cfg = rm.default_config()
    rm_cfg.model = cfg_.model
    rm_cfg.train.init_from = import_dir
    rm_cfg.rm.require_sft = require_sft
    if require_sft:
      with pytest.raises(CheckpointError, match="is a run of stage 'import', expected 'sft'"):
        rm.open_init(rm_cfg)
    else:
      assert rm.open_init(rm_cfg).imported
  if family == "gpt2":
    files = cli.cmd_export(workdir=workdir, out_dir=str(tmp_path / "export"), log_fn=lambda *a: None)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_id


def test_sft_from_an_import_of_another_shape_names_the_key(chat_import, tmp_path):
  from gpt_jax.stages import sft

  import_dir = chat_import("gpt2")
  workdir = tmp_path / "w"
  with pytest.raises(CheckpointError, match=r"model.d_model: 64 differs from 32 in .* \(an import\)"):
    sft.run(_sft_cfg(import_dir, **{"model.d_model": 64}), str(workdir))
  assert not os.path.exists(workdir / "config.json")  # refused before anything was written
  # A value that derives the same shape is no difference: d_ff 0 means 4 * d_model = 128.
  runs.check_model(
    config_lib.to_dict(_sft_cfg(import_dir, **{"model.d_ff": 128}).model), runs.open(import_dir), "x"
  )
