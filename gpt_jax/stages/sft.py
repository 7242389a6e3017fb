"""Supervised finetuning: next-token loss on assistant turns of packed conversations, starting from a
pretraining checkpoint, with exact-match accuracy of greedy replies on held-out prompts at each eval.

  python -m gpt_jax sft --config=experiments/sft.py:tiny --config.train.init_from=PRETRAIN_WORKDIR --workdir=DIR

With sft.data_path '' the embedded graded tasks (gpt_jax/data/tasks.py) are generated into
DIR/data/{train,eval}.jsonl. The tokenizer comes from the pretraining workdir and is copied into DIR.

train.init_from may also be a Hugging Face model imported with `python -m gpt_jax import-hf` (a
directory with model_config.json and state/): the model config must then equal the import's, and the
model keeps its own vocabulary: its tokenizer files are copied into DIR/hf_tokenizer/ and read through
the chat adapter interop.hf_tokenizer.ChatTokenizer (role markers as plain text, end of turn = eos),
which every later stage (rm, ppo, chat, export-hf) loads from there too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import distributed, sampling, sharding, trainer
from gpt_jax import metrics as metrics_lib
from gpt_jax import model as model_lib
from gpt_jax.data import sft as sft_data
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.data.tokenizer import (
  HF_TOKENIZER_DIR,
  META_FILE,
  MODEL_FILE,
  Tokenizer,
  check_vocab,
  has_tokenizer,
  load_any_tokenizer,
)
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.interop import hf as hf_lib
from gpt_jax.model import ModelConfig
from gpt_jax.stages.pretrain import lm_loss

# Model keys that only change how the same weights are computed; all others must match the checkpoint.
RUNTIME_MODEL_KEYS = (
  "family",
  "init_std",
  "dtype",
  "param_dtype",
  "scan_layers",
  "remat_policy",
  "attention_impl",
)


# --- config ---------------------------------------------------------------------------------------


def task_spec(s) -> tasks_lib.TaskSpec:
  """The TaskSpec of the cfg.sft task_* knobs (ConfigError names the sft key)."""
  return tasks_lib.spec_from_config(s, "sft")


def validate(cfg) -> ModelConfig:
  """All checks that need no data and no compile; returns the model config."""
  model_cfg = ModelConfig.from_config(cfg.model)
  config_lib.validate_train(cfg, jax.device_count())
  s = cfg.sft
  decay = int(cfg.optim.decay_steps) or int(cfg.train.steps)
  if int(cfg.optim.warmup_steps) >= decay:
    raise ConfigError(
      f"optim.warmup_steps: {cfg.optim.warmup_steps} must be smaller than the decay steps ({decay})"
    )
  if not str(cfg.train.init_from):
    raise ConfigError("train.init_from: required; set it to the pretraining workdir (or its checkpoints dir)")
  if s.too_long not in ("drop", "truncate"):
    raise ConfigError(f"sft.too_long: must be 'drop' or 'truncate', got {s.too_long!r}")
  config_lib.check_at_least(
    s, "sft", dict(eval_samples=0, max_new_tokens=1, sample_batch=1, task_train=1, task_eval=1)
  )
  config_lib.check_room_for_prompt(s, "sft", "max_new_tokens", model_cfg.max_seq_len)
  tasks_lib.check_data_section(s, "sft", "tasks")
  return model_cfg


# --- the checkpoint to start from -----------------------------------------------------------------


@dataclasses.dataclass
class InitSource:
  """Where the pretrained model lives: its checkpoint path and the workdir holding its tokenizer."""

  checkpoint: str  # a checkpoints directory (newest valid step), one step directory, or an import
  workdir: str
  imported: bool = False  # an import-hf directory: checkpoint == workdir, model_config.json, hf_tokenizer/


def is_imported(path: str) -> bool:
  """True for a directory written by import-hf (model_config.json next to state/)."""
  return os.path.isfile(os.path.join(path, hf_lib.MODEL_CONFIG)) and os.path.isdir(
    os.path.join(path, hf_lib.STATE)
  )


def resolve_init(path: str) -> InitSource:
  """Accepts a pretraining workdir, its checkpoints dir, one step dir, or an imported Hugging Face
  checkpoint (import-hf); CheckpointError if missing."""
  p = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.exists(p):
    raise CheckpointError(f"train.init_from: {p} does not exist")
  if is_imported(p):
    return InitSource(p, p, imported=True)
  if os.path.isdir(os.path.join(p, "checkpoints")):
    return InitSource(os.path.join(p, "checkpoints"), p)
  if os.path.isdir(os.path.join(p, "state")):  # one step directory: <workdir>/checkpoints/<step>
    return InitSource(p, os.path.dirname(os.path.dirname(p)))
  return InitSource(p, os.path.dirname(p))


def init_extra(src: InitSource) -> dict:
  """The init checkpoint's saved extra ({"stage", "config", ...}); an import's is {"stage": "import",
  "config": {"model": its model_config.json}}."""
  if src.imported:
    path = os.path.join(src.checkpoint, hf_lib.MODEL_CONFIG)
    try:
      with open(path) as f:
        model = {k: v for k, v in json.load(f).items() if not k.startswith("_")}  # _source: provenance
    except (OSError, ValueError) as e:
      raise CheckpointError(f"train.init_from: {path} is unreadable ({e})") from None
    return {"stage": "import", "config": {"model": model}}
  ckpt_dir, step = src.checkpoint, None
  if os.path.isdir(os.path.join(ckpt_dir, "state")):
    ckpt_dir, step = os.path.dirname(ckpt_dir), int(os.path.basename(ckpt_dir))
  with ckpt_lib.Checkpointer(ckpt_dir, create=False) as ck:
    return ck.read_extra(step)


def saved_model_config(src: InitSource) -> dict | None:
  """The model config the checkpoint was trained with (its saved extra, else the workdir's config.json;
  an import's model_config.json)."""
  extra = init_extra(src)
  model = (extra.get("config") or {}).get("model")
  if model is None and os.path.isfile(os.path.join(src.workdir, "config.json")):
    with open(os.path.join(src.workdir, "config.json")) as f:
      model = json.load(f).get("model")
  return model


def derived_model_keys(model: dict) -> dict:
  """The model keys with each "0 = derive it" value (d_ff, head_dim, num_kv_heads) replaced by what it
  derives, so that e.g. an import's num_kv_heads=32 equals a preset's 0 with 32 heads."""
  m = dict(model)
  try:
    d, h = int(m["d_model"]), int(m["num_heads"])
    for key, value in (("d_ff", 4 * d), ("head_dim", d // h), ("num_kv_heads", h)):
      if not int(m.get(key) or 0):
        m[key] = value
  except (KeyError, TypeError, ValueError, ZeroDivisionError):
    pass  # an invalid config: ModelConfig.validate names it
  return m


def model_difference(saved: dict, current: dict) -> tuple[str, object, object] | None:
  """(key, current value, saved value) of a model key that changes the model (RUNTIME_MODEL_KEYS do
  not), or None. "0 = derive it" equals the value it derives; a key set differently is named before
  one that differs only through another (d_model 64 vs 32 before the d_ff it derives)."""
  a, b = derived_model_keys(saved), derived_model_keys(current)
  keys = [k for k in sorted(set(a) | set(b)) if k not in RUNTIME_MODEL_KEYS and a.get(k) != b.get(k)]
  if not keys:
    return None
  raw = [k for k in keys if saved.get(k) != current.get(k)]
  key = (raw or keys)[0]
  return (key, current.get(key), saved.get(key)) if raw else (key, b.get(key), a.get(key))


def check_init(cfg, src: InitSource) -> None:
  """CheckpointError naming the first model key whose value differs from the checkpoint's."""
  saved = saved_model_config(src)
  if saved is None:
    return  # no config saved: the leaf-by-leaf check of restore_params still names any differing tensor
  diff = model_difference(saved, config_lib.to_dict(cfg.model))
  if diff is not None:
    key, mine, theirs = diff
    raise CheckpointError(
      f"model.{key}: {mine!r} differs from {theirs!r} in the init checkpoint {src.checkpoint}; "
      f"the SFT model must have the {'imported' if src.imported else 'pretraining'} model's shape"
    )


def restore_init(cfg, src: InitSource | None, abstract_params):
  """The pretrained params, placed as abstract_params' shardings say (fit calls this only when the
  workdir has no valid checkpoint: a fresh run, or a resumed one whose checkpoints all failed checks)."""
  if src is None:
    src = resolve_init(cfg.train.init_from)
    check_init(cfg, src)
  return ckpt_lib.restore_params(src.checkpoint, abstract_params)


def has_checkpoint(workdir: str) -> bool:
  """True when the workdir already holds a finished checkpoint (then the run resumes from it)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return False
  return any(
    n.isdigit() and os.path.isfile(os.path.join(d, n, ckpt_lib.INTEGRITY_FILE)) for n in os.listdir(d)
  )


def install_tokenizer(src: InitSource | None, workdir: str, log_fn):
  """Copies the init checkpoint's tokenizer into the workdir (once) and returns it loaded.

  The project's SentencePiece model goes to <workdir>/tokenizer/; an imported model's own tokenizer
  (<src>/hf_tokenizer/) to <workdir>/hf_tokenizer/, loaded as the chat adapter. Either way
  load_any_tokenizer(workdir) reads it back, for this stage's successors. On a second run the copy
  must still be the init checkpoint's (same sha256)."""
  if has_tokenizer(workdir):
    tok = load_any_tokenizer(workdir)
    if src is not None:
      theirs = load_any_tokenizer(src.workdir)
      if theirs.sha256() != tok.sha256():
        raise DataError(
          f"tokenizer {tok.path} differs from the init workdir's {theirs.path}; use a new --workdir"
        )
    return tok
  if src is None:
    raise DataError(f"tokenizer: {workdir} has neither tokenizer/{MODEL_FILE} nor {HF_TOKENIZER_DIR}/")
  if src.imported and not has_tokenizer(src.workdir):
    raise DataError(
      f"train.init_from: the imported checkpoint {src.workdir} has no {HF_TOKENIZER_DIR}/ (its Hugging Face "
      "directory had no tokenizer files); import a directory that has tokenizer.json or tokenizer.model"
    )
  theirs = load_any_tokenizer(src.workdir)
  if isinstance(theirs, Tokenizer):
    mine = os.path.join(workdir, "tokenizer")
    os.makedirs(mine, exist_ok=True)
    for name in (META_FILE, MODEL_FILE):  # the model last: its presence marks a finished copy
      path = os.path.join(os.path.dirname(theirs.path), name)
      if os.path.isfile(path):
        tmp = os.path.join(mine, f"{name}.tmp{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, os.path.join(mine, name))
  else:  # copied whole into a temporary directory, then renamed: its presence marks a finished copy
    tmp = os.path.join(workdir, f"{HF_TOKENIZER_DIR}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(theirs.path, tmp)
    try:
      os.replace(tmp, os.path.join(workdir, HF_TOKENIZER_DIR))
    except OSError:  # another process of this run finished its copy first
      if not has_tokenizer(workdir):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  log_fn(f"[sft] tokenizer ({theirs.vocab_size} pieces) copied from {theirs.path}")
  return load_any_tokenizer(workdir)


# --- data -----------------------------------------------------------------------------------------


def load_data(cfg, workdir: str, log_fn) -> tuple[list, list]:
  """Returns (train, eval) conversations: the configured files, or the embedded tasks written once
  into <workdir>/data/ (never overwritten: a resumed run reads what the first run wrote)."""
  s = cfg.sft
  if s.data_path:
    train = sft_data.read_conversations(s.data_path)
    if s.eval_path:
      return train, sft_data.read_conversations(s.eval_path)
    train, held = sft_data.hash_split(train, float(s.eval_fraction))
    if not held or not train:
      raise DataError(
        f"sft.data_path: {s.data_path} is too small to hold out sft.eval_fraction={s.eval_fraction}; "
        "give sft.eval_path"
      )
    return train, held
  spec, data_dir = task_spec(s), os.path.join(workdir, "data")
  paths = {split: os.path.join(data_dir, f"{split}.jsonl") for split in ("train", "eval")}
  for split, n in (("train", int(s.task_train)), ("eval", int(s.task_eval))):
    if not os.path.isfile(paths[split]) and jax.process_index() == 0:
      rows = tasks_lib.task_rows(tasks_lib.make_tasks(split, n, int(s.task_seed), spec))
      tasks_lib.write_jsonl(paths[split], rows)
      log_fn(f"[sft] wrote {n} {split} tasks ({', '.join(spec.kinds)}) -> {paths[split]}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("gpt_jax_sft_tasks_written")
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


# --- accuracy -------------------------------------------------------------------------------------


def make_accuracy_eval(cfg, model: trainer.Model, tokenizer, convs, log_fn):
  """Returns extra_eval(params, step) -> {"accuracy", "accuracy_<kind>", ...}: greedy replies to the first
  sft.eval_samples held-out prompts, graded by exact match with each conversation's last assistant turn."""
  s = cfg.sft
  n_new = int(s.max_new_tokens)
  room = model.cfg.max_seq_len - n_new
  items, skipped = [], 0
  for c in convs[: int(s.eval_samples)]:
    prompt, answer = c.prompt_and_answer()
    ids = tokenizer.render_chat(prompt, add_generation_prompt=True)[0]
    if len(ids) > room:
      skipped += 1
      continue
    items.append((ids, answer, c.kind))
  if skipped:
    log_fn(
      f"[sft] accuracy: {skipped} held-out prompts longer than model.max_seq_len - sft.max_new_tokens = "
      f"{room} tokens are left out"
    )
  if not items:
    return None
  end_of_turn = tokenizer.special_id("end_of_turn")
  prompt_len = min(-(-max(len(i[0]) for i in items) // 16) * 16, room)  # rounded: fewer distinct shapes
  # Rows of a sampler call: a multiple of the data-parallel shards, so that every device gets rows.
  shards = model.mesh.shape["data"] * model.mesh.shape["fsdp"]
  batch = -(-min(int(s.sample_batch), len(items)) // shards) * shards
  sampler = sampling.make_sampler(
    model.cfg,
    model.graphdef,
    eos_id=end_of_turn,
    pad_id=tokenizer.pad_id,
    max_prompt_len=prompt_len,
    sample_cfg=sampling.SampleConfig(max_new_tokens=n_new, greedy=True),
    mesh=model.mesh,
    params_sharding=model.shardings,
  )

  def extra_eval(params, step):
    del step
    scores: dict[str, list[float]] = {}
    for lo in range(0, len(items), batch):
      chunk = items[lo : lo + batch]
      prompts = [i[0] for i in chunk] + [chunk[0][0]] * (batch - len(chunk))  # one shape: one compile
      tokens_BP, lengths_B = sampling.pad_prompts(prompts, tokenizer.pad_id, prompt_len)
      out = jax.device_get(sampler(params, tokens_BP, lengths_B, jax.random.key(0)))
      for (_, answer, kind), row, n in zip(chunk, out.tokens, out.lengths):
        reply = [int(t) for t in row[: int(n)] if int(t) != end_of_turn]
        scores.setdefault(kind, []).append(tasks_lib.grade_text(answer, tokenizer.decode(reply)))
    result = {"accuracy": float(np.mean([x for v in scores.values() for x in v]))}
    if len(scores) > 1:
      result.update({f"accuracy_{k}": float(np.mean(v)) for k, v in sorted(scores.items())})
    return result

  return extra_eval


# --- the stage ------------------------------------------------------------------------------------


def run(cfg, workdir: str, log_fn=print) -> dict:
  """Finetunes the init_from checkpoint on the conversations to cfg.train.steps; resumes from the workdir.

  Returns trainer.fit's result plus "data": the dataset counts (also in metrics.jsonl as data/*).
  """
  model_cfg = validate(cfg)
  trainer.check_workdir(workdir)
  t, s = cfg.train, cfg.sft
  with distributed.WorkdirLock(workdir):
    resuming = has_checkpoint(workdir)
    src = None
    if not resuming:  # a resumed run needs nothing from the pretraining workdir any more
      src = resolve_init(t.init_from)
      check_init(cfg, src)
    trainer.save_config(workdir, cfg)
    tokenizer = install_tokenizer(src, workdir, log_fn)
    check_vocab(tokenizer, model_cfg.vocab_size)
    train_convs, eval_convs = load_data(cfg, workdir, log_fn)
    seq_len = int(t.seq_len)
    train_enc = sft_data.encode(train_convs, tokenizer, seq_len, s.too_long, "sft train")
    eval_enc = sft_data.encode(eval_convs, tokenizer, seq_len, s.too_long, "sft eval")
    data_stats = report_data(train_enc, eval_enc, s.too_long, log_fn)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
    writer.write(0, data_stats, prefix="data/")
    writer.close()

    mesh = sharding.make_mesh(cfg.mesh)
    model = trainer.Model.build(model_cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    loader_args = dict(
      global_batch=int(t.global_batch), seq_len=seq_len, sharding=batch_sh, pack=bool(s.pack)
    )
    train_loader = sft_data.SftLoader(train_enc, seed=int(s.seed), **loader_args)
    abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), model.shapes, model.shardings
    )
    stage = trainer.Stage(
      name="sft",
      loss_fn=lm_loss(model, document_mask=True),
      train_batches=train_loader,
      eval_batches=lambda: sft_data.SftLoader(eval_enc, shuffle=False, repeat=False, **loader_args),
      extra_eval=make_accuracy_eval(cfg, model, tokenizer, eval_convs, log_fn)
      if int(s.eval_samples)
      else None,
      init_params=lambda: restore_init(cfg, src, abstract),
      tokens_per_step=int(t.global_batch) * seq_len,
      flops_per_token=model_lib.flops_per_token(model_cfg, seq_len),
    )
    if src is not None:
      log_fn(f"[sft] starting from {src.checkpoint}")
    result = trainer.fit(cfg, workdir, model, stage, log_fn=log_fn)
    result["data"] = data_stats
    return result
