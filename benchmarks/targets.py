"""On-target figures, as JSON: each model byte-exact on emulated Cortex-M4, M7, M33 and RV32 cores, with its
instructions per inference and per operator, the arena and flash it uses, and the memory model next to them.

  python -m benchmarks.targets [--targets=cortex-m4,cortex-m7,cortex-m33,rv32imac] [--images=16]

Two steps, per target:
  1. Calibrate the device memory model (writes edgenas/device/code_size.json): one program per operator type (a
     single-operator model, registering only that operator) splits flash into the runtime and each operator's
     code, from the linker map; the arenas of those programs and of three untrained edgenas networks fit the
     three constants of TFLM's persistent tail (edgenas.device.memory). The evaluated models below are not used.
  2. Evaluate: MLPerf Tiny's DS-CNN and ResNet-8 (testdata/) and the default pipeline's searched digits network
     (testdata/digits_searched_int8.tflite, exported by launch.pipeline) on 16 inputs each, outputs compared
     byte for byte with the host TFLM; memory model vs measured arena and flash.

Writes benchmarks/results/targets.json. Inputs of the MLPerf models are seeded random int8 tensors (no dataset
ships with them); the digits network runs its first 16 test images.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from edgenas import ops as ops_lib
from edgenas import rundir
from edgenas.device import code_size, memory, runner, targets as targets_lib
from edgenas.energy import profiling, tflite_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "targets.json")
EVALUATED = ("kws_dscnn_int8.tflite", "ic_resnet8_int8.tflite", "digits_searched_int8.tflite")
# One single-operator model per operator type: the code-size split and part of the tail fit.
SINGLE_OPS = {
    "CONV_2D": ops_lib.OpSpec(ops_lib.CONV_2D, 8, 8, 16, 32, 3, 1),
    "DEPTHWISE_CONV_2D": ops_lib.OpSpec(ops_lib.DEPTHWISE_CONV_2D, 8, 8, 32, 32, 5, 1),
    "FULLY_CONNECTED": ops_lib.OpSpec(ops_lib.FULLY_CONNECTED, 1, 1, 256, 32),
    "ADD": ops_lib.OpSpec(ops_lib.ADD, 8, 8, 16, 16),
    "AVERAGE_POOL_2D": ops_lib.OpSpec(ops_lib.AVERAGE_POOL_2D, 4, 4, 32, 32, 4, 4),
    "MAX_POOL_2D": ops_lib.OpSpec(ops_lib.MAX_POOL_2D, 8, 8, 16, 16, 2, 2),
    "RESHAPE": ops_lib.OpSpec(ops_lib.RESHAPE, 4, 4, 32, 512),
    "SOFTMAX": ops_lib.OpSpec(ops_lib.SOFTMAX, 1, 1, 32, 32),
}


def untrained_networks() -> dict[str, bytes]:
  """Three edgenas networks with random weights (the arena does not depend on the values), for the tail fit."""
  from edgenas import architecture as arch_lib
  from edgenas import baselines
  from edgenas.export import convert
  from edgenas.nn import model as model_lib
  L = arch_lib.Layer
  archs = {
      "fit_mbconv_8x8": arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(8, 3, 1), (
          L("mbconv", 8, 16, 1, 3, 3, 24), L("mbconv", 16, 16, 1, 5, 6, 64), L("mbconv", 16, 24, 2, 3, 1, 16)), 0,
          "fit_mbconv_8x8"),
      "fit_mbv2_0.35_32x32": baselines.baseline_architecture("mobilenetv2_0.35", (32, 32, 3), 10),
      "fit_dscnn_16x16": baselines.baseline_architecture("dscnn", (16, 16, 1), 12),
  }
  out = {}
  for name, arch in archs.items():
    variables = model_lib.init_net(arch, jax.random.PRNGKey(0))
    folded = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), model_lib.fold_batchnorm(arch, variables))
    calib = np.random.default_rng(0).uniform(0, 1, (8,) + tuple(arch.input_shape)).astype(np.float32)
    out[name] = convert.to_tflite(arch, folded, calib)
  return out


def input_shape(flatbuffer: bytes) -> tuple[int, ...]:
  """The model's first input without the batch dimension."""
  graph = tflite_graph.parse_tflite(flatbuffer)
  return tuple(int(d) for d in graph.tensors[graph.inputs[0]].shape[1:])


def fit_tail(samples: list[tuple[bytes, int]], kernels: str) -> dict:
  """Least squares of (measured arena − planned head − 8 B x channels) on [1, tensors, operators]."""
  rows, y = [], []
  for fb, arena in samples:
    graph = tflite_graph.parse_tflite(fb)
    counts = memory.tail_counts(graph)
    rows.append([1.0, counts["tensors"], counts["ops"]])
    y.append(arena - memory.plan_head(graph, kernels) - memory.PER_CHANNEL_BYTES * counts["channels"])
  coef, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(y, np.float64), rcond=None)
  residual = np.asarray(y) - np.asarray(rows) @ coef
  return dict(fixed=round(float(coef[0]), 2), per_tensor=round(float(coef[1]), 2), per_op=round(float(coef[2]), 2),
              samples=len(samples), max_abs_residual_bytes=round(float(np.abs(residual).max()), 1))


def calibrate(target: str, single_models: dict[str, bytes], networks: dict[str, bytes], build_dir: str) -> dict:
  kernels = targets_lib.get_target(target).kernels
  measured = code_size.measure(target, single_models, os.path.join(build_dir, "code"))
  samples = [(single_models[op], r["arena_used_bytes"]) for op, r in measured["runs"].items()]
  for name, fb in networks.items():
    inputs = np.random.default_rng(0).integers(-128, 128, size=(1,) + input_shape(fb), dtype=np.int8)
    r = runner.run_on_target(fb, target, inputs, os.path.join(build_dir, "fit", name), model_name=name)
    samples.append((fb, r["arena_used_bytes"]))
  tail = fit_tail(samples, kernels)
  return dict(code=dict(runtime=measured["runtime"], runtime_spread=measured["runtime_spread"],
                        per_op=measured["per_op"]),
              tail=tail, per_channel_bytes=memory.PER_CHANNEL_BYTES,
              source=(f"benchmarks/targets.py: {len(single_models)} single-operator programs (code split from "
                      f"their linker maps) and {len(networks)} untrained edgenas networks (tail fit) on {target}"))


def evaluate(target: str, name: str, images: int, build_dir: str) -> dict:
  path = os.path.join(REPO, "testdata", name)
  with open(path, "rb") as f:
    fb = f.read()
  if name.startswith("digits"):
    from edgenas import data as data_lib
    from edgenas.export import verify
    ds = data_lib.load_dataset("digits", val_fraction=0.1, seed=0)
    inputs, labels = verify.TflmRunner(fb).quantize_input(ds.test.images[:images]), ds.test.labels[:images]
    what = f"the first {images} digits test images"
  else:
    inputs = np.random.default_rng(0).integers(-128, 128, (images,) + input_shape(fb), dtype=np.int8)
    labels = None
    what = f"{images} seeded uniform int8 inputs"
  r = runner.run_on_target(fb, target, inputs, os.path.join(build_dir, "eval", name), labels, model_name=name)
  mm = memory.compare(fb, target, r)
  return dict(model=name, inputs=what, matches_host=r["matches_host"], images_checked=r["images_checked"],
              first_mismatch=r["first_mismatch"], instructions_per_inference=r["instructions_per_inference"],
              operators=[dict(index=o["index"], op=o["op"], instructions=o["instructions"]) for o in r["operators"]],
              arena_used_bytes=r["arena_used_bytes"], elf=r["elf"], memory_model=mm, toolchain=r["toolchain"],
              seconds=r["seconds"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--targets", default=",".join(targets_lib.DEFAULT_TARGETS))
  parser.add_argument("--images", type=int, default=16)
  args = parser.parse_args()
  t0 = time.time()
  chosen = [t.name for t in targets_lib.parse_targets(args.targets)]
  build_dir = tempfile.mkdtemp(prefix="edgenas-targets-")
  single = {op: profiling.single_op_model(spec) for op, spec in SINGLE_OPS.items()}
  networks = untrained_networks()
  table = memory.load_code_size() or dict(version=1, targets={})
  table.setdefault("targets", {})
  for t in chosen:
    table["targets"][t] = calibrate(t, single, networks, build_dir)
    table["note"] = ("written by benchmarks/targets.py; flash = runtime + per-operator code + model; arena = "
                     "TFLM's greedy plan + tail (edgenas.device.memory)")
    rundir.atomic_write_json(memory.CODE_SIZE_FILE, table)
  results = dict(machine="2-core x86-64 host; counts are emulated and do not depend on it", targets={})
  for t in chosen:
    results["targets"][t] = {name: evaluate(t, name, args.images, build_dir) for name in EVALUATED
                             if os.path.exists(os.path.join(REPO, "testdata", name))}
  results["summary"] = {t: {m: dict(byte_exact=v["matches_host"], images=v["images_checked"],
                                    instructions=v["instructions_per_inference"],
                                    arena_error_pct=v["memory_model"]["arena_error_pct"],
                                    flash_error_pct=v["memory_model"]["flash_error_pct"])
                            for m, v in per.items()} for t, per in results["targets"].items()}
  results["seconds"] = round(time.time() - t0, 1)
  rundir.atomic_write_json(RESULTS, results)
  print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
  main()
