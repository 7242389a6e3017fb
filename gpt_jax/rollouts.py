"""What an RL stage (PPO, GRPO) starts from and how it samples: the SFT and reward-model runs, the
prompts, and the Actor that answers prompts with the policy in fixed-shape batches, grades the answers
on the host and measures held-out gold accuracy and pass@k.

Only token ids come back from the devices (to be decoded and graded); the gold scores go back as a
(B,) array. Every held-out figure is a function of the parameters and fixed keys alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import distributed, grading, placed, rl, runs, sampling, sharding
from gpt_jax import tokenizers as tok_lib
from gpt_jax.data import jsonl
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.model import ModelConfig

log = logging.getLogger("gpt_jax")

# --- what an RL stage starts from ---------------------------------------------------------------------


@dataclasses.dataclass
class Sources:
  """The finished runs an RL stage starts from, checked to fit together."""

  sft: runs.Run  # the policy's and the reference's start
  rm: runs.Run | None  # the reward model (None when the reward needs none)
  rm_model: ModelConfig | None
  tokenizer: object
  score_mean: float  # the reward model's score statistics over the SFT model's samples
  score_std: float
  task_spec: tasks_lib.TaskSpec  # the SFT run's task space
  eval_seed: int  # the SFT run's tasks seed: its held-out prompts are every RL method's

  def record(self) -> dict:
    """What each checkpoint of the RL run records of what it started from (loop.Job.record)."""
    init = {"sft": self.sft.fact(), "rm": self.rm.fact() if self.rm is not None else None}
    return {**runs.tokenizer_record(self.tokenizer), "init": init}


def check_rm_pairing(rm: runs.Run, sft: runs.Run, section: str) -> None:
  """ConfigError unless the reward model was trained from this SFT checkpoint: its reward_stats and
  its notion of a good reply are those of the policy's own starting model."""
  init = rm.extra.get("init")
  if not isinstance(init, dict):
    log.warning(
      "%s.rm_workdir: %s records no run it started from; its SFT model is not checked", section, rm.workdir
    )
    return
  mine = sft.fact()
  if (init.get("workdir"), init.get("step")) != (mine["workdir"], mine["step"]):
    raise ConfigError(
      f"{section}.rm_workdir: the reward model {rm.workdir} was trained from {init.get('workdir')} (step "
      f"{init.get('step')}), not from {section}.sft_workdir {mine['workdir']} (step {mine['step']}); train a "
      f"reward model from the policy's SFT run, or point {section}.sft_workdir at "
      f"{init.get('workdir')}/checkpoints/{init.get('step')}"
    )


def open_sources(cfg, section: str, *, need_rm: bool) -> Sources:
  """Opens `cfg.<section>.sft_workdir` (an SFT run of this config's model shape) and, when need_rm,
  `.rm_workdir` (a reward model trained from that SFT run's tokenizer, with its reward_stats.json).
  The config's task space must be the SFT run's. Errors name the key."""
  s = cfg[section]
  sft = runs.open(s.sft_workdir, f"{section}.sft_workdir")
  runs.check_stage(
    sft, ("sft", "dpo"), f"{section}.sft_workdir", "the policy starts from a finetuned (chat) model"
  )
  runs.check_model(config_lib.to_dict(cfg.model), sft, "the SFT model")
  tok = sft.tokenizer()
  tok_lib.check_vocab(tok, int(cfg.model.vocab_size))
  rm, rm_model, mean, std = None, None, 0.0, 1.0
  if need_rm:
    rm = runs.open(s.rm_workdir, f"{section}.rm_workdir")
    runs.check_stage(rm, ("rm",), f"{section}.rm_workdir")
    check_rm_pairing(rm, sft, section)
    rm_model = ModelConfig.from_config(rm.model)
    if rm_model.vocab_size != int(cfg.model.vocab_size):
      raise ConfigError(
        f"{section}.rm_workdir: the reward model's model.vocab_size={rm_model.vocab_size} differs from the "
        f"policy's {cfg.model.vocab_size}; both must embed the same token ids"
      )
    runs.check_same_tokenizer(tok, rm.tokenizer(), f"{section}.rm_workdir")
    stats = rm.reward_stats()
    if stats is None:
      raise DataError(
        f"{section}.rm_workdir: {rm.workdir}/{runs.REWARD_STATS_FILE} is missing (written by reward modeling)"
      )
    mean, std = float(stats["mean"]), float(stats["std"])
  sft_tasks = sft.config.get("tasks") or {}
  spec = tasks_lib.spec_from_config({**config_lib.to_dict(cfg.tasks), **sft_tasks})
  for key in tasks_lib.SPACE_KEYS:
    if key in sft_tasks and sft_tasks[key] != cfg.tasks[key]:
      raise ConfigError(
        f"tasks.{key}: {cfg.tasks[key]!r} differs from {sft_tasks[key]!r} in the SFT run {sft.workdir}"
      )
  return Sources(sft, rm, rm_model, tok, mean, std, spec, int(sft_tasks.get("seed", 0)))


def load_prompts(cfg, section: str, src: Sources, *, need_gold: bool) -> tuple[list, list]:
  """(train prompts, held-out prompts) as grading.Prompt lists: `<section>.prompts` / `.eval_path`
  files, else the embedded tasks (training prompts drawn with this stage's tasks section; held-out ones
  are the SFT run's, so every method is measured on the same prompts). DataError for an empty set, or
  a prompt without an answer when need_gold."""
  s, tok = cfg[section], src.tokenizer
  if s.prompts:
    train = grading.read_prompts(s.prompts, tok)
    if not train:
      raise DataError(f"{section}.prompts: {s.prompts} holds no prompts")
  else:
    train = grading.from_tasks(
      tasks_lib.make_tasks("train", int(cfg.tasks.train), int(cfg.tasks.seed), src.task_spec), tok
    )
  if need_gold:
    missing = [i for i, q in enumerate(train) if q.answer is None]
    if missing:
      raise DataError(
        f"{section}.reward: the grader needs an answer for every prompt; prompt {missing[0]} has none"
      )
  n_eval = int(s.eval_prompts)
  if s.eval_path:
    held = grading.read_prompts(s.eval_path, tok)[:n_eval]
  elif n_eval:
    held = grading.from_tasks(tasks_lib.make_tasks("eval", n_eval, src.eval_seed, src.task_spec), tok)
  else:
    held = []
  return train, held


def prompt_length(
  section: str, model_cfg: ModelConfig, rm_model: ModelConfig | None, n_new: int, sets: dict
) -> int:
  """The padded prompt length P: the longest prompt of all `sets` ({name: prompts}), rounded up to 8
  where room allows. ConfigError naming the prompt when it plus n_new tokens and the eos the reward
  model reads does not fit the policy's (or the reward model's) context."""
  cap, who = model_cfg.max_seq_len, "model.max_seq_len"
  if rm_model is not None and rm_model.max_seq_len < cap:
    cap, who = rm_model.max_seq_len, "the reward model's max_seq_len"
  longest = 1
  for name, prompts in sets.items():
    for i, q in enumerate(prompts):
      if len(q.ids) + n_new + 1 > cap:
        raise ConfigError(
          f"{section}.max_new_tokens: {name}[{i}] has {len(q.ids)} tokens; with {n_new} new tokens and the eos "
          f"that exceeds {who}={cap}"
        )
      longest = max(longest, len(q.ids))
  return min(-(-longest // 8) * 8, cap - n_new - 1)


class Reward:
  """A frozen reward model on the mesh, with the token ids its scoring needs."""

  def __init__(self, run: runs.Run, mesh, tokenizer):
    self.model = placed.Model.build(run.model_config(), mesh, head=True)
    self.params = run.restore(self.model.abstract(), item="params")
    self.eos_id, self.eot_id = tokenizer.eos_id, tokenizer.special_id("end_of_turn")

  def scores_of(self, rm_params, rollout):
    """The raw scores (B,) of "prompt + response + eos" of an Actor rollout (pure; jittable)."""
    mask_BN = rollout["response_mask_BN"].astype(jnp.float32)
    rows = rl.rollout_layout(
      rollout["tokens_BP"], rollout["lengths_B"], rollout["response_BN"], mask_BN, self.eos_id
    )
    return self.model.scores(rm_params, {"inputs": rows["tokens"], **rows})

  def scorer(self):
    """jitted `score(rm_params, rollout) -> (B,)` raw scores, replicated."""
    mesh = self.model.mesh

    def score(rm_params, rollout):
      with sharding.activation_mesh(mesh):
        return self.scores_of(rm_params, rollout)

    return jax.jit(score, out_shardings=sharding.replicated(mesh))


# --- answering with the policy --------------------------------------------------------------------------


class Actor:
  """The policy's sampler at a fixed batch of B rows and prompt length P (greedy and at `temperature`)."""

  def __init__(self, policy, tokenizer, *, P: int, N: int, B: int, temperature: float):
    self.tok, self.P, self.N, self.B = tokenizer, P, N, B
    self.eot = tokenizer.special_id("end_of_turn")
    self.samplers = {
      greedy: sampling.make_sampler(
        policy.cfg,
        policy.graphdef,
        eos_id=self.eot,
        pad_id=tokenizer.pad_id,
        max_prompt_len=P,
        sample_cfg=sampling.SampleConfig(max_new_tokens=N, temperature=float(temperature), greedy=greedy),
        mesh=policy.mesh,
        params_sharding=policy.shardings,
      )
      for greedy in (False, True)
    }

  def sample(self, params, prompts, key, *, greedy: bool = False):
    """Answers exactly B prompts. Returns (rollout, texts, golds): rollout holds the device arrays
    tokens_BP, lengths_B (the padded prompts), response_BN, response_mask_BN and gold_B (the grader's
    0/1, 0 where a prompt has no answer); golds is the host copy with NaN for those prompts."""
    tokens_BP, lengths_B = sampling.pad_prompts([q.ids for q in prompts], self.tok.pad_id, self.P)
    out = self.samplers[greedy](params, tokens_BP, lengths_B, key)
    toks, lens = distributed.to_host((out.tokens, out.lengths))
    texts = [grading.reply_text(self.tok, toks[i][: int(lens[i])], self.eot) for i in range(len(prompts))]
    golds = np.array(
      [np.nan if q.answer is None else tasks_lib.grade_text(q.answer, x) for q, x in zip(prompts, texts)],
      np.float32,
    )
    rollout = dict(
      tokens_BP=tokens_BP,
      lengths_B=lengths_B,
      response_BN=out.tokens,
      response_mask_BN=out.response_mask,
      gold_B=np.nan_to_num(golds),
    )
    return rollout, texts, golds

  def _chunks(self, prompts):
    for lo in range(0, len(prompts), self.B):
      chunk = prompts[lo : lo + self.B]
      yield lo, chunk, chunk + [chunk[0]] * (self.B - len(chunk))  # one shape: one compile

  def evaluate(self, params, prompts, *, score=None, samples_path: str | None = None) -> dict:
    """Greedy answers to held-out prompts: gold_accuracy (and per kind), response_length and, with
    `score(rollout) -> (B,) raw reward-model scores`, reward_raw; the answers to `samples_path`."""
    records = []
    for _, chunk, full in self._chunks(prompts):
      rollout, texts, golds = self.sample(params, full, jax.random.key(0), greedy=True)
      lengths = distributed.to_host(rollout["response_mask_BN"]).sum(axis=1)
      scores = distributed.to_host(score(rollout)) if score is not None else [None] * len(full)
      for q, text, g, s, n in zip(chunk, texts, golds, scores, lengths):
        gold = None if q.answer is None else float(g)
        records.append(
          dict(prompt=q.text, answer=q.answer, response=text, kind=q.kind, gold=gold, length=int(n))
        )
        if s is not None:
          records[-1]["reward_raw"] = float(s)
    result = {"response_length": float(np.mean([r["length"] for r in records]))}
    if score is not None:
      result["reward_raw"] = float(np.mean([r["reward_raw"] for r in records]))
    graded = [r for r in records if r["gold"] is not None]
    if graded:
      result["gold_accuracy"] = float(np.mean([r["gold"] for r in graded]))
      kinds = sorted({r["kind"] for r in graded})
      for k in kinds if len(kinds) > 1 else ():
        result[f"gold_accuracy_{k}"] = float(np.mean([r["gold"] for r in graded if r["kind"] == k]))
    if samples_path and jax.process_index() == 0:
      jsonl.write_jsonl(samples_path, records)
    return result

  def pass_at_k(self, params, prompts, k: int) -> dict:
    """k sampled answers per graded prompt: pass_at_<k> (share of prompts with a correct sample) and
    sample_accuracy (share of correct samples). Sampling-based RL raises the probability of answers
    the policy already samples, so pass@k of the starting model bounds roughly what it can bring to
    the greedy answers. The keys are fixed: a function of the params."""
    graded = [q for q in prompts if q.answer is not None]
    if k <= 0 or not graded:
      return {}
    flat = [q for q in graded for _ in range(k)]
    golds = []
    for lo, chunk, full in self._chunks(flat):
      golds += list(self.sample(params, full, jax.random.fold_in(jax.random.key(1), lo))[2][: len(chunk)])
    g_PK = np.asarray(golds, np.float32).reshape(len(graded), k)
    return {f"pass_at_{k}": float(g_PK.max(axis=1).mean()), "sample_accuracy": float(g_PK.mean())}


# --- what the RL stages share around one iteration ---------------------------------------------------

# The train section of an RL stage: it counts iterations of sampled replies, not steps over a dataset.
TRAIN = config_lib.subset(
  config_lib.TRAIN, drop=("steps", "global_batch", "seq_len", "eval_every", "eval_batches", "init_from")
)


def iteration_metrics(step_metrics, stats, golds, *, gen_s: float, update_start: float) -> dict:
  """One iteration's host metrics: the optimizer steps' means, the rollouts' stats, the time split
  (gen_s: sampling and grading; update_s: from `update_start`, a perf_counter time, until the scoring
  and the optimizer steps are done on the devices), `finite` (all steps finite), `skipped` (steps that
  were not) and `gold` (the rollouts' graded mean)."""
  step_metrics, stats = jax.device_get((step_metrics, stats))  # waits for the devices
  update_s = time.perf_counter() - update_start
  m = {
    k: float(np.mean([s[k] for s in step_metrics])) for k in step_metrics[0] if k not in ("finite", "weight")
  }
  m.update({k: float(v) for k, v in stats.items()}, gen_s=gen_s, update_s=update_s)
  m["finite"] = min(float(s["finite"]) for s in step_metrics)
  m["skipped"] = float(sum(float(s["finite"]) < 1 for s in step_metrics))
  golds = np.asarray(golds)[np.isfinite(golds)]
  if golds.size:
    m["gold"] = float(np.mean(golds))
  return m


def sound_alarms(alarms, it: int, m: dict, reward: float, name: str, log_fn) -> None:
  """Feeds the iteration to the alarms (KL, reward hacking); logs and records what they say."""
  warnings = alarms.update(it, m["kl"], reward, m.get("gold"))
  m["alarm_kl"] = float(any("KL" in w for w in warnings))
  m["alarm_hacking"] = float(any("hacking" in w for w in warnings))
  for w in warnings:
    log_fn(f"[{name}] {w}")


def held_out(
  actor: Actor, params, prompts, src: Sources, *, it: int, last: int, pass_k: int, workdir: str, score=None
) -> dict:
  """An RL stage's evaluation at iteration `it`: greedy gold accuracy on the held-out prompts (with a
  reward model also its raw and normalized score), the answers to DIR/samples/iter_NNNNN.jsonl, and at
  the first and last evaluation pass@k."""
  if not prompts:
    return {}
  path = os.path.join(workdir, "samples", f"iter_{it:05d}.jsonl")
  result = actor.evaluate(params, prompts, score=score, samples_path=path)
  if "reward_raw" in result:
    result["reward"] = (result["reward_raw"] - src.score_mean) / src.score_std
  if it in (0, last):
    result.update(actor.pass_at_k(params, prompts, pass_k))
  return result


def job(runner, name: str, section, workdir: str, log_keys: tuple[str, ...]):
  """The loop.Job of an RL stage's runner (init_state, step, get_extra, set_extra, evaluate, src):
  iterations as steps, an evaluation of the starting model, host metrics, the runs it started from
  recorded in every checkpoint."""
  from gpt_jax import loop

  return loop.Job(
    name=name,
    steps=int(section.iterations),
    abstract_state=runner.abstract_state,
    init_state=runner.init_state,
    step=runner.step,
    get_extra=runner.get_extra,
    set_extra=runner.set_extra,
    evaluate=lambda state, it: runner.evaluate(state, it, workdir),
    eval_every=int(section.eval_every),
    eval_at_start=True,
    steps_key=f"{name}.iterations",
    unit="iteration",
    metrics_prefix=f"{name}/",
    progress_keys=("reward", "gold", "kl"),
    log_keys=log_keys,
    record=runner.src.record(),
    host_metrics=True,
  )
