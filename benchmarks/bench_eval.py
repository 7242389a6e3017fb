"""Multiple-choice scoring throughput: gpt_jax's eval path against the same scoring through transformers.

One random GPT-2 made with transformers is imported into gpt_jax (import-hf), so both score the same
weights. Each question has --choices continuations of --cont tokens after a context of
--seq - --cont tokens; every row is (context + one choice) of exactly --seq tokens, so both sides run
one fixed shape: (--batch rows, --seq tokens). gpt_jax: loglik.Scorer (the jitted, bucketed scorer
that `eval --tasks=mc:...` and the lm-eval adapter use); transformers: the model's forward under
torch.inference_mode, log-softmax, the continuation tokens' log-probs summed, in the same batches.
Tokenization is left out of both (token ids in). Compilation and a warm-up pass are excluded; the
figure is the median over --repeats passes over all questions, the two sides in alternating turns
(a change of the machine's load falls on both); the two sides' log-likelihoods are compared too.

  python benchmarks/bench_eval.py                      # d_model 384, 6 layers, vocab 4096, T=128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def machine_line() -> str:
  import jax

  name = "CPU"
  try:
    with open("/proc/cpuinfo") as f:
      name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
  except OSError:
    pass
  dev = jax.devices()[0]
  return f"{name}, {os.cpu_count()} cores; jax {jax.__version__} ({dev.platform})"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d_model", type=int, default=384)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--seq", type=int, default=128, help="tokens per row (context + choice)")
  p.add_argument("--cont", type=int, default=8, help="tokens per choice")
  p.add_argument("--choices", type=int, default=4)
  p.add_argument("--questions", type=int, default=64)
  p.add_argument("--batch", type=int, default=32, help="rows per forward pass")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)

  import torch
  import transformers

  from gpt_jax import placed, runs, sharding
  from gpt_jax.eval import loglik
  from gpt_jax.interop import hf

  torch.manual_seed(0)
  cfg = transformers.GPT2Config(
    vocab_size=args.vocab,
    n_positions=max(256, args.seq),
    n_embd=args.d_model,
    n_layer=args.layers,
    n_head=args.heads,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
  )
  ref = transformers.GPT2LMHeadModel(cfg).eval()
  tmp = tempfile.mkdtemp(prefix="bench_eval_")
  ref.save_pretrained(os.path.join(tmp, "hf"), safe_serialization=True)
  hf.import_hf(
    os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt"), mesh_cfg={"data": -1, "fsdp": 1, "tensor": 1}
  )
  run = runs.open(os.path.join(tmp, "ckpt"))
  model = placed.Model.build(run.model_config(), sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
  params = run.restore(model.abstract())
  scorer = loglik.Scorer(model, batch=args.batch)

  rng = np.random.default_rng(0)
  ctx_len = args.seq + 1 - args.cont  # + 1: the first token is input only
  requests = []
  for _ in range(args.questions):
    ctx = rng.integers(0, args.vocab, ctx_len).tolist()
    for _ in range(args.choices):
      requests.append((ctx + rng.integers(0, args.vocab, args.cont).tolist(), args.cont))
  rows = len(requests)

  def run_jax():
    return scorer.score(params, requests)

  ids = torch.tensor([r[0] for r in requests])

  def run_torch():
    out = []
    with torch.inference_mode():
      for lo in range(0, rows, args.batch):
        x = ids[lo : lo + args.batch]
        logits = ref(x[:, :-1]).logits.float()
        lp = torch.log_softmax(logits[:, -args.cont :], -1)
        tgt = x[:, -args.cont :]
        out += lp.gather(-1, tgt[..., None])[..., 0].sum(-1).tolist()
    return out

  ours, theirs = run_jax(), run_torch()
  times = {"jax": [], "torch": []}
  for _ in range(args.repeats):
    for name, fn in (("jax", run_jax), ("torch", run_torch)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  t_jax, t_torch = statistics.median(times["jax"]), statistics.median(times["torch"])
  diff = float(np.max(np.abs(np.asarray([o[0] for o in ours]) - np.asarray(theirs))))
  result = {
    "machine": machine_line(),
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "shape": {"batch": args.batch, "seq": args.seq, "choices": args.choices, "cont": args.cont},
    "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads, "vocab": args.vocab},
    "questions": args.questions,
    "gpt_jax_examples_per_s": args.questions / t_jax,
    "transformers_examples_per_s": args.questions / t_torch,
    "speedup": t_torch / t_jax,
    "seconds_per_pass": {k: [round(t, 3) for t in v] for k, v in times.items()},
    "load_average": os.getloadavg(),
    "max_abs_loglik_diff": diff,
    "compiled_shapes": sorted(scorer.compiled_shapes),
  }
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
