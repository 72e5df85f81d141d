"""Cost of the run infrastructure next to a train step: dataset loading, batch drawing, augmentation, checkpoints.

Prints one JSON object. Usage: python -m benchmarks.infra_io [--leaves 400] [--megabytes 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from edgenas import checkpoint as ckpt_lib
from edgenas import data


def _seconds(fn, repeat=1):
  start = time.perf_counter()
  for _ in range(repeat):
    result = fn()
  return (time.perf_counter() - start) / repeat, result


def _batch_us(images, labels, batch_size, steps):
  stream = data.BatchStream(images, labels, batch_size, seed=0)
  elapsed, _ = _seconds(lambda: [stream.batch_at(s) for s in range(steps)])
  return 1e6 * elapsed / steps


def _state(leaves: int, megabytes: float):
  """A params + momentum pytree shaped like a supernet's: many small leaves, a few large ones."""
  per_leaf = max(1, int(megabytes * 2**20 / 4 / 2 / leaves))
  params = {}
  for i in range(leaves):
    params.setdefault(f"layer{i // 10}", {})[f"w{i % 10}"] = jnp.full((per_leaf,), 0.01 * i, jnp.float32)
  return {"params": params, "momentum": jax.tree.map(jnp.zeros_like, params), "step": jnp.array(0)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--leaves", type=int, default=400)
  parser.add_argument("--megabytes", type=float, default=8.0, help="params + momentum, float32")
  args = parser.parse_args()
  out = {"jax": jax.__version__, "cpu_count": os.cpu_count()}

  load_s, digits = _seconds(lambda: data.load_dataset("digits"))
  out["digits_load_s_first"] = round(load_s, 3)
  out["digits_load_s_again"] = round(_seconds(lambda: data.load_dataset("digits"))[0], 3)
  out["digits_batch64_us"] = round(_batch_us(*digits.train, 64, 2000), 1)
  cifar_x = np.random.default_rng(0).random((45000, 32, 32, 3), dtype=np.float32)
  cifar_y = np.zeros(45000, np.int32)
  out["cifar_sized_batch64_us"] = round(_batch_us(cifar_x, cifar_y, 64, 2000), 1)
  batch = data.BatchStream(cifar_x, cifar_y, 64, seed=0).batch_at(0)[0]
  rng = np.random.default_rng(0)
  out["cifar_sized_augment64_shift4_flip_us"] = round(
      1e6 * _seconds(lambda: data.augment(batch, rng, max_shift=4, flip=True), repeat=200)[0], 1)

  state = _state(args.leaves, args.megabytes)
  out["state_leaves"] = len(jax.tree_util.tree_leaves(state))
  out["state_megabytes"] = round(sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) / 2**20, 2)
  with tempfile.TemporaryDirectory() as workdir:
    with ckpt_lib.Checkpointer(workdir, save_every=1, keep=2) as ckpt:
      first_s, _ = _seconds(lambda: (ckpt.save(0, state), ckpt.wait()))
      timings = []
      for step in range(1, 6):
        blocking, _ = _seconds(lambda step=step: ckpt.save(step, state))
        total, _ = _seconds(ckpt.wait)
        timings.append((blocking, blocking + total))
      restore_s, restored = _seconds(lambda: ckpt.restore_latest(state))
    assert restored.step == 5
  out["checkpoint_first_save_s"] = round(first_s, 3)
  out["checkpoint_save_blocking_s"] = round(float(np.median([t[0] for t in timings])), 3)
  out["checkpoint_save_until_on_disk_s"] = round(float(np.median([t[1] for t in timings])), 3)
  out["checkpoint_restore_s"] = round(restore_s, 3)
  out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
