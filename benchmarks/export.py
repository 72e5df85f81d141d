"""Cost and fidelity of the TFLite Micro export, as JSON: export seconds, .tflite bytes, TFLM arena bytes, TFLM
inference milliseconds per image on this host, and the float / int8 accuracy figures.

Two models:
  - digits: an 8x8x1 network of the default search space's shape, trained briefly (Adam) on the embedded digits;
  - cifar_sized: a 32x32x3, 10-class MobileNetV2-like network, UNTRAINED (BatchNorm statistics from a few
    forward passes over random images), exported with random images as calibration and test data. Its
    accuracy is chance by construction; its size, arena, timing and int8/float argmax agreement are the figures.

Usage: python -m benchmarks.export [--train_steps 400] [--cifar_test_images 200]
Writes benchmarks/results/export.json as well as printing it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import optax

from edgenas import architecture as arch_lib
from edgenas import data as data_lib
from edgenas.export import exporter, verify
from edgenas.nn import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

L = arch_lib.Layer
PLATFORMS = ("stm32l4r5_tflm", "andes_d45_tflm")


def digits_arch():
  return arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(16, 3, 1), (
      L("mbconv", 16, 16, 1, 3, 3, 48), L("mbconv", 16, 16, 1, 5, 1, 16), L("mbconv", 16, 32, 2, 5, 3, 48),
      L("mbconv", 32, 32, 1, 3, 6, 96)), 0, "bench_digits")


def cifar_arch():
  return arch_lib.Architecture((32, 32, 3), 10, arch_lib.Stem(16, 3, 1), (
      L("mbconv", 16, 24, 2, 3, 3, 48), L("mbconv", 24, 24, 1, 3, 3, 72), L("mbconv", 24, 32, 2, 5, 3, 72),
      L("mbconv", 32, 32, 1, 3, 6, 192), L("mbconv", 32, 64, 2, 3, 6, 192)), 128, "bench_cifar_sized")


def train(arch, split, steps, seed=0):
  """A short Adam run (train-mode BatchNorm), enough for a meaningful accuracy on digits."""
  net = model_lib.Net(arch)
  variables = model_lib.init_net(arch, jax.random.PRNGKey(seed))
  tx = optax.adam(3e-3)

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
  stream = data_lib.BatchStream(*split, 64, seed)
  for s in range(steps):
    params, stats, opt = step(params, stats, opt, *stream.batch_at(s))
  return jax.device_get({"params": params, "batch_stats": stats})


def settle_batch_stats(arch, images, passes=20):
  """Untrained weights with BatchNorm statistics of real forward passes, so the folded net is well scaled."""
  net = model_lib.Net(arch)
  variables = model_lib.init_net(arch, jax.random.PRNGKey(0))
  fwd = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
  for i in range(passes):
    variables = {"params": variables["params"],
                 "batch_stats": fwd(variables, images[(i * 64) % len(images):][:64])}
  return jax.device_get(variables)


def random_dataset(shape, n_train, n_test, seed=0):
  rng = np.random.default_rng(seed)
  split = lambda n: data_lib.Split(rng.uniform(0, 1, (n,) + shape).astype(np.float32),
                                   rng.integers(0, 10, n).astype(np.int32))
  return data_lib.Dataset("random_32x32x3", split(n_train), split(16), split(n_test), shape, 10, False)


def tflm_ms_per_image(flatbuffer, arena_bytes, images, repeats=3):
  """Fastest of `repeats` passes over `images` (batch-1 invokes), per image: other work on a shared host only
  ever adds time."""
  runner = verify.TflmRunner(flatbuffer, arena_bytes)
  q = runner.quantize_input(images)
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    runner.run_int8(q)
    best = min(best, time.perf_counter() - start)
  return 1e3 * best / len(images)


def bench(name, arch, variables, dataset, out_dir, note):
  start = time.perf_counter()
  report = exporter.export_model(arch, variables, dataset, out_dir, PLATFORMS, strict=False, log=lambda _: None)
  seconds = time.perf_counter() - start
  with open(os.path.join(out_dir, "model.tflite"), "rb") as f:
    flatbuffer = f.read()
  acc = report["accuracy"]
  return dict(
      model=name, note=note, input_shape=list(arch.input_shape), macs=arch.macs(), params=arch.params(),
      export_seconds=seconds, convert_seconds=report["seconds"]["convert"],
      verify_seconds=report["seconds"]["verify"], tflite_bytes=report["tflite_bytes"],
      arena_bytes_tflm=report["arena"]["measured_tflm_bytes"], device_arena_bytes=report["arena"]["device_arena_bytes"],
      predicted_peak_sram_bytes=report["arena"]["predicted_peak_sram_bytes"],
      arena_minus_predicted_bytes=report["arena"]["measured_minus_predicted_bytes"],
      tflm_ms_per_image=tflm_ms_per_image(flatbuffer, report["arena"]["measured_tflm_bytes"],
                                          dataset.test.images[:100]),
      test_images=acc["test_images"], acc_float=acc["float"], acc_int8_tflm=acc["int8_tflm"],
      argmax_agreement=acc["argmax_agreement_int8_float"],
      ops=[f"{s['op']}x{s['count']}" for s in report["op_summary"]],
      predicted={k: dict(latency_ms=v["latency_ms"], energy_uj=v["energy_uj"]) for k, v in report["platforms"].items()})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--train_steps", type=int, default=400)
  parser.add_argument("--cifar_test_images", type=int, default=200)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "export.json"))
  args = parser.parse_args()

  results = []
  with tempfile.TemporaryDirectory() as tmp:
    digits = data_lib.load_dataset("digits", val_fraction=0.1, seed=0)
    t = time.perf_counter()
    arch = digits_arch()
    variables = train(arch, digits.train, args.train_steps)
    train_s = time.perf_counter() - t
    results.append(bench("digits", arch, variables, digits, os.path.join(tmp, "digits"),
                         f"trained {args.train_steps} Adam steps ({train_s:.0f} s); includes TensorFlow's first "
                         "import in export_seconds"))
    cifar = random_dataset((32, 32, 3), 512, args.cifar_test_images)
    arch = cifar_arch()
    results.append(bench("cifar_sized", arch, settle_batch_stats(arch, cifar.train.images), cifar,
                         os.path.join(tmp, "cifar"), "UNTRAINED, random images: accuracy is chance by construction"))
  out = dict(benchmark="export", host=dict(cpus=os.cpu_count()), platforms=list(PLATFORMS),
             versions=exporter.library_versions(), results=results)
  text = json.dumps(out, indent=2)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
