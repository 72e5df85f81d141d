"""Speed of the energy model; prints JSON and writes benchmarks/results/energy_model.json.

- fit seconds per platform (NNLS per op type on its table, both quantities, plus 5-fold quality),
- predictions per second of the vmapped, jitted JAX regressor,
- time of one gradient of the supernet's expected energy (logits and gates) for a digits- and a CIFAR-sized
  space, compiled once, then timed,
- host check: the two MLPerf Tiny models timed whole in the TFLite Micro interpreter against the host
  regressor's per-operator sum (with --host_check; needs tflite-micro).

  python -m benchmarks.energy_model [--host_check]
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from edgenas import cost as cost_lib
from edgenas import space as space_lib
from edgenas.energy import calibration
from edgenas.energy import estimate
from edgenas.energy import features as features_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy import regressor

SPACES = {
    "digits": dict(input_shape=(8, 8, 1), num_classes=10, stem=dict(channels=16, kernel=3, stride=1),
                   stages=[dict(layers=2, channels=16, stride=1), dict(layers=2, channels=32, stride=2)],
                   kernels=[3, 5, 7], expansions=[1, 3, 6]),
    "cifar": dict(input_shape=(32, 32, 3), num_classes=10, stem=dict(channels=16, kernel=3, stride=1),
                  stages=[dict(layers=1, channels=16, stride=1), dict(layers=2, channels=24, stride=2),
                          dict(layers=2, channels=32, stride=2), dict(layers=2, channels=64, stride=2)],
                  kernels=[3, 5, 7], expansions=[1, 3, 6]),
}


def _best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def fit_seconds():
  out = {}
  for name in platform_lib.list_platforms():
    p = platform_lib.load_platform(name)
    out[name] = round(_best_of(lambda: regressor.fit_platform(p), 3), 4)
  return out


def predictions_per_second(n=100_000):
  p = platform_lib.load_platform(platform_lib.DEFAULT_PLATFORM)
  matrix = regressor.coefficient_matrix(p.coefficients("energy_uj"))
  rng = np.random.default_rng(0)
  idx = jnp.asarray(rng.integers(0, 3, n))  # conv, depthwise, fully connected
  feats = jnp.asarray(rng.uniform(0, 1e5, (n, len(features_lib.FEATURES))), jnp.float32)
  fn = jax.jit(jax.vmap(regressor.predict, in_axes=(None, 0, 0)))
  fn(matrix, idx, feats).block_until_ready()
  seconds = _best_of(lambda: fn(matrix, idx, feats).block_until_ready(), 5)
  return dict(batch=n, seconds=seconds, predictions_per_second=round(n / seconds))


def gradient_seconds(space_cfg):
  space = space_lib.SearchSpace.from_config(space_cfg)
  op_cost = regressor.op_cost_fn(platform_lib.DEFAULT_PLATFORM, "energy_uj")
  n = [len(s.candidates) for s in space.slots()]

  def energy(logits, gates):
    return cost_lib.expected_cost(op_cost, space, [jax.nn.softmax(a) for a in logits],
                                  [jax.nn.sigmoid(g) for g in gates])

  grad = jax.jit(jax.grad(energy, argnums=(0, 1)))
  logits, gates = [jnp.zeros(k) for k in n], [jnp.zeros(k) for k in n]
  t0 = time.perf_counter()
  jax.block_until_ready(grad(logits, gates))
  compile_s = time.perf_counter() - t0
  step = _best_of(lambda: jax.block_until_ready(grad(logits, gates)), 20)
  eager = _best_of(lambda: jax.block_until_ready(jax.grad(energy, argnums=(0, 1))(logits, gates)), 2)
  return dict(slots=len(n), candidates=sum(n), compile_seconds=round(compile_s, 3),
              jitted_gradient_ms=round(step * 1e3, 4), eager_gradient_ms=round(eager * 1e3, 1))


def host_check():
  """Whole reference models timed on the host against the host regressor's per-operator sum.

  Reported with two statistics of the per-invoke times: the minimum, and the mean of the fastest 20% (what the
  host table's rows use); on a loaded machine the minimum is the cleaner figure.
  """
  from edgenas.energy import profiling
  out = {}
  for name in ("ic_resnet8_int8.tflite", "kws_dscnn_int8.tflite"):
    path = calibration.reference_model_path(name)
    with open(path, "rb") as f:
      model = f.read()
    times = profiling.time_on_host(model, min_seconds=3.0)
    fastest = profiling.fastest_fraction(times)[0]
    predicted = estimate.estimate_tflite(path, "host")["latency_ms"]
    out[name] = dict(measured_min_ms=round(float(times.min()), 4), measured_fastest20_ms=round(fastest, 4),
                     predicted_ms=round(predicted, 4),
                     error_vs_min_pct=round(100 * (predicted / float(times.min()) - 1), 1))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--host_check", action="store_true")
  args = parser.parse_args()
  result = dict(jax_backend=jax.default_backend(), fit_seconds=fit_seconds(),
                vmapped_prediction=predictions_per_second(),
                expected_energy_gradient={k: gradient_seconds(v) for k, v in SPACES.items()})
  if args.host_check:
    result["host_whole_model_check"] = host_check()
  text = json.dumps(result, indent=2)
  print(text)
  out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "energy_model.json"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
