"""Data configs from the command line (`--config.data=FILE.py:ARG`), the tokenizer keys, and `describe`.

Through the CLI, in-process: a replaced data section is checked by the data schema and tokenized for
training; every bad input exits with status 2 and one line naming its cause, before anything is
compiled, and leaves the workdir's files as they were.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from gpt_jax import config as config_lib
from gpt_jax import describe, loop
from gpt_jax.__main__ import main
from gpt_jax.errors import GptJaxError
from tests.helpers import REPO, TINY, seed_workdir, tiny_config

PRETRAIN = "--config=" + os.path.join(REPO, "experiments", "pretrain.py") + ":tiny"
DATA = os.path.join(REPO, "experiments", "data")
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]
REACHED = "reached training"


def _snapshot(workdir: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if os.path.relpath(path, workdir) != ".lock":
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture
def cli(monkeypatch, capsys):
  """Runs `pretrain` in-process; returns (status, the gpt_jax lines of stderr, the config that reached
  training or None). Training itself is replaced by an error naming REACHED."""
  reached = []

  def no_run(cfg, workdir, job, log_fn=print):
    reached.append(cfg)
    raise GptJaxError(REACHED)

  monkeypatch.setattr(loop, "run", no_run)

  def run(workdir: str, *args: str):
    capsys.readouterr()
    status = main(["pretrain", PRETRAIN, f"--workdir={workdir}", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gpt_jax")]
    return status, err, (reached[-1] if reached else None)

  return run


@pytest.fixture
def workdir(prepared_dir, tmp_path):
  wd = seed_workdir(prepared_dir, str(tmp_path / "wd"))
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "train/loss": 6.0}) + "\n")
  return wd


def _refused(cli, wd: str, args: list[str], expected: str) -> str:
  before = _snapshot(wd) if os.path.isdir(wd) else {}
  status, err, reached = cli(wd, *args)
  assert status == 2 and reached is None, err
  assert len(err) == 1 and err[0].startswith("gpt_jax: error: "), err
  assert expected in err[0], err[0]
  after = _snapshot(wd) if os.path.isdir(wd) else {}
  assert {k: after.get(k) for k in before} == before
  return err[0]


def _write(path, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def test_files_data_config_end_to_end(cli, prepared_dir, tmp_path):
  """One source over a jsonl file, a parquet file and a glob of text files, each read by its extension."""
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  from gpt_jax.data.synthetic import _embedded

  texts = _embedded("pydoc_topics", 36, 1500, min_chars=300)
  corpus = tmp_path / "corpus"
  (corpus / "txt").mkdir(parents=True)
  _write(corpus / "a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts[:12]))
  pq.write_table(pa.table({"text": texts[12:24]}), str(corpus / "b.parquet"))
  for i, t in enumerate(texts[24:]):
    _write(corpus / "txt" / f"{i}.txt", t)
  paths = f"{corpus}/a.jsonl,{corpus}/b.parquet,{corpus}/txt/*.txt"
  wd = str(tmp_path / "wd")
  args = [
    *TINY_ARGS,
    f"--config.data={DATA}/files.py:{paths}",  # the section first, then its keys
    f"--config.data.tokenizer.path={prepared_dir}/tokenizer/tokenizer.model",
    "--config.data.eval_fraction=0.2",
    "--config.data.num_workers=1",
    "--config.data.progress=False",
  ]
  status, err, cfg = cli(wd, *args)
  assert err == [f"gpt_jax: error: {REACHED}"] and status == 2
  assert list(cfg.data.sources) == ["files"] and cfg.data.sources.files.format == "auto"
  with open(os.path.join(wd, "shards", "train", "manifest.json")) as f:
    train = json.load(f)["sources"]["files"]
  with open(os.path.join(wd, "shards", "eval", "manifest.json")) as f:
    held = json.load(f)["sources"]["files"]
  assert train["documents"] + held["documents"] == len(texts)
  assert train["bytes"] + held["bytes"] == sum(len(t.encode()) for t in texts)


def _llama_args(arg: str) -> list[str]:
  return [f"--config.data={DATA}/llama_mixture.py:{arg}"]


@pytest.fixture
def data_files(tmp_path):
  """Data config files with defects: no get_config, an unknown key, a value out of bounds."""
  d = tmp_path / "data_files"
  d.mkdir()
  head = "from gpt_jax.data import default_data_config\n\n\ndef get_config(arg=None):\n  cfg = default_data_config()\n"
  return {
    "no_get_config": _write(d / "no_get_config.py", "CONFIG = {}\n"),
    "bad_key": _write(d / "bad_key.py", head + "  cfg.sources.web.formt = 'jsonl'\n  return cfg\n"),
    "bad_value": _write(d / "bad_value.py", head + "  cfg.eval_fraction = 2.0\n  return cfg\n"),
    "raises": _write(d / "raises.py", head + "  raise ValueError('no corpus at ' + str(arg))\n"),
  }


# (id, args (a function of the data_files fixture), text the one-line error must contain)
CASES = [
  (
    "missing_file",
    lambda f: [f"--config.data={DATA}/nope.py:x"],
    f"data: file '{DATA}/nope.py' does not exist",
  ),
  ("not_python", lambda f: ["--config.data=/data/mix.json"], "data: expected FILE.py or FILE.py:ARG"),
  ("no_get_config", lambda f: [f"--config.data={f['no_get_config']}"], "has no get_config() function"),
  ("get_config_raises", lambda f: [f"--config.data={f['raises']}:/x"], "ValueError: no corpus at /x"),
  (
    "unknown_llama_source",
    lambda f: _llama_args("commoncrawl=/cc/*.jsonl;bogus=/x/*.jsonl"),
    "llama_mixture: unknown source(s) ['bogus']; expected names among",
  ),
  (
    "bad_key_in_file",
    lambda f: [f"--config.data={f['bad_key']}"],
    "data.sources.web.formt: unknown config key",
  ),
  (
    "bad_value_in_file",
    lambda f: [f"--config.data={f['bad_value']}"],
    "data.eval_fraction: must be in (0, 1), got 2.0",
  ),
  (
    "unknown_source_after_replacement",
    lambda f: [*_llama_args("/data/llama"), "--config.data.sources.web.weight=0.5"],
    "data.sources.web.weight: unknown config key ('data.sources.web' does not exist)",
  ),
  (
    "bad_value_after_replacement",
    lambda f: [f"--config.data={DATA}/files.py:/x/*.jsonl", "--config.data.sources.files.weight=-1"],
    "data.sources.files.weight: must be > 0",
  ),
  ("files_without_paths", lambda f: [f"--config.data={DATA}/files.py"], "files: no paths given"),
  (
    "missing_paths",
    lambda f: [f"--config.data={DATA}/files.py:/no/such/*.jsonl"],
    "glob '/no/such/*.jsonl' matches no file",
  ),
  ("section_as_value", lambda f: ["--config.data=3"], "data: expected a section (or FILE.py:ARG), got 3"),
  (
    "tokenizer_kind",
    lambda f: ["--config.data.tokenizer.kind=tiktoken"],
    "data.tokenizer.kind: must be one of ('sentencepiece', 'hf'), got 'tiktoken'",
  ),
  (
    "hf_without_path",
    lambda f: ["--config.data.tokenizer.kind=hf"],
    "data.tokenizer.path: required with data.tokenizer.kind='hf'",
  ),
  (
    "hf_path_missing",
    lambda f: ["--config.data.tokenizer.kind=hf", "--config.data.tokenizer.path=/no/such/gpt2"],
    "data.tokenizer.path: /no/such/gpt2 does not exist",
  ),
  (
    "sentencepiece_path_missing",
    lambda f: ["--config.data.tokenizer.path=/no/such.model"],
    "data.tokenizer.path: /no/such.model does not exist",
  ),
]


@pytest.mark.parametrize("make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_data_config(cli, tmp_path, data_files, make_args, expected):
  wd = str(tmp_path / "fresh")
  _refused(cli, wd, TINY_ARGS + make_args(data_files), expected)
  assert not os.path.exists(os.path.join(wd, "shards"))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["some text to learn a few merges from"] * 10, trainer)
  d = tmp_path_factory.mktemp("bpe")
  tok.save(str(d / "tokenizer.json"))
  return str(d)


def test_tokenizer_kind_mismatch_on_resume(cli, workdir, bpe_dir):
  hf = ["--config.data.tokenizer.kind=hf", f"--config.data.tokenizer.path={bpe_dir}"]
  # Shards and a SentencePiece model from an earlier run, no checkpoint yet: data preparation refuses.
  _refused(
    cli,
    workdir,
    TINY_ARGS + hf,
    f"data.tokenizer.kind: {workdir} holds a sentencepiece tokenizer ({workdir}/tokenizer/tokenizer.model), "
    "the config asks for 'hf'",
  )
  # A run that started with the SentencePiece model: the resume check names the keys.
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_lib.to_dict(tiny_config()), f)
  _refused(cli, workdir, TINY_ARGS + hf, "data.tokenizer.kind ('sentencepiece' -> 'hf')")


# --- describe ------------------------------------------------------------------------------------------


def _load(preset):
  return config_lib.load(os.path.join(REPO, "experiments", "pretrain.py") + f":{preset}")


def test_describe_reproduces_the_papers_compute(capsys):
  s = describe.summary(_load("llama_65b"))
  c = describe.compute(s, devices=2048, device="a100", mfu=0.5)
  # LLaMA (Touvron et al. 2023): about 21 days on 2,048 A100-80GB, 1,022,362 GPU-hours for 65B.
  assert 20 < c["days"] < 22 and 0.95e6 < c["device_hours"] < 1.05e6
  assert (s["batch_tokens"], s["lr_peak"], s["warmup_steps"], s["weight_decay"]) == (
    4_194_304,
    1.5e-4,
    2000,
    0.1,
  )
  g = describe.summary(_load("gpt3_175b"))
  # GPT-3 (Brown et al. 2020, table D.1): 3.14e23 training FLOPs, 3,640 petaflop/s-days.
  assert g["flops_6nd"] == pytest.approx(3.14e23, rel=0.01)
  assert g["flops_6nd"] / 8.64e19 == pytest.approx(3640, rel=0.01)
  assert g["warmup_steps"] * g["batch_tokens"] == pytest.approx(375e6, rel=0.01)

  status = main(
    ["describe", PRETRAIN.replace(":tiny", ":llama_65b"), "--devices=2048", "--device=a100", "--mfu=0.5"]
  )
  out = capsys.readouterr().out
  assert status == 0
  for row in ("peak learning rate", "warmup", "schedule", "weight decay", "device-hours", "2,048 x a100"):
    assert row in out
  rows = dict(line.strip().split("  ", 1) for line in out.splitlines()[1:])
  assert rows["days"].strip() == "20.6" and rows["device-hours"].strip() == "1,012,725 (1.01M)"


@pytest.mark.parametrize(
  "args, expected",
  [
    (["--mfu=1.5"], "--mfu: must be in (0, 1], got 1.5"),
    (["--devices=0"], "--devices: must be at least 1, got 0"),
    (["--device=v99"], "--device: unknown device 'v99'; expected one of a100"),
  ],
)
def test_describe_bad_flags(capsys, args, expected):
  assert main(["describe", PRETRAIN, *args]) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gpt_jax")]
  assert len(err) == 1 and expected in err[0], err
