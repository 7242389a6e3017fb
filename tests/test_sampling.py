"""The KV-cache sampler: cached decode equals full forward, greedy/seeded determinism, eos, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import model, sampling
from gpt_jax.errors import ConfigError
from gpt_jax.sampling import SampleConfig

# Small but not degenerate: init_std large enough that logits are far from ties, so argmax
# comparisons between cached and full-forward paths are stable.
SMALL = dict(num_layers=2, d_model=64, num_heads=4, vocab_size=128, max_seq_len=32, init_std=0.3)
FAMILIES = {
  "llama": dict(SMALL, num_kv_heads=2, d_ff=128),  # rope, swiglu, GQA, untied
  "gpt2": dict(SMALL, d_ff=128),  # learned positions, gelu, biases, tied
}
PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6], [42], [7, 7, 8, 100, 11]]
P, N, PAD = 8, 6, 0


def build(family):
  """(cfg, graphdef, params) with random params drawn from the abstract shapes: the properties under
  test hold for any params, and this skips the model's eager initialisation (seconds per config)."""
  cfg = model.preset("tiny" if family == "llama" else "tiny_gpt2", **FAMILIES[family])
  graphdef, shapes, _ = model.abstract(cfg)
  rng = np.random.default_rng(0)

  def draw(path, x):
    noise = rng.normal(size=x.shape).astype(np.float32)
    is_scale = path[-1].key == "scale"  # norm gains near 1, everything else small
    return jnp.asarray(1.0 + 0.1 * noise if is_scale else cfg.init_std * noise, x.dtype)

  return cfg, graphdef, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm(request):
  return build(request.param)


@pytest.fixture(scope="module")
def llama():
  return build("llama")


@functools.lru_cache(maxsize=4)
def _forward(graphdef):
  return jax.jit(lambda p, x: model.apply(graphdef, p, x).logits)


def full_logits(cfg, graphdef, params, seqs):
  """Full causal forward of each unpadded sequence: (B, max_seq_len, V) float32.

  Rows are right-padded to one fixed width (one compile): under a causal mask padding after a
  token never influences it.
  """
  x = np.zeros((len(seqs), cfg.max_seq_len), np.int32)
  for i, s in enumerate(seqs):
    x[i, : len(s)] = s
  return np.asarray(_forward(graphdef)(params, x), np.float32)


def reference_greedy(cfg, graphdef, params, prompts, n):
  """Greedy continuations (B, n) by an argmax loop of full forwards."""
  seqs = [list(p) for p in prompts]
  for _ in range(n):
    logits = full_logits(cfg, graphdef, params, seqs)
    for i, s in enumerate(seqs):
      s.append(int(np.argmax(logits[i, len(s) - 1])))
  return np.asarray([s[len(p) :] for s, p in zip(seqs, prompts)])


@pytest.fixture(scope="module")
def llama_greedy(llama):
  return reference_greedy(*llama, PROMPTS, N)


def test_cached_decode_logits_equal_full_forward(lm):
  cfg, graphdef, params = lm
  tokens_BP, lengths_B = sampling.pad_prompts(PROMPTS, PAD, P)
  cont_BN = np.random.default_rng(0).integers(1, cfg.vocab_size, (len(PROMPTS), N)).astype(np.int32)

  @jax.jit
  def cached(params, tokens_BP, lengths_B, cont_BN):
    cache, first_BV = sampling.prefill(graphdef, cfg, params, tokens_BP, lengths_B, P + N)

    def step(cache, j):
      cache, logits_BV = sampling.decode_step(graphdef, cfg, params, cache, cont_BN[:, j], lengths_B, P, j)
      return cache, logits_BV

    _, rest_NBV = jax.lax.scan(step, cache, jnp.arange(N - 1))
    return jnp.concatenate([first_BV[:, None], jnp.swapaxes(rest_NBV, 0, 1)], axis=1)

  got_BNV = np.asarray(cached(params, tokens_BP, lengths_B, cont_BN), np.float32)
  seqs = [p + cont_BN[i].tolist() for i, p in enumerate(PROMPTS)]
  ref = full_logits(cfg, graphdef, params, seqs)
  want_BNV = np.stack([ref[i, len(p) - 1 : len(p) - 1 + N] for i, p in enumerate(PROMPTS)])
  np.testing.assert_allclose(got_BNV, want_BNV, atol=1e-4, rtol=0)


def test_greedy_is_deterministic_and_matches_full_forward_argmax(lm):
  cfg, graphdef, params = lm
  tokens_BP, lengths_B = sampling.pad_prompts(PROMPTS, PAD, P)
  sampler = sampling.make_sampler(
    cfg,
    graphdef,
    eos_id=-1,
    pad_id=PAD,
    max_prompt_len=P,
    sample_cfg=SampleConfig(max_new_tokens=N, greedy=True),
  )
  a = sampler(params, tokens_BP, lengths_B, jax.random.key(0))
  b = sampler(params, tokens_BP, lengths_B, jax.random.key(1))  # the key plays no part in greedy
  np.testing.assert_array_equal(a.tokens, b.tokens)
  want = reference_greedy(cfg, graphdef, params, PROMPTS, N)
  np.testing.assert_array_equal(np.asarray(a.tokens), want)
  assert np.asarray(a.response_mask).all() and np.asarray(a.lengths).tolist() == [N] * len(PROMPTS)
  # Model log-probs are those of the full forward at the chosen tokens; greedy's sampled ones are 0.
  ref = full_logits(cfg, graphdef, params, [p + w.tolist() for p, w in zip(PROMPTS, want)])
  for i, p in enumerate(PROMPTS):
    lp = jax.nn.log_softmax(ref[i, len(p) - 1 : len(p) - 1 + N], axis=-1)
    np.testing.assert_allclose(a.logprobs[i], lp[np.arange(N), want[i]], atol=1e-4)
  np.testing.assert_array_equal(a.sampled_logprobs, 0.0)


@pytest.fixture(scope="module")
def seeded(llama):
  cfg, graphdef, params = llama
  sample_cfg = SampleConfig(max_new_tokens=N, temperature=0.9, top_k=50, top_p=0.95)
  sampler = sampling.make_sampler(
    cfg, graphdef, eos_id=-1, pad_id=PAD, max_prompt_len=P, sample_cfg=sample_cfg
  )
  return sampler, sample_cfg


def test_seeded_sampling_is_reproducible_and_logprobs_match_full_forward(llama, seeded):
  cfg, graphdef, params = llama
  sampler, sample_cfg = seeded
  prompts = PROMPTS  # 4 rows x 6 tokens: two seeds agreeing everywhere by chance is out of the question
  tokens_BP, lengths_B = sampling.pad_prompts(prompts, PAD, P)
  a = sampler(params, tokens_BP, lengths_B, jax.random.key(7))
  b = sampler(params, tokens_BP, lengths_B, jax.random.key(7))
  c = sampler(params, tokens_BP, lengths_B, jax.random.key(8))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  toks = np.asarray(a.tokens)
  ref = full_logits(cfg, graphdef, params, [p + t.tolist() for p, t in zip(prompts, toks)])
  for i, p in enumerate(prompts):
    logits_NV = ref[i, len(p) - 1 : len(p) - 1 + N]
    want = np.asarray(jax.nn.log_softmax(logits_NV, axis=-1))[np.arange(N), toks[i]]
    np.testing.assert_allclose(a.logprobs[i], want, atol=1e-4)
    processed = sampling.process_logits(jnp.asarray(logits_NV), sample_cfg)
    want_s = np.asarray(jax.nn.log_softmax(processed, axis=-1))[np.arange(N), toks[i]]
    np.testing.assert_allclose(a.sampled_logprobs[i], want_s, atol=1e-4)
  assert np.isfinite(np.asarray(a.sampled_logprobs)).all()  # sampled tokens always lie in the kept set


def test_top_k_1_equals_greedy_and_eos_stops_each_row(llama, llama_greedy):
  cfg, graphdef, params = llama
  greedy = llama_greedy
  eos = int(greedy[0, 2])  # row 0 produces it at step 2; other rows stop wherever it first appears
  tokens_BP, lengths_B = sampling.pad_prompts(PROMPTS, PAD, P)
  sampler = sampling.make_sampler(
    cfg,
    graphdef,
    eos_id=eos,
    pad_id=PAD,
    max_prompt_len=P,
    sample_cfg=SampleConfig(max_new_tokens=N, temperature=1.3, top_k=1),
  )
  out = jax.device_get(sampler(params, tokens_BP, lengths_B, jax.random.key(3)))
  for i in range(len(PROMPTS)):
    hits = np.flatnonzero(greedy[i] == eos)
    n = int(hits[0]) + 1 if hits.size else N
    assert out.lengths[i] == n
    np.testing.assert_array_equal(out.tokens[i, :n], greedy[i, :n])
    np.testing.assert_array_equal(out.tokens[i, n:], PAD)
    np.testing.assert_array_equal(out.response_mask[i], np.arange(N) < n)
    np.testing.assert_array_equal(out.logprobs[i, n:], 0.0)
  assert out.lengths[0] == 3 and out.tokens[0, 2] == eos
  np.testing.assert_allclose(out.sampled_logprobs, 0.0, atol=1e-6)  # all mass on the one kept token


def test_sharded_mesh_equals_single_device(llama, llama_greedy):
  from gpt_jax import sharding

  cfg, graphdef, params = llama
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, shapes, axes = model.abstract(cfg)
  params_sharding = sharding.tree_shardings(mesh, axes, shapes)
  sharded_params = jax.device_put(params, params_sharding)
  tokens_BP, lengths_B = sampling.pad_prompts(PROMPTS, PAD, P)
  sampler = sampling.make_sampler(
    cfg,
    graphdef,
    eos_id=-1,
    pad_id=PAD,
    max_prompt_len=P,
    sample_cfg=SampleConfig(max_new_tokens=N, greedy=True),
    mesh=mesh,
    params_sharding=params_sharding,
  )
  out = sampler(sharded_params, tokens_BP, lengths_B, jax.random.key(0))
  assert len(out.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out.tokens), llama_greedy)


def test_generate_and_stream_agree_with_the_sampler(llama, seeded):
  cfg, graphdef, params = llama
  sampler, sample_cfg = seeded
  prompt = PROMPTS[0]
  tokens_BP, lengths_B = sampling.pad_prompts(PROMPTS, PAD, P)  # the batch size compiled above
  want = np.asarray(sampler(params, tokens_BP, lengths_B, jax.random.key(5)).tokens[0]).tolist()
  # Prompt padding differs (generate/stream bucket it), which must not change a seeded sample; the
  # random draw of row i depends on i only, so row 0 of any batch size sees the same noise.
  assert (
    list(sampling.stream(params, graphdef, cfg, prompt, eos_id=-1, sample_cfg=sample_cfg, seed=5)) == want
  )
  got = sampling.generate(
    params, graphdef, cfg, [prompt, PROMPTS[1]], eos_id=want[1], pad_id=PAD, sample_cfg=sample_cfg, seed=5
  )
  assert got[0] == want[: want.index(want[1]) + 1]  # stops after the first eos, which is included


def test_process_logits_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(sampling.process_logits(logits, SampleConfig(**kw))))[0].tolist()
  assert keep(top_k=2) == [True, True, False, False, False]
  assert keep(top_p=0.5) == [True, False, False, False, False]  # the top token alone reaches 0.5
  assert keep(top_p=0.8) == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8 needs a third
  assert keep(top_k=4, top_p=0.99) == [True, True, True, True, False]
  np.testing.assert_allclose(sampling.process_logits(logits, SampleConfig(temperature=2.0)), logits / 2.0)


def test_bad_lengths_and_settings_raise_config_error(llama):
  cfg, graphdef, _ = llama
  make = lambda p, **kw: sampling.make_sampler(
    cfg, graphdef, eos_id=1, pad_id=0, max_prompt_len=p, sample_cfg=SampleConfig(**kw)
  )
  with pytest.raises(
    ConfigError, match=r"max_new_tokens.*20 \+ max_new_tokens 13 = 33 exceeds model.max_seq_len 32"
  ):
    make(20, max_new_tokens=13)
  with pytest.raises(ConfigError, match="sample.top_p"):
    make(8, top_p=0.0)
  with pytest.raises(ConfigError, match="sample.temperature"):
    make(8, temperature=-1.0)
  with pytest.raises(ConfigError, match=r"prompts\[1\]: has 9 tokens, more than max_len 8"):
    sampling.pad_prompts([[1], list(range(9))], 0, 8)
  with pytest.raises(ConfigError, match=r"prompts\[1\]: is empty"):
    sampling.generate(None, graphdef, cfg, [[1], []], eos_id=1, pad_id=0)
  sampler = make(8, max_new_tokens=4)  # shapes and lengths are checked before anything compiles
  with pytest.raises(ConfigError, match=r"lengths_B: prompt lengths must be in \[1, 8\], got \[0, 3\]"):
    sampler(None, np.zeros((2, 8), np.int32), np.asarray([0, 3], np.int32), None)
  with pytest.raises(ConfigError, match=r"tokens_BP: expected shape \(B, 8\)"):
    sampler(None, np.zeros((2, 5), np.int32), np.asarray([1, 3], np.int32), None)
  with pytest.raises(ConfigError, match="max_seq_len"):
    list(
      sampling.stream(
        None, graphdef, cfg, list(range(30)), eos_id=1, sample_cfg=SampleConfig(max_new_tokens=4)
      )
    )
