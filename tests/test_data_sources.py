"""Sources: formats, filters, the embedded corpus, and one-line errors for bad input."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt_jax.data import default_data_config, prepare
from gpt_jax.data.sources import EMBEDDED, iter_documents, parse_sources, resolve_files
from gpt_jax.errors import DataError


def one(name="s", **entry):
  entry.setdefault("weight", 1.0)
  (src,) = parse_sources({name: entry})
  return src


def docs(src):
  return list(iter_documents(src))


def test_text_markdown_jsonl_parquet(tmp_path):
  (tmp_path / "a.txt").write_text("first file")
  (tmp_path / "b.txt").write_text("second file")
  assert docs(one(paths=str(tmp_path / "*.txt"), format="text")) == ["first file", "second file"]
  (tmp_path / "c.md").write_text("# one\n---\n# two\n---\n# three")
  assert docs(one(paths=str(tmp_path / "c.md"), format="markdown", separator="\n---\n")) == [
    "# one",
    "# two",
    "# three",
  ]
  (tmp_path / "d.jsonl").write_text('{"body": "x1"}\n\n{"body": "x2"}\n')
  assert docs(one(paths=[str(tmp_path / "d.jsonl")], format="jsonl", text_field="body")) == ["x1", "x2"]
  pq.write_table(pa.table({"content": ["p1", None, "p2"]}), tmp_path / "e.parquet")
  assert docs(one(paths=str(tmp_path / "e.parquet"), format="parquet", text_field="content")) == ["p1", "p2"]


def test_filters_min_chars_dedup_max_docs(tmp_path):
  lines = [
    "short",
    "a long enough document",
    "a long enough document",
    "another long document",
    "third long doc",
  ]
  (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
  path = str(tmp_path / "x.jsonl")
  assert docs(one(paths=path, format="jsonl", min_chars=10, dedup=True)) == [
    "a long enough document",
    "another long document",
    "third long doc",
  ]
  assert len(docs(one(paths=path, format="jsonl", min_chars=10))) == 4
  assert docs(one(paths=path, format="jsonl", min_chars=10, dedup=True, max_docs=2)) == [
    "a long enough document",
    "another long document",
  ]


def test_sources_sorted_by_name_and_paths_from_comma_string(tmp_path):
  (tmp_path / "a.txt").write_text("a")
  (tmp_path / "b.txt").write_text("b")
  srcs = parse_sources(
    {
      "zeta": {"paths": f"{tmp_path}/a.txt, {tmp_path}/b.txt", "format": "text", "weight": 1},
      "alpha": {"paths": f"{tmp_path}/a.txt", "format": "text", "weight": 2},
    }
  )
  assert [s.name for s in srcs] == ["alpha", "zeta"]
  assert resolve_files(srcs[1]) == [f"{tmp_path}/a.txt", f"{tmp_path}/b.txt"]


def test_embedded_corpus_is_deterministic_and_sized():
  total = 0
  for part in EMBEDDED:
    src = one(paths=part, format="embedded")
    first = hashlib.sha256("\x00".join(iter_documents(src)).encode("utf-8", "surrogatepass")).hexdigest()
    again = docs(src)
    assert hashlib.sha256("\x00".join(again).encode("utf-8", "surrogatepass")).hexdigest() == first
    assert len(again) >= 10, part
    total += sum(len(d) for d in again)
  assert 3e6 < total < 60e6  # a few MB to tens of MB of text


def test_sections_and_html_text():
  from gpt_jax.data.sources import _html_text, _sections

  news = (
    "What's New in 2.0\n(since 1.0)\nReleased on 2001\n=================\n\n" + "a" * 600 + "\n\n"
    "What's New in 1.0\n=================\n\nshort\n\nOld\n---\n\n" + "b" * 600 + "\n"
  )
  parts = _sections(news)
  assert [p.split("\n")[0] for p in parts] == ["What's New in 2.0", "What's New in 1.0"]
  assert "".join(parts).replace("\n", "") == news.replace("\n", "")  # the short section joins the next
  assert _sections("no heading\n") == ["no heading\n"]
  page = (
    "<html><head><title>t</title><script>var x;</script></head><body><div>nav</div>"
    '<h1>Title<a class="headerlink" href="#t">\u00b6</a></h1><p>One &amp; two.</p><ul><li><p>item</p></li></ul>'
    '<h3>Sub</h3><pre>code\n  indented</pre></div><div class="sphinxsidebar">sidebar</div></body></html>'
  )
  assert _html_text(page) == "Title\n=====\n\nOne & two.\n\nitem\n\nSub\n---\n\ncode\n  indented\n"


def test_stdlib_prose_is_prose_and_not_a_copy_of_the_code():
  import re

  prose = docs(one(paths="stdlib_prose", format="embedded", min_chars=200, dedup=True))
  assert len(prose) >= 100 and 2e5 < sum(len(d) for d in prose) < 2e6
  assert any(d.startswith("A. HISTORY OF THE SOFTWARE") for d in prose)  # LICENSE.txt's first section
  assert any(d.startswith("# Built-in type str\n") for d in prose)
  code = re.sub(r"\s+", " ", "\n".join(docs(one(paths="stdlib_code", format="embedded"))))
  paragraphs = [re.sub(r"\s+", " ", p) for d in prose for p in d.split("\n\n") if len(p) >= 80]
  copied = sum(len(p) for p in paragraphs if p in code)
  assert copied < 0.005 * sum(len(p) for p in paragraphs)


def test_default_config_lists_every_key():
  cfg = default_data_config()
  srcs = parse_sources(cfg.sources)
  assert {s.name for s in srcs} == {"code", "docs", "web"}
  assert all(s.format == "embedded" for s in srcs)
  for key in ("seed", "eval_fraction", "on_bad_utf8", "shard_tokens", "num_workers", "document_mask"):
    assert key in cfg
  assert cfg.tokenizer.vocab_size == 4096


@pytest.mark.parametrize(
  "entry, match",
  [
    (
      {"paths": "/nonexistent/file.txt", "format": "text"},
      r"source 's': path '/nonexistent/file.txt' does not exist",
    ),
    (
      {"paths": "/nonexistent/*.txt", "format": "text"},
      r"source 's': glob '/nonexistent/\*.txt' matches no file",
    ),
    ({"paths": "x", "format": "csv"}, r"source 's': unknown format 'csv'"),
    ({"paths": "x", "format": "text", "weight": 0}, r"source 's': weight must be positive, got 0"),
    ({"paths": "x", "format": "text", "weight": -1.5}, r"source 's': weight must be positive, got -1.5"),
    ({"paths": "nope", "format": "embedded"}, r"source 's': unknown embedded part 'nope'"),
    ({"paths": "", "format": "text"}, r"source 's': no paths given"),
  ],
)
def test_bad_source_entries(entry, match):
  with pytest.raises(DataError, match=match):
    src = one(**entry)
    resolve_files(src)


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n{not json\n')
  with pytest.raises(DataError, match=rf"source 's': {path}:2 is not JSON"):
    docs(one(paths=str(path), format="jsonl"))
  path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(DataError, match=rf"source 's': {path}:2 lacks the text field 'text'"):
    docs(one(paths=str(path), format="jsonl"))
  path.write_text('{"text": 3}\n')
  with pytest.raises(DataError, match=r"field 'text' is int, expected str"):
    docs(one(paths=str(path), format="jsonl"))


def test_non_utf8_error_or_replace(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("caf\xe9 au lait".encode("latin-1"))
  with pytest.raises(DataError, match=rf"source 's': file {path} is not valid UTF-8 \(byte 3\)"):
    docs(one(paths=str(path), format="text"))
  assert docs(one(paths=str(path), format="text", on_bad_utf8="replace")) == ["caf\ufffd au lait"]
  (src,) = parse_sources({"s": {"paths": str(path), "format": "text", "weight": 1}}, on_bad_utf8="replace")
  assert docs(src) == ["caf\ufffd au lait"]
  jl = tmp_path / "bad.jsonl"
  jl.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
  with pytest.raises(DataError, match=rf"{jl}:2 is not valid UTF-8"):
    docs(one(paths=str(jl), format="jsonl"))


def test_empty_source_and_small_budget_fail_before_work(tmp_path):
  (tmp_path / "tiny.txt").write_text("hi")
  cfg = default_data_config()
  cfg.sources = {
    "only": {"paths": str(tmp_path / "tiny.txt"), "format": "text", "weight": 1.0, "min_chars": 100}
  }
  wd = tmp_path / "wd"
  with pytest.raises(
    DataError, match=r"source 'only': no documents in 1 file\(s\) after filters \(min_chars=100"
  ):
    prepare(cfg, str(wd), token_budget=10_000, tokens_per_batch=1024, log=lambda *_: None)
  assert not (wd / "tokenizer").exists()
  with pytest.raises(DataError, match=r"token budget 1000 is smaller than one batch \(4096 tokens\)"):
    prepare(cfg, str(wd), token_budget=1000, tokens_per_batch=4096, log=lambda *_: None)


def test_llama_mixture_config(tmp_path):
  from experiments.data import default, llama_mixture
  from gpt_jax.data.mixture import mixture_table

  cfg = llama_mixture.get_config(f"books={tmp_path}/b/*.txt;arxiv={tmp_path}/a.parquet")
  srcs = parse_sources(cfg.sources)
  stats = {s.name: {"documents": 1, "tokens": 10**9, "bytes": 1} for s in srcs}
  table = {
    r["source"]: r for r in mixture_table([s.name for s in srcs], [s.weight for s in srcs], stats, 10**9)
  }
  paper = {
    "commoncrawl": 67.0,
    "c4": 15.0,
    "github": 4.5,
    "wikipedia": 4.5,
    "books": 4.5,
    "arxiv": 2.5,
    "stackexchange": 2.0,
  }
  assert {k: round(100 * r["share"], 6) for k, r in table.items()} == paper
  by = {s.name: s for s in srcs}
  assert by["books"].format == "text" and by["arxiv"].format == "parquet" and by["c4"].format == "jsonl"
  assert by["c4"].paths == ("/data/llama/c4/*.jsonl",)
  with pytest.raises(DataError, match=r"source 'books': glob '.*/b/\*.txt' matches no file"):
    resolve_files(by["books"])
  assert default.get_config().to_dict() == default_data_config().to_dict()
