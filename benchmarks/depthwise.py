"""Depthwise conv on this backend: the shifted sum with its custom VJP ("shift") against lax's grouped conv ("lax").

For each size, one jitted forward + backward (gradients for x and the kernel) is compiled, warmed up, then timed;
prints JSON (median and best milliseconds, compile seconds, lax/shift ratio, largest gradient difference) and
writes it to benchmarks/results/depthwise.json.

  python -m benchmarks.depthwise [--repeats 7] [--only digits]
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from edgenas.nn.depthwise import depthwise_conv

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "depthwise.json")

# (group, batch, height/width, channels, kernel, stride): the digits maps and CIFAR-sized maps of the search.
CASES = [("digits", 64, 8, 96, k, 1) for k in (3, 5, 7)] + \
        [("cifar", 64, 32, 96, k, 1) for k in (3, 5, 7)] + \
        [("cifar", 64, 16, 144, k, 1) for k in (3, 5, 7)] + \
        [("cifar", 64, 32, 96, 5, 2)]


def _forward_backward(impl, stride):
  def loss(x, kernel):
    y = depthwise_conv(x, kernel, stride, impl)
    return 0.5 * jnp.sum(y * y)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _time_impl(impl, x, kernel, stride, repeats):
  step = _forward_backward(impl, stride)
  start = time.perf_counter()
  compiled = step.lower(x, kernel).compile()
  compile_s = time.perf_counter() - start
  result = jax.block_until_ready(compiled(x, kernel))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x, kernel))
    times.append(time.perf_counter() - start)
  return {"median_ms": round(1e3 * float(np.median(times)), 2), "best_ms": round(1e3 * min(times), 2),
          "compile_s": round(compile_s, 2)}, result


def run_case(group, batch, size, channels, k, stride, repeats):
  kx, kk = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (batch, size, size, channels), jnp.float32)
  kernel = jax.random.normal(kk, (k, k, channels), jnp.float32) / k
  shift, (_, (dx_shift, dk_shift)) = _time_impl("shift", x, kernel, stride, repeats)
  lax_, (_, (dx_lax, dk_lax)) = _time_impl("lax", x, kernel, stride, repeats)
  rel_err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in ((dx_shift, dx_lax), (dk_shift, dk_lax)))
  return {"group": group, "shape": [batch, size, size, channels], "kernel": k, "stride": stride,
          "shift": shift, "lax": lax_, "lax_over_shift": round(lax_["median_ms"] / shift["median_ms"], 2),
          "max_rel_grad_diff": float(f"{rel_err:.2e}")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--only", choices=("digits", "cifar"), default=None)
  args = parser.parse_args()
  cases = [c for c in CASES if args.only in (None, c[0])]
  out = {"benchmark": "depthwise forward+backward, jit, after warm-up",
         "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
         "cpu_count": os.cpu_count(), "machine": platform.machine(), "repeats": args.repeats,
         "load_average_before": [round(v, 2) for v in os.getloadavg()], "cases": []}
  for case in cases:
    out["cases"].append(run_case(*case, repeats=args.repeats))
    print(json.dumps(out["cases"][-1]), file=sys.stderr, flush=True)
  out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
  text = json.dumps(out, indent=2)
  print(text)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
