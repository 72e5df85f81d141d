"""Run any int8 .tflite on emulated Cortex-M4, M7, M33 and RV32 cores, byte-exact against the host TFLM.

  python -m launch.run_on_target --model=testdata/kws_dscnn_int8.tflite --targets=cortex-m4,cortex-m7,rv32imac

For an export, `python -m launch.export --workdir=DIR --targets=...` does the same on the export's test images
and records the result in its report.json. Here the inputs are `--images` int8 tensors drawn from a seeded
uniform distribution (a .tflite carries no dataset), or the arrays of `--inputs=file.npy` (N x input shape,
int8). Each target's build and `result.json` go to --out_dir/<target>/ (default: <model>.device/); a summary is
printed. Exits 1 with one line naming the tool, build log, input or byte that failed.

Needs the Debian toolchains and QEMU (the error names the package) and the TFLite Micro sources (TFLM_DIR, or
the pinned tree in ../shared/third_party/tflite-micro/).
"""
import json
import os

import numpy as np
from absl import flags

from launch import common

_MODEL = flags.DEFINE_string("model", None, "An int8 .tflite file.", required=True)
_TARGETS = flags.DEFINE_string("targets", "cortex-m4,cortex-m7,rv32imac", "Comma-separated targets, or 'all'.")
_IMAGES = flags.DEFINE_integer("images", 16, "Number of seeded random int8 inputs (without --inputs).")
_INPUTS = flags.DEFINE_string("inputs", None, "A .npy of int8 inputs (N x the model's input shape).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where builds and results go (default: <model>.device/).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 600.0, "Emulator time limit per target, seconds.")
_MEM = flags.DEFINE_bool("mem", False, "Also count data accesses by memory region (flash, RAM); slower.")


def random_inputs(flatbuffer: bytes, count: int, seed: int) -> np.ndarray:
  from edgenas.export import verify
  shape = tuple(int(d) for d in verify.TflmRunner(flatbuffer).input["shape"][1:])
  return np.random.default_rng(seed).integers(-128, 128, size=(count,) + shape, dtype=np.int8)


def run(model_path: str, targets: str, out_dir: str, images: int, inputs_path, seed: int, timeout_s: float,
        mem: bool) -> dict:
  from edgenas import rundir
  from edgenas.device import errors, memory, runner, targets as targets_lib

  chosen = targets_lib.parse_targets(targets)
  if not os.path.isfile(model_path):
    raise errors.DeviceError(f"--model={model_path}: no such file")
  with open(model_path, "rb") as f:
    flatbuffer = f.read()
  if flatbuffer[4:8] != b"TFL3":  # before any build: name the file, not "<flatbuffer>"
    raise errors.DeviceError(f"--model={model_path}: not a TFLite flatbuffer (file identifier 'TFL3' missing)")
  if inputs_path:
    try:
      inputs = np.load(inputs_path)
    except (OSError, ValueError) as e:
      raise errors.DeviceError(f"--inputs={inputs_path}: not a readable .npy ({e})") from None
    if inputs.dtype != np.int8:
      raise errors.DeviceError(f"--inputs={inputs_path}: dtype {inputs.dtype}, expected int8")
  else:
    if images < 1:
      raise errors.DeviceError(f"--images={images}: need at least one input")
    inputs = random_inputs(flatbuffer, images, seed)
  results = {}
  for target in chosen:
    result = runner.run_on_target(flatbuffer, target, inputs, out_dir, model_name=os.path.basename(model_path),
                                  timeout_s=timeout_s, mem=mem)
    result["memory_model"] = memory.compare(flatbuffer, target.name, result)
    result["inputs"] = inputs_path or f"{len(inputs)} seeded uniform int8 tensors (seed {seed})"
    rundir.atomic_write_json(os.path.join(out_dir, target.name, "result.json"), result)
    if not result["matches_host"]:
      m = result["first_mismatch"]
      raise errors.MismatchError(f"target {target.name}: input {m['image']} differs from the host TFLite Micro "
                                 f"interpreter at output {m['index']} (device {m['device']}, host {m['host']}); "
                                 f"build kept in {os.path.join(out_dir, target.name)}")
    results[target.name] = result
  return results


def main(argv):
  del argv
  common.setup_process()
  out_dir = _OUT_DIR.value or os.path.splitext(_MODEL.value)[0] + ".device"
  results = run(_MODEL.value, _TARGETS.value, out_dir, _IMAGES.value, _INPUTS.value, _SEED.value, _TIMEOUT.value,
                _MEM.value)
  for name, r in results.items():
    mm = r["memory_model"]
    print(f"{name}: {r['images_matching']}/{r['images_checked']} inputs byte-exact with the host; "
          f"{r['instructions_per_inference']:,} instructions per inference; arena {r['arena_used_bytes']} B "
          f"(predicted {mm['predicted_arena_bytes']}); flash {r['elf']['deployed_flash_bytes']} B (predicted "
          f"{mm['predicted_flash_bytes']})")
  print(json.dumps({k: {f: v[f] for f in ("matches_host", "instructions_per_inference", "arena_used_bytes")}
                    for k, v in results.items()}))
  print(f"-> {out_dir}")
  return 0


if __name__ == "__main__":
  common.run(main)
