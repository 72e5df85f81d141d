"""Predicted latency, energy, SRAM and flash of an int8 .tflite (or an arch.json) on a platform, as JSON.

  python -m launch.estimate --platform=stm32l4r5_tflm --model=model.tflite --rate=1 --battery_mwh=2000

With --rate the report also prices the network at each of the platform's operating points (clock, core voltage,
flash wait states: edgenas.energy.operating) and names the one of least solution power that meets the deadline
(--deadline_ms, default the frame period 1 / rate).
"""
import json
import math
import os

from absl import flags

from edgenas import architecture as arch_lib
from edgenas.energy import estimate
from edgenas.energy import operating
from edgenas.energy import platform as platform_lib
from edgenas.energy.errors import EnergyModelError
from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("platform", platform_lib.DEFAULT_PLATFORM,
                    f"Platform name ({', '.join(platform_lib.list_platforms())}) or profile .json path.")
flags.DEFINE_string("model", None, "An int8 .tflite file or an arch.json.", required=True)
flags.DEFINE_float("rate", None, "Inferences per second, for the solution power P = P_static + rate x E.")
flags.DEFINE_float("battery_mwh", None, "Battery capacity in mWh, for the battery life (needs --rate).")
flags.DEFINE_float("deadline_ms", None, "Latency each inference must meet, for choosing the operating point "
                   "(needs --rate; default: the frame period 1 / rate).")
flags.DEFINE_boolean("per_operator", True, "Include the per-operator breakdown.")


def main(argv):
  del argv
  if not os.path.isfile(FLAGS.model):  # one line for a directory or a missing file, before any parsing
    problem = "is a directory" if os.path.isdir(FLAGS.model) else "no such file"
    raise EnergyModelError(f"--model={FLAGS.model}: {problem}; give an int8 .tflite file or an arch.json")
  if FLAGS.deadline_ms is not None:  # checked before any work
    if FLAGS.rate is None:
      raise EnergyModelError("--deadline_ms needs --rate (inferences per second) to choose an operating point")
    if not math.isfinite(FLAGS.deadline_ms) or FLAGS.deadline_ms <= 0:
      raise EnergyModelError(f"--deadline_ms must be a finite number of milliseconds > 0, got {FLAGS.deadline_ms}")
  if FLAGS.model.endswith(".json"):
    report = estimate.estimate_architecture(arch_lib.Architecture.load(FLAGS.model), FLAGS.platform, FLAGS.rate,
                                            FLAGS.battery_mwh)
  else:
    report = estimate.estimate_tflite(FLAGS.model, FLAGS.platform, FLAGS.rate, FLAGS.battery_mwh)
  if FLAGS.rate is not None and (FLAGS.rate > 0 or FLAGS.deadline_ms is not None):
    report["operating_points"] = operating.best_for_report(platform_lib.load_platform(FLAGS.platform), report,
                                                           FLAGS.rate, FLAGS.deadline_ms)
  if not FLAGS.per_operator:
    report.pop("operators")
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  common.run(main)
