"""Pretraining configs: `get_config("PRESET")`.

  python -m gpt_jax pretrain --config=experiments/pretrain.py:tiny --workdir=/tmp/gpt_jax/pretrain

Presets: tiny (CPU demo, LLaMA-style, 1.8M parameters), tiny_gpt2, cpu_bench (L=6 H=6 D=384 T=256),
gpt2_124m, gpt2_350m, llama_1b, llama_7b, llama_13b, llama_65b, gpt3_175b. The large presets carry
their papers' batch sizes, learning rates and token budgets (GPT-3: 300B tokens; LLaMA-65B: 1.4T);
`python -m gpt_jax describe --config=experiments/pretrain.py:llama_65b --devices=2048 --device=a100`
prints what that costs.

Data: every preset but gpt2_124m_fineweb reads the embedded default corpus. Replace the data section
with a data config file (FILE.py:ARG; its keys may follow), e.g.
  --config.data=experiments/data/files.py:'/corpus/*.jsonl,/corpus/*.parquet'   your files, one source
  --config.data=experiments/data/llama_mixture.py:/data/llama                    the LLaMA mixture
and choose the tokenizer with --config.data.tokenizer.kind=hf --config.data.tokenizer.path=DIR (a
Hugging Face tokenizer directory) or leave gpt_jax to train its SentencePiece model on the data.

gpt2_124m_fineweb: GPT-2 124M on FineWeb(-edu) parquet shards with GPT-2's own tokenizer
(experiments/data/fineweb.py), with nanoGPT's GPT-2 reproduction hyperparameters (0.5M-token
batches, lr 6e-4, 715 warmup steps, cosine to 10% over 19,073 steps = 10B tokens, weight decay 0.1);
its eval/loss is in nats per GPT-2 token, the unit of nanoGPT's, llm.c's and modded-nanogpt's
validation loss (the speedruns race to 3.28). See docs/data.md for the download and the command.

Continued pretraining: --config.train.init_from=RUN (a gpt_jax run or an `import-hf` directory) with
the preset that has RUN's model (e.g. gpt2_124m for an imported GPT-2); docs/data.md.
"""

import os

from gpt_jax import config as config_lib
from gpt_jax import model as model_lib
from gpt_jax.stages import pretrain

_HERE = os.path.dirname(os.path.abspath(__file__))

# preset -> the model preset and the keys that differ from the stage's defaults
_PRESETS = {
  # Sized so the whole demo pipeline fits in minutes on 2 CPU cores (2,048-token batches).
  "tiny": {
    "model": "tiny",
    "train.steps": 200,
    "train.global_batch": 16,
    "train.seq_len": 128,
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
    "optim.lr_peak": 3e-3,
    "optim.warmup_steps": 20,
  },
  "tiny_gpt2": {
    "model": "tiny_gpt2",
    "train.steps": 300,
    "train.global_batch": 16,
    "train.seq_len": 256,
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
    "optim.lr_peak": 3e-3,
    "optim.warmup_steps": 30,
  },
  "cpu_bench": {
    "model": "cpu_bench",
    "train.steps": 200,
    "train.global_batch": 16,
    "train.seq_len": 256,
    "optim.lr_peak": 1e-3,
    "optim.warmup_steps": 20,
  },
  # GPT-2 124M on ~10B tokens (0.5M-token batches), as commonly reproduced.
  "gpt2_124m": {
    "model": "gpt2_124m",
    "train.steps": 19073,
    "train.global_batch": 512,
    "train.seq_len": 1024,
    "train.eval_every": 250,
    "train.checkpoint_every": 1000,
    "train.log_every": 10,
    "optim.lr_peak": 6e-4,
    "optim.warmup_steps": 715,
  },
  # The same on FineWeb(-edu) with GPT-2's tokenizer: nanoGPT's GPT-2 reproduction. Each eval reads
  # 20 batches = 10.5M held-out tokens; the packed documents attend to each other, as in nanoGPT.
  "gpt2_124m_fineweb": {
    "model": "gpt2_124m",
    "data": "fineweb",
    "train.steps": 19073,
    "train.global_batch": 512,
    "train.seq_len": 1024,
    "train.eval_every": 250,
    "train.eval_batches": 20,
    "train.checkpoint_every": 1000,
    "train.log_every": 10,
    "optim.lr_peak": 6e-4,
    "optim.warmup_steps": 715,
  },
  "gpt2_350m": {
    "model": "gpt2_350m",
    "train.steps": 19073,
    "train.global_batch": 512,
    "train.seq_len": 1024,
    "train.eval_every": 250,
    "train.checkpoint_every": 1000,
    "optim.lr_peak": 3e-4,
    "optim.warmup_steps": 715,
  },
  "llama_1b": {
    "model": "llama_1b",
    "train.steps": 100_000,
    "train.global_batch": 512,
    "train.seq_len": 2048,
    "train.eval_every": 1000,
    "train.checkpoint_every": 1000,
    "optim.lr_peak": 4e-4,
    "optim.warmup_steps": 2000,
  },
  # LLaMA (Touvron et al. 2023): 4M-token batches, cosine to 10%, warmup 2000, wd 0.1, clip 1.0.
  "llama_7b": {
    "model": "llama_7b",
    "train.steps": 250_000,
    "train.global_batch": 2048,
    "train.seq_len": 2048,
    "train.eval_every": 1000,
    "train.checkpoint_every": 1000,
    "optim.lr_peak": 3e-4,
    "optim.warmup_steps": 2000,
  },
  "llama_65b": {
    "model": "llama_65b",
    "train.steps": 333_786,
    "train.global_batch": 2048,
    "train.seq_len": 2048,
    "train.eval_every": 1000,
    "train.checkpoint_every": 1000,
    "optim.lr_peak": 1.5e-4,
    "optim.warmup_steps": 2000,
  },
  # GPT-3 175B (Brown et al. 2020, appendix B): 3.2M-token batches, 300B tokens, lr 0.6e-4, warmup
  # over the first 375M tokens (119 steps), cosine to 10% over 260B tokens (82,652 steps), then 10%.
  # Its batch-size ramp (32K tokens up to the full batch over the first 4-12B tokens) is not modeled.
  "gpt3_175b": {
    "model": "gpt3_175b",
    "train.steps": 95_367,
    "train.global_batch": 1536,
    "train.seq_len": 2048,
    "train.eval_every": 1000,
    "train.checkpoint_every": 1000,
    "optim.lr_peak": 0.6e-4,
    "optim.warmup_steps": 119,
    "optim.decay_steps": 82_652,
  },
}
_PRESETS["llama_13b"] = {**_PRESETS["llama_7b"], "model": "llama_13b"}  # LLaMA's 7B recipe, 13B model
# Accelerator presets: bfloat16 compute, rematerialization (everything for the largest), and a
# tokenizer of at most 32K pieces trained on the data (the model's table may be larger).
_GPU = {
  "gpt2_124m": "dots_no_batch",
  "gpt2_124m_fineweb": "dots_no_batch",
  "gpt2_350m": "dots_no_batch",
  "llama_1b": "dots_no_batch",
  "llama_7b": "full",
  "llama_13b": "full",
  "llama_65b": "full",
  "gpt3_175b": "full",
}


def get_config(arg: str = "tiny"):
  preset = dict(config_lib.preset(_PRESETS, arg, "experiments/pretrain.py"))
  cfg = pretrain.default_config()
  model = preset.pop("model")
  gpu = dict(dtype="bfloat16", remat_policy=_GPU[arg]) if arg in _GPU else {}
  cfg.model = model_lib.preset_config(model, **gpu)
  data = preset.pop("data", None)
  if data is not None:  # a data config of experiments/data/ with its default paths
    cfg.data = config_lib.load_file(os.path.join(_HERE, "data", f"{data}.py"), what=f"preset {arg}")
  config_lib.apply_overrides(cfg, preset)
  if arg in _GPU and data is None:
    cfg.data.tokenizer.vocab_size = min(cfg.model.vocab_size, 32000)
  return cfg
