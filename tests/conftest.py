"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

# LLVM optimisation level 0: the tests' programs are tiny, so compiling them (not running them) is
# most of the suite's time, and level 0 compiles them about twice as fast (an init program: 7.0 s ->
# 2.1 s; a train step: 6.3 s -> 3.1 s). The compiled programs compute the same HLO; every comparison in
# the suite is between runs compiled alike, or against PyTorch within a tolerance.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs: share compiled executables across tests and the
# subprocesses they start (the cache is keyed by the program, so results are unchanged).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gpt_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run the long variants")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip_slow = pytest.mark.skip(reason="long variant: pass --runslow to run it")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
  """The tiny test corpus tokenized once per session; tests copy it with helpers.seed_workdir."""
  from gpt_jax import data
  from tests.helpers import tiny_config

  d = str(tmp_path_factory.mktemp("prepared"))
  cfg = tiny_config()
  tokens = cfg.train.global_batch * cfg.train.seq_len
  data.prepare(
    cfg.data, d, token_budget=tokens * cfg.train.steps, tokens_per_batch=tokens, log=lambda *a: None
  )
  return d


@pytest.fixture(scope="session")
def tiny_pipeline_dir(prepared_dir, tmp_path_factory):
  """A whole tiny pipeline run (every entry of the demo, the evaluation and the report), made once per session."""
  from gpt_jax.stages import pipeline
  from tests.helpers import seed_workdir, tiny_pipeline_config

  d = str(tmp_path_factory.mktemp("pipeline"))
  seed_workdir(prepared_dir, os.path.join(d, "pretrain"))
  pipeline.run(tiny_pipeline_config(), d, log_fn=lambda *a: None)
  return d


@pytest.fixture(scope="session")
def rl_runs(tmp_path_factory):
  """(sft workdir, rm workdir, tokenizer dir): stand-in runs the RL stages start from (helpers.make_rl_runs)."""
  from tests.helpers import make_rl_runs

  return make_rl_runs(str(tmp_path_factory.mktemp("rl_src")))
