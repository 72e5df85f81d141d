"""Plan an always-on detector: every network and two-stage cascade, calibrated, measured and priced by event rate.

  python -m launch.plan --networks=runs/kws,runs/small/retrain --positive=yes --platform=stm32l4r5_tflm \\
      --events_per_hour=0.1:100:50 --min_recall=0.95 --battery_mwh=2000 --out_dir=runs/plan

--networks takes export dirs, retrain workdirs (exported when they are not yet), pipeline workdirs (the searched
network and the baselines) or sweep workdirs (every retrained member). The positive class is one label (a keyword);
every other class is negative. Frames: --window_s long every --hop_s (1 s windows with 50% overlap by default).
Writes plan.json, plan.png (solution power against events per hour, crossovers marked) and plan.md (the
recommendation and why) into --out_dir; plan.json's `deployment` names the recommended stages, their int8
thresholds and operating point.
"""
from absl import flags

from launch import common

_NETWORKS = flags.DEFINE_list("networks", None, "Networks to plan with (two or more; see above).", required=True)
_POSITIVE = flags.DEFINE_string("positive", "yes", "The positive class: a label name (e.g. a keyword) or index.")
_PLATFORM = flags.DEFINE_string("platform", "stm32l4r5_tflm", "Platform name or profile .json path.")
_WINDOW = flags.DEFINE_float("window_s", 1.0, "Length of one input window (s).")
_HOP = flags.DEFINE_float("hop_s", 0.5, "Time between frames (s): window_s x (1 - overlap).")
_EVENTS = flags.DEFINE_string("events_per_hour", "0.1:100:50", "Event rates: LOW:HIGH:COUNT (log-spaced) or a "
                              "comma-separated list.")
_FRAMES_PER_EVENT = flags.DEFINE_float("frames_per_event", 1.0, "Frames an event is positive in.")
_RECALL = flags.DEFINE_float("min_recall", 0.95, "Recall the detector must reach on the positive class.")
_PRECISION = flags.DEFINE_float("min_precision", 0.0, "Validation precision an option must reach (0: none).")
_FALSE_ALARMS = flags.DEFINE_float("max_false_alarms_per_hour", None, "False alarms per hour an option may raise "
                                   "(judged on the validation split; default: no limit).")
_BATTERY = flags.DEFINE_float("battery_mwh", None, "Battery capacity (mWh), for the battery life.")
_DEADLINE = flags.DEFINE_float("deadline_ms", None, "Latency of both stages back to back (default: the hop).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where plan.json, plan.png and plan.md go.", required=True)


def parse_events(text: str) -> tuple[float, ...]:
  from edgenas.plan import PlanError
  try:
    if ":" in text:
      lo, hi, n = text.split(":")
      lo, hi, n = float(lo), float(hi), int(n)
      if not (0 < lo < hi and n >= 2):
        raise ValueError
      import numpy as np
      return tuple(float(x) for x in np.geomspace(lo, hi, n))
    values = tuple(float(x) for x in text.split(",") if x.strip())
    if not values or min(values) < 0:
      raise ValueError
    return tuple(sorted(values))
  except ValueError:
    raise PlanError(f"--events_per_hour={text!r}: give LOW:HIGH:COUNT with 0 < LOW < HIGH and COUNT >= 2, or a "
                    "comma-separated list of rates >= 0") from None


def main(argv):
  del argv
  from edgenas import plan as plan_lib
  if not 0 < _HOP.value <= _WINDOW.value:
    raise plan_lib.PlanError(f"--hop_s must be in (0, window_s={_WINDOW.value}], got {_HOP.value}")
  setting = plan_lib.Setting(frame_rate_hz=1.0 / _HOP.value, events_per_hour=parse_events(_EVENTS.value),
                             frames_per_event=_FRAMES_PER_EVENT.value, battery_mwh=_BATTERY.value,
                             deadline_ms=_DEADLINE.value)
  with common.workdir_lock(_OUT_DIR.value):
    common.setup_process()
    result = plan_lib.plan(_NETWORKS.value, _PLATFORM.value, _POSITIVE.value, setting, min_recall=_RECALL.value,
                           min_precision=_PRECISION.value, max_false_alarms_per_hour=_FALSE_ALARMS.value,
                           out_dir=_OUT_DIR.value)
    files = plan_lib.write_plan(result, _OUT_DIR.value)
  print(plan_lib.report_markdown(result).split("## Options")[0].strip())
  print(f"planned {len(result['options'])} options in {result['seconds']['plan']:.2f} s "
        f"(networks evaluated in {result['seconds']['evaluate']:.1f} s)")
  print("-> " + ", ".join(files.values()))


if __name__ == "__main__":
  common.run(main)
