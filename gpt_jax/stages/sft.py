"""Supervised finetuning: next-token loss on the assistant turns of packed conversations, from a
pretrained run, with the exact-match accuracy of greedy replies to held-out prompts at each eval.

  python -m gpt_jax sft --config=experiments/sft.py:tiny --config.train.init_from=PRETRAIN_DIR --workdir=DIR

With sft.data_path '' the embedded graded tasks (the `tasks` section, data/tasks.py) are generated into
DIR/data/{train,eval}.jsonl. The tokenizer is the init run's, copied into DIR.

train.init_from may also be a Hugging Face model imported with `import-hf`: the model config must then
describe the import, and the model keeps its own vocabulary (its tokenizer files are copied into
DIR/hf_tokenizer/ and read through the chat adapter of tokenizers/hf.py, as every later stage does).
"""

from __future__ import annotations

import os

import jax

from gpt_jax import config as config_lib
from gpt_jax import distributed, grading, loop, losses, placed, runs, sharding
from gpt_jax import metrics as metrics_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizers as tok_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.config import Key
from gpt_jax.data import jsonl
from gpt_jax.data import sft as sft_data
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.model import ModelConfig

SCHEMA = config_lib.stage_schema(
  "sft",
  model=model_lib.SCHEMA,
  tasks=tasks_lib.SCHEMA,
  sft={
    "data_path": Key(""),  # '' = the embedded tasks, written to <workdir>/data/{train,eval}.jsonl
    "eval_path": Key(""),  # '' with data_path: hold out eval_fraction of data_path by content hash
    "eval_fraction": Key(0.05, "(0, 1)"),
    "too_long": Key("drop", choices=("drop", "truncate")),  # conversations longer than train.seq_len + 1
    "pack": Key(True),  # several conversations per row (segment ids keep them apart)
    "seed": Key(0, ">= 0"),  # order of the conversations in each epoch
    "eval_samples": Key(128, ">= 0", resumable=True),  # held-out prompts answered greedily at each eval
    "max_new_tokens": Key(16, ">= 1", resumable=True),
    "sample_batch": Key(64, ">= 1", resumable=True),  # prompts per sampler call
  },
)
# Runs SFT may start from: any transformer without a head (a reward model's trunk is not a policy).
INIT_STAGES = ("pretrain", "sft", "dpo", "ppo", "grpo", runs.IMPORT)


def default_config():
  return config_lib.defaults(SCHEMA)


def validate(cfg) -> ModelConfig:
  """All checks that need no data and no compile; returns the model config."""
  config_lib.check(cfg, SCHEMA)
  model_cfg = ModelConfig.from_config(cfg.model)
  config_lib.check_train(cfg, jax.device_count())
  distributed.check_train(cfg)
  if not str(cfg.train.init_from):
    raise ConfigError("train.init_from: required; set it to the pretraining run's workdir (or an import)")
  config_lib.check_room_for_prompt(cfg.sft, "sft", "max_new_tokens", model_cfg.max_seq_len)
  tasks_lib.check_data_section(cfg.sft, "sft")
  tasks_lib.spec_from_config(cfg.tasks)
  return model_cfg


def load_data(cfg, workdir: str, log_fn) -> tuple[list, list]:
  """(train, eval) conversations: the configured files, or the embedded tasks written once into
  <workdir>/data/ (never overwritten: a resumed run reads what the first run wrote)."""
  s, tk = cfg.sft, cfg.tasks
  if s.data_path:
    train = sft_data.read_conversations(s.data_path)
    if s.eval_path:
      return train, sft_data.read_conversations(s.eval_path)
    train, held = sft_data.hash_split(train, float(s.eval_fraction))
    if not held or not train:
      raise DataError(
        f"sft.data_path: {s.data_path} is too small to hold out sft.eval_fraction={s.eval_fraction}; give sft.eval_path"
      )
    return train, held
  spec, data_dir = tasks_lib.spec_from_config(tk), os.path.join(workdir, "data")
  paths = {split: os.path.join(data_dir, f"{split}.jsonl") for split in ("train", "eval")}
  for split, n in (("train", int(tk.train)), ("eval", int(tk.eval))):
    if not os.path.isfile(paths[split]) and jax.process_index() == 0:
      jsonl.write_jsonl(paths[split], tasks_lib.task_rows(tasks_lib.make_tasks(split, n, int(tk.seed), spec)))
      log_fn(f"[sft] wrote {n} {split} tasks ({', '.join(spec.kinds)}) -> {paths[split]}")
  distributed.barrier("gpt_jax_sft_tasks_written")
  return sft_data.read_conversations(paths["train"]), sft_data.read_conversations(paths["eval"])


def report_data(train_enc, eval_enc, too_long: str, log_fn) -> dict:
  """Logs the counts (never a silent cut) and returns them flat for metrics.jsonl."""
  out = {}
  for name, enc in (("train", train_enc), ("eval", eval_enc)):
    st = enc.stats
    log_fn(
      f"[sft] {name}: {st['conversations']} conversations, {st['tokens']} tokens ({st['assistant_tokens']} "
      f"assistant); too long: {st['dropped_too_long']} dropped, {st['truncated']} truncated (sft.too_long={too_long})"
    )
    out.update({f"{name}_{k}": v for k, v in st.items()})
  return out


def accuracy_eval(cfg, model, tokenizer, convs, log_fn):
  """extra_eval(params, step) -> {"accuracy", "accuracy_<kind>"...} of greedy replies to the first
  sft.eval_samples held-out prompts, graded by exact match with each conversation's last assistant turn."""
  s = cfg.sft
  prompts = []
  for c in convs[: int(s.eval_samples)]:
    prompt, answer = c.prompt_and_answer()
    text = prompt[-1]["content"] if prompt else ""
    prompts.append(
      grading.Prompt(tokenizer.render_chat(prompt, add_generation_prompt=True)[0], answer, c.kind, text)
    )
  answerer = grading.Answerer(
    model, tokenizer, prompts, max_new_tokens=int(s.max_new_tokens), batch=int(s.sample_batch)
  )
  if answerer.dropped:
    log_fn(
      f"[sft] accuracy: {answerer.dropped} held-out prompts longer than model.max_seq_len - sft.max_new_tokens = "
      f"{model.cfg.max_seq_len - int(s.max_new_tokens)} tokens are left out"
    )
  return (lambda params, step: answerer.accuracy(params)) if answerer.graded else None


def run(cfg, workdir: str, log_fn=print) -> loop.Result:
  """Finetunes the init_from run on the conversations to cfg.train.steps; resumes from the workdir."""
  model_cfg = validate(cfg)
  workdir_lib.check_writable(workdir)
  t, s = cfg.train, cfg.sft
  with workdir_lib.WorkdirLock(workdir):
    resume = runs.check_resume(workdir, cfg, SCHEMA, steps=int(t.steps))
    src = None
    if resume.step is None:  # a resumed run needs nothing from the init run any more
      src = runs.open(t.init_from)
      runs.check_stage(src, INIT_STAGES, "train.init_from", "SFT starts from a model without a scalar head")
      runs.check_model(config_lib.to_dict(cfg.model), src, "the init run's model")
    tokenizer = runs.install_tokenizer(src, workdir, log_fn)
    init = src.fact() if src is not None else resume.extra.get("init")
    record = {**runs.tokenizer_record(tokenizer), **({"init": init} if init else {})}
    resume.check_record(record)
    tok_lib.check_vocab(tokenizer, model_cfg.vocab_size)
    train_convs, eval_convs = load_data(cfg, workdir, log_fn)
    seq_len = int(t.seq_len)
    train_enc = sft_data.encode(train_convs, tokenizer, seq_len, s.too_long, "sft train")
    eval_enc = sft_data.encode(eval_convs, tokenizer, seq_len, s.too_long, "sft eval")
    data_stats = report_data(train_enc, eval_enc, s.too_long, log_fn)
    with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False) as w:
      w.write(0, data_stats, prefix="data/")

    mesh = sharding.make_mesh(cfg.mesh)
    model = placed.Model.build(model_cfg, mesh)
    loader_args = dict(
      global_batch=int(t.global_batch),
      seq_len=seq_len,
      sharding=sharding.batch_sharding(mesh),
      pack=bool(s.pack),
    )
    if src is not None:
      log_fn(f"[sft] starting from {src.describe()}")
    job = loop.supervised(
      cfg,
      model,
      name="sft",
      loss_fn=losses.lm_loss(model.apply, document_mask=True),
      train_batches=sft_data.SftLoader(train_enc, seed=int(s.seed), **loader_args),
      eval_batches=lambda: sft_data.SftLoader(eval_enc, shuffle=False, repeat=False, **loader_args),
      extra_eval=accuracy_eval(cfg, model, tokenizer, eval_convs, log_fn) if int(s.eval_samples) else None,
      init_params=lambda: src.restore(model.abstract()),
      tokens_per_step=int(t.global_batch) * seq_len,
      flops_per_token=model_lib.flops_per_token(model_cfg, seq_len),
      record=record,
    )
    return loop.run(cfg, workdir, job, log_fn=log_fn)
