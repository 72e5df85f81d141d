"""Shared test set-up: a persistent JAX compilation cache, so the many small runs (and subprocesses) of the suite
compile each program once."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("EDGENAS_JAX_CACHE", os.path.join(REPO_ROOT, ".jax_cache"))
# Tests retrain baselines in fresh workdirs and check that they train; tests/test_retrain_cache.py turns the shared
# baseline cache on for itself.
os.environ["EDGENAS_RETRAIN_CACHE"] = ""
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


TINY_TFDS_TRAIN, TINY_TFDS_TEST = 40, 12


def tiny_image_builder(class_name: str):
  """A real (tiny) TFDS image builder named `class_name` (TFDS registers it as its snake_case name): 6x6 grey
  images whose first pixel is the example id, 3 classes, 40 train and 12 test examples."""
  import numpy as np
  import tensorflow_datasets as tfds

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(6, 6, 1)),
                                             "label": tfds.features.ClassLabel(num_classes=3)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(0, TINY_TFDS_TRAIN),
            "test": self._generate_examples(100, TINY_TFDS_TEST)}

  def _generate_examples(self, first_id, count):
    rng = np.random.default_rng(first_id)
    for example_id in range(first_id, first_id + count):
      image = rng.integers(0, 256, (6, 6, 1), dtype=np.uint8)
      image[0, 0, 0] = example_id
      yield example_id, {"image": image, "label": example_id % 3}

  return type(class_name, (tfds.core.GeneratorBasedBuilder,),
              dict(VERSION=tfds.core.Version("1.0.0"), _info=_info, _split_generators=_split_generators,
                   _generate_examples=_generate_examples, __doc__=tiny_image_builder.__doc__))


def adam_trained(arch, split, steps: int, lr: float = 3e-3, seed: int = 0):
  """`arch`'s variables after `steps` Adam steps on batches of 64 of `split` (a short real training run)."""
  import jax
  import optax
  from edgenas import data as data_lib
  from edgenas.nn import model as model_lib
  net = model_lib.Net(arch)
  variables = model_lib.init_net(arch, jax.random.PRNGKey(seed))
  tx = optax.adam(lr)

  @jax.jit
  def step(params, stats, opt, x, y):
    def loss(p):
      logits, upd = net.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]
    (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)
  stream = data_lib.BatchStream.of(split, 64, seed)
  for s in range(steps):
    params, stats, opt = step(params, stats, opt, *stream.batch_at(s))
  return jax.device_get({"params": params, "batch_stats": stats})
