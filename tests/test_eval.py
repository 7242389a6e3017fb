"""`eval`: log-likelihood and bits-per-byte parity with transformers, the task syntax and files, graders,
the command and its one-line refusals, and the lm-evaluation-harness adapter against `eval`."""

import json
import math
import os

import jax
import numpy as np
import pytest

from gpt_jax import runs, sharding
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.eval import generate, loglik
from gpt_jax.eval import run as eval_run
from gpt_jax.eval import tasks as eval_tasks
from gpt_jax.interop import hf

torch = pytest.importorskip("torch", reason="torch (CPU build, test-only) builds the reference model")
transformers = pytest.importorskip(
  "transformers", reason="transformers (test-only) builds the reference model"
)

from tests.test_hf_interop import _corpus, byte_level_bpe  # noqa: E402

MC_ROWS = [
  {"context": "Question: what is 2 + 3?\nAnswer:", "choices": ["5", "6", "23"], "label": 0},
  {"context": "The capital of France is", "choices": ["Paris", "Rome", "a city in Europe"], "label": 0},
  {
    "context": "Sort: 3 1 2 ->",
    "choices": ["1 2 3", "3 2 1"],
    "label": 0,
    "examples": [{"context": "Sort: 2 1 ->", "choices": ["2 1", "1 2"], "label": 1}],
  },
  {"context": "", "choices": ["The quick brown fox", "jumps over the lazy dog"], "label": 1},
  {"context": "Uppercase: cat ", "choices": ["CAT", "cat", "Cat"], "label": 0},
]
DOCS = [
  "The quick brown fox jumps over the lazy dog.",
  "Byte-level BPE: naïve café, 東京, emoji 🙂!",
  " ".join(f"Add {i} and {i + 1}." for i in range(60)),  # longer than the model's 64 positions
]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A tiny random GPT-2 (weights perturbed off their init) with its own byte-level BPE, imported."""
  d = tmp_path_factory.mktemp("eval_gpt2")
  tok = byte_level_bpe(_corpus(), 320)
  eos = tok.token_to_id("<|endoftext|>")
  cfg = transformers.GPT2Config(
    vocab_size=tok.get_vocab_size(),
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
  ref = transformers.GPT2LMHeadModel(cfg)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.3 * torch.randn_like(p))
  ref.config._attn_implementation = "eager"
  ref.eval()
  ref.save_pretrained(d / "hf", safe_serialization=True)
  tok.save(str(d / "hf" / "tokenizer.json"))
  (d / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  hf.import_hf(str(d / "hf"), str(d / "ckpt"), mesh_cfg={"data": 1, "fsdp": -1, "tensor": 1})
  (d / "texts").mkdir()
  for i, t in enumerate(DOCS):  # a directory of text files: one document each
    (d / "texts" / f"{i}.txt").write_text(t, encoding="utf-8")
  files = {
    "mc": _write_jsonl(d / "mc.jsonl", MC_ROWS),
    "docs": _write_jsonl(d / "docs.jsonl", [{"text": t} for t in DOCS]),
    "texts": str(d / "texts"),
  }
  return {"ref": ref, "tok": tok, "eos": eos, "ckpt": str(d / "ckpt"), "dir": d, **files}


def _hf_logprobs(ref, ids):
  """log p(ids[i] | ids[:i]) for i >= 1 from transformers' logits."""
  with torch.no_grad():
    logits = ref(torch.tensor([ids[:-1]])).logits[0].double()
  lp = torch.log_softmax(logits, -1)
  return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def _evaluator(gpt2, specs, mesh=None):
  run = runs.open(gpt2["ckpt"])
  mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  space, seed = eval_tasks.task_space(run.config)
  loaded = eval_tasks.load(eval_tasks.parse(specs), space=space, seed=seed, data_cfg=None)
  model, tok, ev = eval_run.build(run, mesh, loaded, batch=4)
  return run.restore(model.abstract()), ev, loaded


def test_mc_logliks_equal_transformers(gpt2):
  # fsdp x tensor: the params really are sharded; rows over data.
  params, ev, (task,) = _evaluator(
    gpt2, f"mc:{gpt2['mc']}", sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  )
  lls = ev.mc_logliks(params, task)
  ref, tok, eos = gpt2["ref"], gpt2["tok"], gpt2["eos"]
  worst = 0.0
  for row, scored in zip(MC_ROWS, lls):
    shots = [e["context"] + " " + e["choices"][e["label"]] for e in row.get("examples", [])]
    context = "\n\n".join([*shots, row["context"]])
    for choice, (lp, _) in zip(row["choices"], scored):
      ctx, cont = context, " " + choice
      if ctx.endswith(" "):  # lm-eval's rule: trailing context whitespace belongs to the continuation
        ctx, cont = ctx.rstrip(" "), " " + cont
      ctx_ids = tok.encode(ctx).ids if ctx else []
      whole = tok.encode(ctx + cont).ids
      ids = [eos, *ctx_ids, *whole[len(ctx_ids) :]]
      expected = _hf_logprobs(ref, ids)[-(len(whole) - len(ctx_ids)) :].sum()
      worst = max(worst, abs(lp - expected))
  assert worst < 1e-4, worst
  # Batches of 4 rows sharded over data, padded to power-of-two buckets: one compiled shape per bucket.
  assert ev.scorer.compiled_shapes <= {(4, 16), (4, 32), (4, 64)}
  print(f"max |d loglik| vs transformers: {worst:.2e}")
  # The choices differ, so the log-likelihoods do: accuracy is a real argmax.
  res = ev.evaluate(params, chat=False, log_fn=lambda *a: None)[task.name]
  assert (
    res["n"] == len(MC_ROWS)
    and 0.0 <= res["acc"] <= 1.0
    and res["baseline"] == pytest.approx(np.mean([1 / len(r["choices"]) for r in MC_ROWS]))
  )


def test_bits_per_byte_equals_transformers(gpt2):
  params, ev, (task,) = _evaluator(gpt2, f"bpb:{gpt2['texts']}")
  res = ev.evaluate(params, chat=False, log_fn=lambda *a: None)[task.name]
  ref, tok, eos = gpt2["ref"], gpt2["tok"], gpt2["eos"]
  nll, n_tok, W = 0.0, 0, 64
  for doc in DOCS:
    seq = [eos, *tok.encode(doc).ids]
    n_tok += len(seq) - 1
    # Windows of W inputs; each later window scores its new tokens with the W - 1 before them.
    done = 1
    while done < len(seq):
      end = min(done + W, len(seq))
      start = max(0, end - 1 - W)
      nll -= _hf_logprobs(ref, seq[start:end])[-(end - done) :].sum()
      done = end
  assert len(tok.encode(DOCS[2]).ids) > W  # the long document takes two windows
  n_bytes = sum(len(d.encode()) for d in DOCS)
  expected = nll / math.log(2) / n_bytes
  assert res["tokens"] == n_tok and res["bytes"] == n_bytes and res["documents"] == 3
  assert res["bits_per_byte"] == pytest.approx(expected, abs=1e-5)
  print(f"bits per byte: gpt_jax {res['bits_per_byte']:.6f}, transformers {expected:.6f}")
  assert res["loss"] == pytest.approx(nll / n_tok, abs=1e-5)


def test_rolling_windows_score_every_token_once():
  ids = list(range(10, 30))
  for window in (1, 4, 7, 20, 64):
    reqs = loglik.rolling_requests(ids, 0, window)
    seq = [0, *ids]
    scored = []
    for w, n in reqs:
      assert len(w) - 1 <= window and 1 <= n <= len(w) - 1
      start = seq.index(w[0]) if w[0] != 0 else 0
      scored += list(range(start + len(w) - n, start + len(w)))
    assert scored == list(range(1, len(seq)))
  assert loglik.bucket(1, 64) == 16 and loglik.bucket(17, 64) == 32 and loglik.bucket(60, 48) == 48


def test_task_syntax():
  specs = eval_tasks.parse(
    "embedded:add+sort:n=8, mc:/data/a:b.jsonl:name=ab:limit=3,gen:g.jsonl:grader=number,bpb:web"
  )
  assert [(s.kind, s.arg, s.name) for s in specs] == [
    ("embedded", "add+sort", "embedded_add_sort"),
    ("mc", "/data/a:b.jsonl", "ab"),
    ("gen", "g.jsonl", "g"),
    ("bpb", "web", "bpb_web"),
  ]
  assert (
    specs[0].options == {"n": 8}
    and specs[1].options == {"limit": 3}
    and specs[2].options == {"grader": "number"}
  )
  for bad, match in (
    ("hellaswag", r"unknown task 'hellaswag'"),
    ("mc", r"mc needs a file"),
    ("mc:x.jsonl:shots=5", r"unknown option 'shots'"),
    ("gen:x.jsonl:grader=fuzzy", r"grader='fuzzy'; expected one of exact, number"),
    ("embedded:n=0", r"n='0'; expected >= 1"),
    ("embedded:add+mul", r"unknown embedded kind 'mul'"),
    ("mc:a/x.jsonl,mc:b/x.jsonl", r"two tasks are named 'x'"),
    ("embedded,,mc:x.jsonl", r"empty item"),
    ("", r"no task given"),
  ):
    with pytest.raises(ConfigError, match=match):
      eval_tasks.parse(bad)


@pytest.mark.parametrize(
  "row, match",
  [
    ({"context": "q", "choices": ["a", "b"]}, r"mc\.jsonl:2: 'label' is missing"),
    (
      {"context": "q", "choices": ["a", "b"], "label": 2},
      r"mc\.jsonl:2: label 2 is out of range for 2 choices",
    ),
    ({"context": "q", "choices": [], "label": 0}, r"mc\.jsonl:2: 'choices' must be a non-empty list"),
    ({"context": "q", "choices": ["a", ""], "label": 0}, r"choice 1 must be a non-empty string"),
    ({"context": "q", "choices": ["a"], "label": True}, r"'label' must be an integer"),
    ({"choices": ["a"], "label": 0}, r"'context' must be a string, got missing"),
    (
      {"context": "q", "choices": ["a"], "label": 0, "examples": [{"context": "e", "choices": ["x"]}]},
      r"mc\.jsonl:2: example 0: 'label' is missing",
    ),
  ],
)
def test_malformed_mc_lines_are_named(tmp_path, row, match):
  path = _write_jsonl(tmp_path / "mc.jsonl", [MC_ROWS[0], row])
  with pytest.raises(DataError, match=match):
    eval_tasks.load_mc(eval_tasks.parse(f"mc:{path}")[0])


def test_gen_files_and_graders(tmp_path):
  path = _write_jsonl(
    tmp_path / "gsm.jsonl",
    [
      {"prompt": "Q: 2+2?", "answer": "#### 4", "examples": [{"prompt": "Q: 1+1?", "answer": "2"}]},
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1,000"}]},
    ],
  )
  (task,) = eval_tasks.load(
    [eval_tasks.parse(f"gen:{path}:grader=number")[0]], space=None, seed=0, data_cfg=None
  )
  q0, q1 = task.items
  assert q0.text == "Q: 1+1? 2\n\nQ: 2+2?" and [m["role"] for m in q0.messages] == [
    "user",
    "assistant",
    "user",
  ]
  assert q1.answer == "1,000" and q1.messages == [{"role": "user", "content": "hi"}]
  assert eval_tasks.final_number("so 3 + 4 = 7. #### 1,234.50") == "1234.5"
  assert eval_tasks.final_number("We get 12 apples, then 18.") == "18"
  assert eval_tasks.final_number("no digits") is None
  assert (
    eval_tasks.grade("number", "#### 4", "2 + 2 is 4.") == 1.0
    and eval_tasks.grade("number", "4", "40") == 0.0
  )
  assert eval_tasks.grade("exact", "CAT", " CAT\n") == 1.0 and eval_tasks.grade("exact", "CAT", "CAT!") == 0.0
  assert generate.cut("42\n\nQuestion: next", ("\n\n", "Question:")) == "42"
  assert generate.pass_at_k(4, 1, 1) == pytest.approx(0.25) and generate.pass_at_k(4, 1, 4) == 1.0
  assert generate.pass_at_k(4, 0, 4) == 0.0
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "answer": "none"}])
  with pytest.raises(DataError, match=r"bad\.jsonl:1: grader=number but the answer 'none' holds no number"):
    eval_tasks.load_gen(eval_tasks.parse(f"gen:{bad}:grader=number")[0])


def test_eval_command_writes_results_and_a_table(gpt2, tmp_path, capsys):
  from gpt_jax.__main__ import main

  gen = _write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Add 2 and 3.", "answer": "5"}] * 3)
  out = tmp_path / "out" / "eval.json"
  tasks = f"mc:{gpt2['mc']},bpb:{gpt2['docs']},gen:{gen}:max_new_tokens=4,embedded:upper:n=4"
  argv = [
    "eval",
    "--workdir",
    gpt2["ckpt"],
    "--tasks",
    tasks,
    "--out",
    str(out),
    "--batch",
    "8",
    "--samples",
    "2",
  ]
  assert main(argv) == 0
  printed = capsys.readouterr().out
  record = json.loads(out.read_text())
  assert record["run"]["stage"] == "import" and record["chat"] is False
  res = record["results"]
  assert set(res) == {"mc", "bpb_docs", "gen", "embedded_upper"}
  assert res["mc"]["kind"] == "mc" and res["bpb_docs"]["bits_per_byte"] > 0
  assert res["gen"]["n"] == 3 and set(res["gen"]) >= {"accuracy", "pass@1", "pass@2"}
  assert res["embedded_upper"]["kind"] == "embedded" and res["embedded_upper"]["n"] == 4
  assert record["core"] == pytest.approx(res["mc"]["centered"])
  assert "bits_per_byte" in printed and "mean centered acc_token" in printed


def test_a_bare_bpb_name_is_the_runs_source_before_a_folder_of_that_name(tmp_path, monkeypatch):
  from gpt_jax import config as config_lib
  from gpt_jax.data import config as data_config
  from gpt_jax.data import sources

  data_cfg = config_lib.to_dict(data_config.default_data_config())
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "notes.md").write_text("# not the source\n")
  monkeypatch.chdir(tmp_path)
  (src,) = [s for s in sources.parse_sources(data_cfg["sources"], "error") if s.name == "docs"]
  held_out = [
    d for d in sources.iter_documents(src) if sources.doc_hash_fraction(d) < data_cfg["eval_fraction"]
  ]
  (task,) = eval_tasks.load(eval_tasks.parse("bpb:docs"), space=None, seed=0, data_cfg=data_cfg)
  assert task.items == held_out and len(held_out) > 0
  (folder,) = eval_tasks.load(eval_tasks.parse("bpb:./docs"), space=None, seed=0, data_cfg=data_cfg)
  assert folder.items == ["# not the source\n"]


def _one_line_error(argv, capsys, monkeypatch):
  from gpt_jax.__main__ import main

  def no_compile(*a, **k):
    raise AssertionError("compiled before the input was checked")

  monkeypatch.setattr(jax, "jit", no_compile)
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_bad_input_is_one_line_before_any_compile(gpt2, tmp_path, capsys, monkeypatch):
  before = sorted(os.listdir(gpt2["ckpt"]))
  for row, match in (
    ({"context": "q", "choices": ["a", "b"]}, "'label' is missing"),
    ({"context": "q", "choices": ["a", "b"], "label": 5}, "label 5 is out of range for 2 choices"),
    ({"context": "q", "choices": [], "label": 0}, "'choices' must be a non-empty list"),
  ):
    path = _write_jsonl(tmp_path / "bad.jsonl", [MC_ROWS[0], row])
    err = _one_line_error(["eval", "--workdir", gpt2["ckpt"], "--tasks", f"mc:{path}"], capsys, monkeypatch)
    assert "bad.jsonl:2" in err and match in err, err
  err = _one_line_error(["eval", "--workdir", gpt2["ckpt"], "--tasks", "mmlu"], capsys, monkeypatch)
  assert "unknown task 'mmlu'" in err
  err = _one_line_error(
    ["eval", "--workdir", gpt2["ckpt"], "--tasks", f"mc:{tmp_path / 'missing.jsonl'}"], capsys, monkeypatch
  )
  assert "missing.jsonl does not exist" in err
  err = _one_line_error(["eval", "--workdir", gpt2["ckpt"], "--tasks", "bpb:web"], capsys, monkeypatch)
  assert "neither a file nor a source of the run's data config" in err
  empty = tmp_path / "run"
  (empty / "checkpoints").mkdir(parents=True)
  err = _one_line_error(["eval", "--workdir", str(empty), "--tasks", "embedded"], capsys, monkeypatch)
  assert "holds no valid checkpoint" in err
  assert sorted(os.listdir(gpt2["ckpt"])) == before  # nothing written


# --- the lm-evaluation-harness adapter --------------------------------------------------------------


def test_lm_eval_adapter_gives_evals_accuracy(gpt2, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
  lm_eval = pytest.importorskip("lm_eval", reason="lm_eval (requirements-eval.txt) is the harness under test")
  from lm_eval.api.instance import Instance
  from lm_eval.tasks import TaskManager

  from gpt_jax.eval import lm_eval_adapter

  task_dir = tmp_path / "tasks"
  task_dir.mkdir()
  (task_dir / "toy_mc.yaml").write_text(lm_eval_adapter.mc_task_yaml(gpt2["mc"], "toy_mc"))
  out = lm_eval.simple_evaluate(
    model="gpt_jax",
    model_args=f"workdir={gpt2['ckpt']},batch_size=4",
    tasks=["toy_mc"],
    task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
  )
  theirs = out["results"]["toy_mc"]
  params, ev, (task,) = _evaluator(gpt2, f"mc:{gpt2['mc']}:name=toy_mc")
  ours = ev.evaluate(params, chat=False, log_fn=lambda *a: None)["toy_mc"]
  assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(
    ours["acc_norm"]
  )
  assert ours["acc"] != ours["acc_norm"] or ours["acc"] not in (
    0.0,
    1.0,
  )  # the two metrics are not trivially equal

  # The other two request types, straight through the model.
  lm = lm_eval_adapter.GptJaxLM(workdir=gpt2["ckpt"], batch_size=4)
  mk = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0)
  (rolled,) = lm.loglikelihood_rolling([mk("loglikelihood_rolling", (DOCS[2],))])
  params, ev, (bpb,) = _evaluator(gpt2, f"bpb:{gpt2['docs']}")
  docs_ids = [gpt2["tok"].encode(DOCS[2]).ids]
  assert rolled == pytest.approx(ev.scorer.rolling(params, docs_ids, gpt2["eos"])[0], abs=1e-4)
  replies = lm.generate_until(
    [
      mk("generate_until", ("Add 2 and 3.", {"until": ["\n"], "max_gen_toks": 5})),
      mk(
        "generate_until",
        ("Sort: 3 1 2", {"until": "\n", "max_gen_toks": 3, "do_sample": True, "temperature": 1.0}),
      ),
    ]
  )
  assert len(replies) == 2 and all(isinstance(r, str) and "\n" not in r for r in replies)
