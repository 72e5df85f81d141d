"""Shared test set-up: a persistent JAX compilation cache, so the many small runs (and subprocesses) of the suite
compile each program once."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("EDGENAS_JAX_CACHE", os.path.join(REPO_ROOT, ".jax_cache"))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def pytest_configure(config):
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ["EDGENAS_JAX_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def require_device(target_name: str) -> None:
  """Skips (outside CI only) a test that needs a target's cross toolchain, QEMU and the TFLM sources; in CI
  (.ci/run installs them) a missing one fails the test with the error that names its Debian package."""
  import pytest
  from edgenas.device import errors, targets, tflm
  try:
    targets.check_toolchain(targets.get_target(target_name))
    tflm.resolve_tflm_dir(log=lambda line: None)
  except errors.ToolchainMissingError as e:
    if os.environ.get("CI"):
      raise
    pytest.skip(str(e))


# The tiny search shrunk to one searchable layer of 3 candidates and 6 steps (checkpoints at steps 0, 3 and 5), so
# each compile is short. One text for every test that needs it: the config files subprocesses load and the config
# in-process runs build are the same, so they share compiled programs through the compilation cache.
SMALL_SEARCH_CONFIG = """from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.space.stages = [dict(layers=1, channels=8, stride=1)]
  c.space.kernels = (3,)
  c.search.max_steps = 6
  c.checkpoint_every = 3
  c.log_every = 3
  return c
"""


def small_search_config():
  namespace = {}
  exec(SMALL_SEARCH_CONFIG, namespace)
  return namespace["get_config"]()
