"""SFT: assistant-only loss, packing that never crosses conversations, bad input, the resumable loader,
and the stage end to end from a tiny pretraining checkpoint (loss falls, accuracy reported, exact resume)."""

import json
import os
import random

import jax
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import losses, metrics, model, sharding
from gpt_jax.data import sft as sft_data
from gpt_jax.data import tasks
from gpt_jax.data.config import source_config
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.tokenizers import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128, max_seq_len=128)
MODEL_OVERRIDES = {f"model.{k}": v for k, v in {**TINY, "vocab_size": 512}.items()}


def corpus_docs(n: int = 300) -> list[str]:
  """Text that looks like the tasks (so the tokenizer covers them) plus a little prose."""
  rng = random.Random(0)
  docs = []
  for t in tasks.make_tasks("train", n, 0):
    docs.append(
      f"{t.question} {t.answer}\nThe answer to {t.question.lower()} is {t.answer}. " * rng.randint(1, 3)
    )
  return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return train_tokenizer(corpus_docs(), str(tmp_path_factory.mktemp("tok")), vocab_size=400)


ROWS = 3  # every forward below runs on (3, 64) batches: one compile per model family


@pytest.fixture(scope="module")
def forward(tok):
  """family -> jitted (batch of ROWS rows) -> logits, for a random tiny model of that family."""
  fns = {}
  for family, name, extra in (("llama", "tiny", dict(num_kv_heads=2)), ("gpt2", "tiny_gpt2", {})):
    cfg = model.preset(
      name, **{**TINY, **extra, "vocab_size": tok.vocab_size, "max_seq_len": 64, "init_std": 0.2}
    )
    graphdef = model.abstract(cfg)[0]
    params = jax.jit(lambda cfg=cfg: model.split(cfg, 0)[1])()  # one compile instead of eager init ops
    fns[family] = jax.jit(
      lambda b, g=graphdef, p=params: model.apply(g, p, b["inputs"], b["positions"], b["segment_ids"]).logits
    )
  return fns


def padded(enc, rows, T=64):
  return sft_data.rows_to_batch(enc, list(rows) + [[]] * (ROWS - len(rows)), T)


def xent(batch, logits):
  """(loss_sum, weight) of the shared next-token loss."""
  return np.asarray(losses.next_token_xent(logits, batch["targets"], batch["loss_mask"])[:2])


def conv(user: str, answer: str, system: str | None = None) -> sft_data.Conversation:
  msgs = ([{"role": "system", "content": system}] if system else []) + [
    {"role": "user", "content": user},
    {"role": "assistant", "content": answer},
  ]
  return sft_data.Conversation(msgs)


CONVS = [
  conv("Add 12 and 30.", "42"),
  conv("Reverse: a b c", "c b a", system="Answer tersely."),
  conv("Uppercase: dog", "DOG"),
]


# --- rendering, mask, packing ------------------------------------------------------------------------


def test_loss_counts_only_assistant_tokens(tok, forward):
  two_turns = sft_data.Conversation(
    [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Sort: 3 1 2"},
      {"role": "assistant", "content": "1 2 3"},
      {"role": "user", "content": "Uppercase: ab"},
      {"role": "assistant", "content": "AB"},
    ]
  )
  enc = sft_data.encode([two_turns], tok, 64, "drop", "t")
  b = sft_data.rows_to_batch(enc, [[0]], 64)
  eot = tok.special_id("end_of_turn")
  learned = b["targets"][0][b["loss_mask"][0] == 1].tolist()
  assert learned == tok.encode("1 2 3") + [eot] + tok.encode("AB") + [eot]
  assert enc.stats["assistant_tokens"] == len(learned)

  b = padded(enc, [[0]])
  logits = np.asarray(forward["llama"](b))
  base = xent(b, logits)
  # Altering every prompt (and padding) target leaves the loss as it is ...
  rng = np.random.default_rng(0)
  alt = dict(
    b,
    targets=np.where(b["loss_mask"] == 0, rng.integers(4, tok.vocab_size, b["targets"].shape), b["targets"]),
  )
  assert not np.array_equal(alt["targets"], b["targets"])
  np.testing.assert_array_equal(xent(alt, logits), base)
  # ... while altering one assistant target changes it.
  i = int(np.argmax(b["loss_mask"][0]))
  one = dict(b, targets=b["targets"].copy())
  one["targets"][0, i] = (one["targets"][0, i] + 1) % tok.vocab_size
  assert xent(one, logits)[0] != base[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_row_equals_conversations_alone(tok, forward, family):
  T = 64
  enc = sft_data.encode(CONVS, tok, T, "drop", "t")
  assert enc.lengths.sum() <= T + 1
  packed = padded(enc, [[0, 1, 2]])
  alone = padded(enc, [[0], [1], [2]])
  # Layout: segments 1, 2, 3 then padding; positions restart; the cross-conversation target is masked.
  n0, n1, n2 = (int(x) for x in enc.lengths)
  seg = packed["segment_ids"][0]
  assert seg[:n0].tolist() == [1] * n0 and seg[n0 : n0 + n1].tolist() == [2] * n1
  assert packed["positions"][0, n0] == 0 and packed["positions"][0, n0 + n1 + 5] == 5
  assert packed["loss_mask"][0, n0 - 1] == 0 and seg[n0 + n1 + n2 :].tolist() == [0] * (T - n0 - n1 - n2)

  lp, la = np.asarray(forward[family](packed)), np.asarray(forward[family](alone))
  o = 0
  for r, n in enumerate((n0, n1, n2)):
    np.testing.assert_allclose(lp[0, o : o + n], la[r, :n], atol=2e-5, rtol=1e-5)
    o += n
  # And so the packed loss is the sum of the separate ones.
  np.testing.assert_allclose(xent(packed, lp), xent(alone, la), rtol=1e-5)


def first_fit_reference(lengths, capacity):
  rows, free = [], []
  for i, n in enumerate(lengths):
    for r, f in enumerate(free):
      if f >= n:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(capacity - n)
  return rows


def test_first_fit_matches_the_plain_algorithm():
  assert sft_data.first_fit([6, 5, 2, 3], 8) == [[0, 2], [1, 3]]
  rng = np.random.default_rng(0)
  for n in (1, 2, 7, 300):
    lengths = rng.integers(1, 40, n).tolist()
    assert sft_data.first_fit(lengths, 40) == first_fit_reference(lengths, 40)
  with pytest.raises(DataError, match="item 1 has 9 tokens"):
    sft_data.first_fit([3, 9], 8)


# --- bad input ---------------------------------------------------------------------------------------


def write_lines(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
  "bad, match",
  [
    ({"messages": [{"role": "bot", "content": "x"}]}, r"bad.jsonl:3: message 0 has unknown role 'bot'"),
    (
      {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
      r"bad.jsonl:3: message 1 is an empty assistant turn",
    ),
    ({"messages": [{"role": "user", "content": "x"}]}, r"bad.jsonl:3: no assistant turn"),
    ({"text": "x"}, r"bad.jsonl:3: no 'messages' key"),
    ("{not json", r"bad.jsonl:3: not valid JSON"),
  ],
)
def test_bad_conversations_name_file_and_line(tmp_path, bad, match):
  path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad])  # line 2 blank: skipped, still counted
  with pytest.raises(DataError, match=match):
    sft_data.read_conversations(path)


def test_too_long_conversations_are_dropped_or_truncated_and_counted(tok):
  long_answer = " ".join(["7"] * 40)
  convs = [*CONVS, conv("Echo.", long_answer), conv("x " * 80, "late answer")]
  T = 32
  drop = sft_data.encode(convs, tok, T, "drop", "t")
  assert (
    drop.stats["conversations"] == 3 and drop.stats["dropped_too_long"] == 2 and drop.stats["truncated"] == 0
  )
  trunc = sft_data.encode(convs, tok, T, "truncate", "t")
  # The long answer is cut to T + 1 tokens; the long prompt leaves no assistant token: dropped.
  assert (
    trunc.stats["conversations"] == 4
    and trunc.stats["truncated"] == 1
    and trunc.stats["dropped_too_long"] == 1
  )
  assert int(trunc.lengths.max()) == T + 1
  with pytest.raises(DataError, match=r"all 1 conversations are longer than seq_len \+ 1 = 33"):
    sft_data.encode(convs[-1:], tok, T, "drop", "sft eval")


# --- loader ------------------------------------------------------------------------------------------


def loader_enc(tok, n=40):
  ts = tasks.make_tasks("train", n, 0)
  convs = [sft_data.Conversation(m, t.kind) for m, t in zip(tasks.sft_conversations(ts), ts)]
  return sft_data.encode(convs, tok, 64, "drop", "t")


def test_loader_resumes_exactly_and_covers_each_epoch(tok):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  enc = loader_enc(tok)
  args = dict(global_batch=8, seq_len=64, sharding=sharding.batch_sharding(mesh), seed=3)
  ref = sft_data.SftLoader(enc, **args)
  for e in range(2):
    rows = ref.rows(e)
    assert sorted(i for r in rows for i in r) == list(range(len(enc)))  # each conversation once per epoch
  assert ref.rows(0) != ref.rows(1)  # reshuffled every epoch
  per_epoch = len(ref.rows(0))
  n = 2 * per_epoch // 8 + 2  # runs into the third epoch
  want = [jax.device_get(next(ref)) for _ in range(n)]
  first = sft_data.SftLoader(enc, **args)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
  resumed = sft_data.SftLoader(enc, **args)
  resumed.set_state(state)
  for k in range(3, n):
    got = jax.device_get(next(resumed))
    for key in want[k]:
      np.testing.assert_array_equal(got[key], want[k][key])
  assert resumed.get_state()["epoch"] >= 2
  b = next(resumed)
  assert b["inputs"].shape == (8, 64) and b["inputs"].sharding == args["sharding"]
  with pytest.raises(DataError, match="expected"):
    resumed.set_state({"index": 1})


def test_eval_loader_is_one_padded_pass(tok):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  enc = loader_enc(tok, 30)
  args = dict(global_batch=8, seq_len=64, sharding=sharding.batch_sharding(mesh), shuffle=False, repeat=False)
  passes = [[jax.device_get(b) for b in sft_data.SftLoader(enc, **args)] for _ in range(2)]
  n_rows = len(sft_data.make_rows(enc, np.arange(len(enc)), 64, True))
  assert len(passes[0]) == -(-n_rows // 8)
  # Every assistant token is a target exactly once (the first token, bos, is never one).
  assert sum(float(b["loss_mask"].sum()) for b in passes[0]) == enc.stats["assistant_tokens"]
  for a, b in zip(*passes):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  unpacked = list(sft_data.SftLoader(enc, **{**args, "pack": False}))
  assert len(unpacked) == -(-len(enc) // 8)


# --- the stage end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny pretraining workdir made by the pretraining stage itself (4 steps)."""
  from gpt_jax.stages import pretrain

  root = tmp_path_factory.mktemp("pre")
  corpus = root / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs(400)))
  overrides = {
    **MODEL_OVERRIDES,
    "train.steps": 2,
    "train.global_batch": 8,
    "train.seq_len": 64,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "train.eval_batches": 0,
    "train.progress_bar": False,
    "train.async_checkpoint": False,
    "optim.warmup_steps": 1,
    "metrics.tensorboard": False,
  }
  cfg = config_lib.load(os.path.join(ROOT, "experiments/pretrain.py:tiny"), overrides)
  with cfg.unlocked():
    cfg.data.sources = {"tasks": source_config(str(corpus), "jsonl", 1.0)}
    cfg.data.tokenizer.vocab_size = 512
    cfg.data.tokenizer.sample_bytes = 200_000
    cfg.data.num_workers = 1
    cfg.data.eval_fraction = 0.2
    cfg.data.shard_tokens = 4096
    cfg.data.progress = False
  workdir = str(root / "workdir")
  pretrain.run(cfg, workdir, log_fn=lambda *a: None)
  return workdir


def sft_cfg(init_from, **over):
  overrides = {
    **MODEL_OVERRIDES,
    "train.steps": 6,
    "train.global_batch": 8,
    "train.seq_len": 64,
    "train.eval_every": 6,
    "train.checkpoint_every": 3,
    "train.eval_batches": 1,
    "train.log_every": 1,
    "train.progress_bar": False,
    "train.async_checkpoint": False,
    "train.init_from": str(init_from),
    "optim.warmup_steps": 1,
    "optim.decay_steps": 6,
    "optim.lr_peak": 3e-3,
    "metrics.tensorboard": False,
    "tasks.train": 400,
    "tasks.eval": 32,
    "sft.eval_samples": 8,
    "sft.max_new_tokens": 4,
    "sft.sample_batch": 8,
  }
  overrides.update(over)
  return config_lib.load(os.path.join(ROOT, "experiments/sft.py:tiny"), overrides)


def train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
  """An SFT run stopped after 3 steps, then resumed to 6 with an eval (loss and accuracy) at the end."""
  from gpt_jax.stages import sft

  workdir = str(tmp_path_factory.mktemp("sft") / "run")
  sft.run(sft_cfg(pretrained, **{"train.steps": 3, "train.eval_batches": 0}), workdir, log_fn=lambda *a: None)
  first = train_losses(workdir)
  logs = []
  result = sft.run(sft_cfg(pretrained), workdir, log_fn=logs.append)
  return workdir, result, logs, first


def test_sft_run_learns_and_reports_accuracy(finetuned):
  workdir, result, logs, first = finetuned
  assert sorted(first) == [1, 2, 3]
  assert any("resumed from step 3" in line for line in logs)
  losses_by_step = train_losses(workdir)
  assert sorted(losses_by_step) == [1, 2, 3, 4, 5, 6]
  assert losses_by_step[6] < losses_by_step[1] - 0.3, losses_by_step
  assert 0.0 <= result.eval["accuracy"] <= 1.0
  assert {"accuracy_add", "accuracy_upper", "loss"} <= set(result.eval)
  records = metrics.read_metrics(workdir)
  assert any("eval/accuracy" in r and r["step"] == 6 for r in records)
  data = next(r for r in records if "data/train_conversations" in r)
  assert data["data/train_conversations"] == 400 and data["data/eval_dropped_too_long"] == 0
  assert any("too long: 0 dropped, 0 truncated" in line for line in logs)
  # The embedded tasks and the tokenizer now live in the workdir.
  assert sum(1 for _ in open(os.path.join(workdir, "data", "eval.jsonl"))) == 32
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.model"))


def test_resume_gives_the_uninterrupted_losses(pretrained, finetuned, tmp_path):
  from gpt_jax.stages import sft

  workdir = str(tmp_path / "straight")
  overrides = {"train.eval_batches": 0, "train.checkpoint_every": 6}
  sft.run(sft_cfg(pretrained, **overrides), workdir, log_fn=lambda *a: None)
  want, got = train_losses(workdir), train_losses(finetuned[0])
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-6)


def test_init_from_missing_or_of_another_shape(pretrained, tmp_path):
  from gpt_jax.stages import sft

  workdir = tmp_path / "w"
  with pytest.raises(CheckpointError, match=r"train.init_from: .*/nowhere does not exist"):
    sft.run(sft_cfg(tmp_path / "nowhere"), str(workdir))
  with pytest.raises(CheckpointError, match=r"model.d_model: 32 differs from 64 in .*stage 'pretrain'"):
    sft.run(sft_cfg(pretrained, **{"model.d_model": 32}), str(workdir))
  with pytest.raises(ConfigError, match="train.init_from: required"):
    sft.run(sft_cfg(""), str(workdir))
  assert not os.path.exists(workdir / "config.json")  # refused before anything was written


def test_bad_data_file_fails_before_training(pretrained, tmp_path):
  from gpt_jax.stages import sft

  path = write_lines(tmp_path / "chat.jsonl", [GOOD, {"messages": [{"role": "robot", "content": "x"}]}])
  with pytest.raises(DataError, match=r"chat.jsonl:2: message 0 has unknown role 'robot'"):
    sft.run(sft_cfg(pretrained, **{"sft.data_path": path}), str(tmp_path / "w"))
  assert not os.path.isdir(tmp_path / "w" / "checkpoints")
