"""Builds an operator lookup table (LUT CSV).

  # Time single-operator int8 models in the TFLite Micro interpreter on this machine:
  python -m launch.profile --backend=host --out=edgenas/energy/platforms/host_lut.csv
  # Count every operator of the grid on an emulated core (instructions, flash/RAM accesses, arena):
  python -m launch.profile --backend=emulate --target=cortex-m4
  # Write a TFLM benchmark program (DWT cycle counter) for a board:
  python -m launch.profile --backend=board --out_dir=/tmp/lut_bench
  # Turn the board's serial log into a LUT:
  python -m launch.profile --backend=parse_log --log=serial.txt --platform=stm32l4r5_tflm --out=board_lut.csv
  # Fit a platform's regressor to its table (writes coefficients and k-fold fit quality into its profile):
  python -m launch.profile --backend=fit --platform=host
  # Build an MCU platform's table from its target's counts and its cycle model, the model's constants fitted to
  # its MLPerf Tiny measurements, then fit its regressor:
  python -m launch.profile --backend=calibrate --platform=stm32l4r5_tflm
"""
import json
import os

from absl import app
from absl import flags

from edgenas.energy import calibration
from edgenas.energy import lut as lut_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy import profiling
from edgenas.energy import regressor
from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("backend", "host", ["host", "emulate", "board", "parse_log", "fit", "calibrate"],
                  "Where the table's figures come from, or which fitting step to run.")
flags.DEFINE_string("out", None, "LUT CSV to write (host, parse_log); counts CSV (emulate, default "
                    "edgenas/energy/platforms/counts_<target>.csv).")
flags.DEFINE_string("target", None, "Emulated cores to count the grid on (emulate), comma-separated: cortex-m4, "
                    "cortex-m7, cortex-m33, rv32imac.")
flags.DEFINE_string("build_dir", None, "Where the emulate backend builds its programs (default: a temp dir).")
flags.DEFINE_string("out_dir", None, "Directory for the board benchmark program (board).")
flags.DEFINE_string("log", None, "Serial log captured from the board program (parse_log).")
flags.DEFINE_string("platform", "host", "Platform whose active power turns latency into energy.")
flags.DEFINE_float("power_mw", None, "Override the platform's active power (mW) used for energy = latency x power.")
flags.DEFINE_string("source", None, "Provenance written into every row; a sensible default names the backend.")
flags.DEFINE_integer("grid_seed", 0, "Seed of the sampled configuration grid.")
flags.DEFINE_integer("limit", 0, "Profile only the first N configurations (0: all).")
flags.DEFINE_integer("repeats", 20, "Timed invokes per model on the board.")
flags.DEFINE_integer("passes", 3, "Timing passes over the grid on the host; each row keeps its fastest.")


def _grid():
  grid = profiling.default_grid(FLAGS.grid_seed)
  return grid[:FLAGS.limit] if FLAGS.limit else grid


def _emulate() -> None:
  import tempfile
  from edgenas.energy import counts as counts_lib
  if not FLAGS.target:
    raise app.UsageError("--target is required with --backend=emulate")
  grid = profiling.emulated_grid(FLAGS.grid_seed)
  grid = grid[:FLAGS.limit] if FLAGS.limit else grid
  targets = [t.strip() for t in FLAGS.target.split(",") if t.strip()]
  if FLAGS.out and len(targets) > 1:
    raise app.UsageError("--out names one table; give one --target with it")
  build_dir = FLAGS.build_dir or tempfile.mkdtemp(prefix="edgenas-profile-")
  for target, rows in profiling.profile_emulated(grid, targets, build_dir).items():
    out = FLAGS.out or counts_lib.counts_path(target)
    counts_lib.save_counts(rows, out)
    print(f"wrote {len(rows)} rows to {out} (programs in {build_dir})")


def main(argv):
  del argv
  _main()


def _main():
  if FLAGS.backend == "emulate":
    return _emulate()
  platform = platform_lib.load_platform(FLAGS.platform)
  power_mw = FLAGS.power_mw if FLAGS.power_mw is not None else platform.active_mw
  if FLAGS.backend == "host":
    if not FLAGS.out:
      raise app.UsageError("--out is required with --backend=host")
    source = FLAGS.source or ("measured: tflite-micro python interpreter (reference kernels) on this host, "
                              f"mean of the fastest 20% of invokes over {FLAGS.passes} passes, energy = latency x {power_mw:g} mW (estimate)")
    lut_lib.save_lut(profiling.profile_host(_grid(), power_mw, source, FLAGS.passes), FLAGS.out)
    print(f"wrote {FLAGS.out}")
  elif FLAGS.backend == "board":
    if not FLAGS.out_dir:
      raise app.UsageError("--out_dir is required with --backend=board")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    models = [(spec, profiling.single_op_model(spec)) for spec in _grid()]
    for name, text in profiling.board_benchmark_sources(models, FLAGS.repeats).items():
      with open(os.path.join(FLAGS.out_dir, name), "w") as f:
        f.write(text)
    print(f"wrote {len(models)} models and the TFLM benchmark program to {FLAGS.out_dir}")
  elif FLAGS.backend == "fit":
    fitted = regressor.fit_platform(platform)
    platform_lib.save_platform(fitted)
    print(json.dumps(fitted.fit_quality, indent=2))
  elif FLAGS.backend == "calibrate":
    if platform.target and platform.cycle_model:
      calibrated, rows = calibration.calibrate_emulated(platform, FLAGS.build_dir)
    else:
      calibrated, rows = calibration.calibrate(platform, platform_lib.load_platform("host"))
    lut_lib.save_lut(rows, calibrated.lut_path)
    fitted = regressor.fit_platform(calibrated)
    platform_lib.save_platform(fitted)
    print(json.dumps(dict(calibration=fitted.calibration, fit_quality=fitted.fit_quality), indent=2))
  else:
    if not FLAGS.log or not FLAGS.out:
      raise app.UsageError("--log and --out are required with --backend=parse_log")
    with open(FLAGS.log) as f:
      text = f.read()
    source = FLAGS.source or (f"measured: DWT cycles on {platform.name} ({os.path.basename(FLAGS.log)}), "
                              f"energy = latency x {power_mw:g} mW (estimate)")
    rows = profiling.parse_serial_log(text, power_mw, source, FLAGS.log, clock_hz=platform.clock_mhz * 1e6)
    lut_lib.save_lut(rows, FLAGS.out)
    print(f"wrote {len(rows)} rows to {FLAGS.out}")


if __name__ == "__main__":
  common.run(main)
