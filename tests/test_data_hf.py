"""Pretraining data with a Hugging Face tokenizer (a byte-level BPE the test trains with `tokenizers`):
shards equal the library's own encoding, resumes are bitwise, kind mismatches are refused; and
continued pretraining from a gpt_jax run and from an imported GPT-2, exported back to transformers."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import metrics, runs
from gpt_jax import model as model_lib
from gpt_jax import tokenizers as tok_lib
from gpt_jax.data import prepare, source_config
from gpt_jax.data.shards import split_documents
from gpt_jax.data.sources import iter_documents, parse_sources, resolve_files
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.stages import pretrain
from tests.helpers import tiny_config

tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers package ships with transformers")

QUIET = {"log": lambda *_: None}
FORGED = ["a document that names <|endoftext|> in its text", "plain text, café 東京 🙂"] * 4


def _hf_cfg(bpe_dir, root, **over):
  """The tiny pretraining config, its data tokenized with the test's BPE, plus a small jsonl source
  whose documents name the end-of-text token in their text."""
  forged = os.path.join(root, "forged.jsonl")
  if not os.path.exists(forged):
    with open(forged, "w") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in FORGED)
  cfg = tiny_config(**{"data.tokenizer.kind": "hf", "data.tokenizer.path": bpe_dir, **over})
  with cfg.unlocked():
    cfg.data.sources.forged = source_config(forged, "jsonl", 0.05)
  return cfg


def _budget(cfg):
  tokens = int(cfg.train.global_batch) * int(cfg.train.seq_len)
  return {"token_budget": tokens * int(cfg.train.steps), "tokens_per_batch": tokens}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """(directory of a GPT-2-style byte-level BPE trained on the tiny corpus, the data root)."""
  root = tmp_path_factory.mktemp("hf_data")
  cfg = tiny_config()
  docs = [d for s in parse_sources(cfg.data.sources) for d in iter_documents(s, resolve_files(s))]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(docs, trainer)
  d = root / "bpe"
  d.mkdir()
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return str(d), str(root)


@pytest.fixture(scope="module")
def hf_prepared(bpe):
  """A workdir holding the tiny corpus tokenized with the BPE (copy it before changing it)."""
  bpe_dir, root = bpe
  cfg = _hf_cfg(bpe_dir, root)
  wd = os.path.join(root, "prepared")
  return cfg, wd, prepare(cfg.data, wd, **_budget(cfg), **QUIET)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _snapshot(wd):
  out = {}
  for r, _, files in os.walk(wd):
    for f in files:
      with open(os.path.join(r, f), "rb") as fh:
        out[os.path.relpath(os.path.join(r, f), wd)] = fh.read()
  return out


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r}


def test_shards_equal_the_tokenizers_encoding(bpe, hf_prepared):
  bpe_dir, _ = bpe
  cfg, wd, p = hf_prepared
  ref = tokenizers.Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
  # Documents are text: one that names the end-of-text token encodes it as text (tiktoken's
  # encode_ordinary in nanoGPT's FineWeb script, and the ChatTokenizer's encode).
  ref.encode_special_tokens = True
  eot = ref.token_to_id("<|endoftext|>")
  tok = p.tokenizer
  assert isinstance(tok, tok_lib.ChatTokenizer) and tok.eos_id == eot
  # The tokenizer files are in the workdir, where every later stage reads them.
  assert tok_lib.load(wd).sha256() == tok.sha256() == tok_lib.load_chat_tokenizer(bpe_dir).sha256()
  assert sorted(os.listdir(os.path.join(wd, tok_lib.HF_TOKENIZER_DIR))) == [
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  for split in ("train", "eval"):
    m = p.manifest[split]
    assert (m["tokenizer_kind"], m["tokenizer_sha256"], m["eot_id"]) == ("hf", tok.sha256(), eot)
    for src in parse_sources(cfg.data.sources):
      entry = m["sources"][src.name]
      stream = np.concatenate(
        [np.fromfile(os.path.join(wd, "shards", split, r["file"]), np.uint16) for r in entry["shards"]]
        or [np.zeros(0, np.uint16)]
      )
      docs = list(split_documents(src, resolve_files(src), split, float(cfg.data.eval_fraction)))
      want = [ref.encode(d, add_special_tokens=False).ids + [eot] for d in docs]
      np.testing.assert_array_equal(stream, np.concatenate(want) if want else np.zeros(0))
  # One eot per document, none forged by the text.
  forged = p.manifest["train"]["sources"]["forged"]
  ids = np.fromfile(os.path.join(wd, "shards", "train", forged["shards"][0]["file"]), np.uint16)
  assert int((ids == eot).sum()) == forged["documents"]
  ref_ids = ref.encode(FORGED[0], add_special_tokens=False).ids
  assert eot not in ref_ids and ref_ids == tok.encode(FORGED[0])


def test_other_tokenizer_kind_or_file_is_refused(bpe, hf_prepared, prepared_dir, tmp_path):
  bpe_dir, root = bpe
  cfg, wd0, _ = hf_prepared
  wd = _copy(wd0, tmp_path / "wd")
  before = _snapshot(wd)
  sp = cfg.copy_and_resolve_references()
  sp.data.tokenizer.kind, sp.data.tokenizer.path = "sentencepiece", ""
  with pytest.raises(
    DataError, match=r"data.tokenizer.kind: .* holds a hf tokenizer .* asks for 'sentencepiece'"
  ):
    prepare(sp.data, wd, **_budget(cfg), **QUIET)
  # A SentencePiece workdir asked for the BPE.
  sp_wd = _copy(prepared_dir, tmp_path / "sp")
  with pytest.raises(DataError, match=r"holds a sentencepiece tokenizer .* the config asks for 'hf'"):
    prepare(cfg.data, sp_wd, **_budget(cfg), **QUIET)
  # Another BPE in the same directory layout: the workdir's copy differs.
  other = tmp_path / "other_bpe"
  shutil.copytree(bpe_dir, other)
  (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "x": 1}))
  changed = cfg.copy_and_resolve_references()
  changed.data.tokenizer.path = str(other)
  with pytest.raises(DataError, match=r"tokenizer .*hf_tokenizer differs from data.tokenizer.path="):
    prepare(changed.data, wd, **_budget(cfg), **QUIET)
  # Shards of another kind of tokenizer: the manifest names both.
  man = os.path.join(wd, "shards", "eval", "manifest.json")
  with open(man) as f:
    m = json.load(f)
  m["tokenizer_kind"] = "sentencepiece"
  with open(man, "w") as f:
    json.dump(m, f)
  before = _snapshot(wd)
  with pytest.raises(
    DataError, match=r"built with the sentencepiece tokenizer \w{12}, not the hf tokenizer .*hf_tokenizer"
  ):
    prepare(cfg.data, wd, **_budget(cfg), **QUIET)
  assert _snapshot(wd) == before
  with pytest.raises(ConfigError, match=r"data.tokenizer.path: required with data.tokenizer.kind='hf'"):
    pretrain.validate(tiny_config(**{"data.tokenizer.kind": "hf"}))


def test_pretrains_and_resumes_bitwise_then_continues(bpe, hf_prepared, tmp_path):
  bpe_dir, root = bpe
  _, wd0, _ = hf_prepared
  whole, split = _copy(wd0, tmp_path / "whole"), _copy(wd0, tmp_path / "split")
  a = pretrain.run(_hf_cfg(bpe_dir, root), whole, log_fn=lambda *a: None)
  pretrain.run(_hf_cfg(bpe_dir, root, **{"train.steps": 3}), split, log_fn=lambda *a: None)
  b = pretrain.run(_hf_cfg(bpe_dir, root), split, log_fn=lambda *a: None)
  assert b.resumed_from == 3
  la, lb = _losses(whole), _losses(split)
  assert [la[s] for s in range(1, 7)] == [lb[s] for s in range(1, 7)]
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(whole, "data_summary.json")) as f:
    summary = json.load(f)["tokenizer"]
  assert summary["kind"] == "hf" and summary["special_tokens"] == {
    "bos": 0,
    "eos": 0,
    "pad": 0,
    "end_of_turn": 0,
  }
  # A later stage reads the same tokenizer, chat template and all, though it has no chat tokens.
  sft_tok = runs.install_tokenizer(runs.open(whole), str(tmp_path / "sft"), lambda *a: None)
  assert sft_tok.sha256() == a_tok_sha(whole)
  ids, mask = sft_tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
  assert [i for i, k in zip(ids, mask) if k] == [*sft_tok.encode("ok"), sft_tok.eos_id]

  # Continued pretraining from that run: its weights (lr 0 keeps them), its tokenizer, a fresh optimizer.
  cont = str(tmp_path / "cont")
  over = {"train.init_from": whole, "train.steps": 1, "optim.lr_peak": 0.0, "optim.warmup_steps": 0}
  c = pretrain.run(tiny_config(**over), cont, log_fn=lambda *a: None)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert tok_lib.load(cont).sha256() == a_tok_sha(whole)
  assert not os.path.exists(os.path.join(cont, tok_lib.SENTENCEPIECE_DIR))  # nothing trained
  with open(os.path.join(cont, "shards", "train", "manifest.json")) as f:
    assert json.load(f)["tokenizer_kind"] == "hf"


def a_tok_sha(workdir):
  return tok_lib.load(workdir).sha256()


def test_continued_pretraining_is_checked_before_anything_is_built(tmp_path):
  from gpt_jax import checkpoint as ckpt_lib

  src = tmp_path / "src"  # a pretraining run's checkpoint: only its record is read before the refusal
  model = config_lib.to_dict(tiny_config().model)
  with ckpt_lib.Checkpointer(str(src / "checkpoints")) as ck:
    ck.save(
      1,
      {"params": {"embed": np.zeros((4, 4), np.float32)}},
      extra={"stage": "pretrain", "config": {"model": model}},
    )
  wd = tmp_path / "cont"
  with pytest.raises(CheckpointError, match=r"model.d_model: 96 differs from 64 in .*src \(stage 'pretrain'"):
    pretrain.run(
      tiny_config(**{"train.init_from": str(src), "model.d_model": 96}), str(wd), log_fn=lambda *a: None
    )
  with pytest.raises(
    ConfigError, match=r"data.tokenizer.path: .* train.init_from=.* brings its own tokenizer"
  ):
    pretrain.validate(tiny_config(**{"train.init_from": str(src), "data.tokenizer.path": "x.model"}))
  assert not os.path.exists(wd / "shards") and not os.path.exists(wd / "tokenizer")


# --- continued pretraining of an imported GPT-2 ------------------------------------------------------


def test_imported_gpt2_pretrains_further_and_exports(bpe, tmp_path):
  torch = pytest.importorskip("torch", reason="torch (CPU build, test-only) builds the reference model")
  transformers = pytest.importorskip("transformers", reason="transformers (test-only) builds the model")
  from gpt_jax.interop import cli, hf

  bpe_dir, root = bpe
  vocab = tokenizers.Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json")).get_vocab_size()
  eos = 0
  hf_dir = tmp_path / "hf"
  gpt2 = transformers.GPT2Config(
    vocab_size=vocab,
    n_positions=64,
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
  transformers.GPT2LMHeadModel(gpt2).save_pretrained(str(hf_dir), safe_serialization=True)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(os.path.join(bpe_dir, name), hf_dir / name)
  imported = str(tmp_path / "import")
  hf.import_hf(str(hf_dir), imported, mesh_cfg={"data": 1, "fsdp": -1, "tensor": 1})

  with open(os.path.join(imported, hf.MODEL_CONFIG)) as f:
    model = {f"model.{k}": v for k, v in json.load(f).items() if not k.startswith("_")}
  over = {
    **model,
    "train.init_from": imported,
    "train.steps": 8,
    "train.eval_every": 8,
    "train.checkpoint_every": 8,
    "optim.lr_peak": 1e-2,
  }
  wd = str(tmp_path / "cont")
  out = pretrain.run(tiny_config(**over), wd, log_fn=lambda *a: None)
  losses = _losses(wd)
  assert sorted(losses) == list(range(1, 9))
  assert np.mean([losses[s] for s in (6, 7, 8)]) < losses[1] - 0.3
  assert tok_lib.load(wd).sha256() == tok_lib.load(imported).sha256()

  files = cli.cmd_export(workdir=wd, out_dir=str(tmp_path / "export"), log_fn=lambda *a: None)
  assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
  back = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path / "export"), attn_implementation="eager"
  )
  tokens = np.random.default_rng(0).integers(0, vocab, (2, 16)).astype(np.int32)
  with torch.no_grad():
    want = back.eval()(torch.from_numpy(tokens).long()).logits.numpy()
  graphdef, _, _ = model_lib.abstract(runs.open(wd).model_config())
  params = jax.device_get(out.params)
  got = np.asarray(model_lib.apply(graphdef, params, jax.numpy.asarray(tokens)).logits)
  assert np.max(np.abs(got - want)) <= 1e-4
