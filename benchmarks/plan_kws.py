"""The deployment planner on keyword spotting: a wake word, recall >= 95%, 0.1 to 100 events per hour.

  python -m benchmarks.plan_kws --networks=DIR[,DIR...] [--positive=yes] [--workdir=runs/plan_kws]

DIRs are KWS retrain, export, pipeline or sweep workdirs. The recorded result planned eleven networks: DS-CNN,
retrained with
  python -m launch.retrain --config=experiments/kws.py --config.retrain.epochs=6 --config.retrain.qat_epochs=2 \
      --baseline=dscnn --workdir=runs/plan_nets/dscnn
and, from `python -m benchmarks.random_search --retrain_epochs=4` (the run behind results/random_search.json, its
workdir runs/random_search3), the searched network and random0-3 of each budget
(runs/random_search3/lam_{0.1,0.3}/{searched,random0,...,random3}/seed0; the planner exports them). 16 kHz audio in
1 s windows with 50% overlap (2 frames/s); one keyword is the positive class, every other class (other keywords,
unknown words, silence) negative.

1. The plan on the default platform with the frame period as the deadline: every single network and every
   cheaper-first cascade, calibrated on the validation split and measured on the test split with the int8 models in
   TFLite Micro; the best single model, the best cascade, the crossover.
2. Clock choice: the same plan on every MCU platform at several deadlines, once over all the platform's operating
   points and once at its nominal clock only; where the recommendation (option or clock) changes.
3. Planning time over all the networks and 50 event rates once their outputs are cached.
4. The recommended deployment exported as one device program (`launch.export --plan`, edgenas.export.cascade)
   and run on the default platform's emulated core: every stage output of `--device_frames` test frames, the
   stages run and the detections checked against the host TFLite Micro, instructions per stage counted.

Writes benchmarks/results/plan_kws.json and plan_kws.png (the default platform's plot).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from edgenas import plan as plan_lib
from edgenas import rundir
from edgenas.console import say

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "plan_kws.json")
PLATFORMS = ("stm32l4r5_tflm", "stm32h7a3_xcubeai", "efr32mg24_tflm", "andes_d45_tflm")
DEADLINES_MS = (500.0, 100.0, 30.0)


def summary(result: dict) -> dict:
  by_name = {o["name"]: o for o in result["options"]}
  e = result["setting"]["events_per_hour"]
  k = e.index(result["recommended_at_events_per_hour"])
  rec = by_name[result["recommended"]]
  out = dict(recommended=rec["name"], operating_point=rec["operating_point"],
             power_mw_at_recommended_rate=rec["solution_power_mw"][k], bands=result["bands"])
  single = by_name.get(result["best_single"])
  if single:
    out["best_single"] = dict(name=single["name"], operating_point=single["operating_point"],
                              test_recall=single["test"]["recall"], power_mw_low=single["solution_power_mw"][0],
                              power_mw_high=single["solution_power_mw"][-1])
  cascades = [o for o in result["options"] if o["kind"] == "cascade" and o["feasible"]]
  if cascades:
    best = min(cascades, key=lambda o: o["solution_power_mw"][0])
    out["best_cascade_at_lowest_rate"] = dict(
        name=best["name"], operating_point=best["operating_point"], test_recall=best["test"]["recall"],
        stage1_false_trigger_rate=best["test"]["stage1_false_trigger_rate"],
        power_mw_low=best["solution_power_mw"][0], power_mw_high=best["solution_power_mw"][-1],
        saving_vs_best_single_at_lowest_rate=(1 - best["solution_power_mw"][0] / single["solution_power_mw"][0]
                                              if single else None),
        crossover=next((c for c in result["crossovers"] if c["cascade"] == best["name"]), None))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--networks", required=True, help="comma-separated KWS workdirs")
  parser.add_argument("--positive", default="yes")
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "plan_kws"))
  parser.add_argument("--out", default=RESULTS)
  parser.add_argument("--device_frames", type=int, default=24, help="test frames the device program checks")
  args = parser.parse_args()
  t0 = time.time()
  networks = [p for p in args.networks.split(",") if p.strip()]
  setting = plan_lib.Setting(frame_rate_hz=2.0, events_per_hour=tuple(float(x) for x in np.geomspace(0.1, 100, 50)),
                             battery_mwh=2000.0)
  uncapped = plan_lib.plan(networks, PLATFORMS[0], args.positive, setting, min_recall=0.95, out_dir=args.workdir)
  plan_lib.write_plan(uncapped, os.path.join(args.workdir, PLATFORMS[0] + "-no_false_alarm_limit"))
  # The requirement the comparison is made at: recall >= 95% and no more false alarms (validation) than the best
  # single model raises. Without it the cheapest single network always wins, however often it fires.
  cap = min(o["calibration"]["false_alarms_per_hour"] for o in uncapped["options"]
            if o["kind"] == "single" and "calibration" in o)
  say(f"false-alarm limit: {cap:.1f}/hour, the best single model's on the validation split")

  t_plan = time.time()  # every network's outputs are cached now: this is planning alone
  result = plan_lib.plan(networks, PLATFORMS[0], args.positive, setting, min_recall=0.95,
                         max_false_alarms_per_hour=cap, out_dir=args.workdir)
  planning_s = time.time() - t_plan
  files = plan_lib.write_plan(result, os.path.join(args.workdir, PLATFORMS[0]))
  say(f"plan on {PLATFORMS[0]}: {len(result['options'])} options, recommended {result['recommended']}")

  clock = []
  for platform in PLATFORMS:
    for deadline in DEADLINES_MS:
      row = dict(platform=platform, deadline_ms=deadline)
      for mode, nominal_only in (("all_points", False), ("nominal_clock", True)):
        s = plan_lib.Setting(setting.frame_rate_hz, setting.events_per_hour, deadline_ms=deadline)
        try:
          r = plan_lib.plan(networks, platform, args.positive, s, min_recall=0.95, out_dir=args.workdir,
                            max_false_alarms_per_hour=cap, nominal_only=nominal_only)
          row[mode] = summary(r)
        except plan_lib.PlanError as e:
          row[mode] = dict(error=str(e))
      a, n = row["all_points"], row["nominal_clock"]
      row["clock_choice_changes_recommendation"] = (
          "error" not in a and ("error" in n or a["recommended"] != n["recommended"]
                                or a["operating_point"] != n["operating_point"]))
      clock.append(row)
      say(f"{platform} deadline {deadline:g} ms: {a.get('recommended', a.get('error'))} @ "
          f"{a.get('operating_point')} vs nominal clock {n.get('recommended', n.get('error'))}")

  from edgenas.energy import platform as platform_lib  # pylint: disable=g-import-not-at-top
  from edgenas.export import cascade  # pylint: disable=g-import-not-at-top
  target = platform_lib.load_platform(PLATFORMS[0]).target
  deployed = cascade.export_plan(os.path.join(args.workdir, PLATFORMS[0]), targets=[target],
                                 frames=args.device_frames)
  on_target = deployed["targets"][target]
  device = dict(option=deployed["option"], target=target, program=os.path.relpath(
      os.path.join(args.workdir, PLATFORMS[0], cascade.CASCADE_DIR), REPO),
      **{k: on_target[k] for k in ("matches_host", "frames_checked", "frames_matching", "stage2_runs", "detections",
                                   "instructions_per_stage", "instructions_per_frame", "arena_used_bytes",
                                   "at_plan_trigger_rate", "elf", "seconds") if k in on_target})

  out = dict(
      task="wake word on the embedded KWS set", positive=args.positive, min_recall=0.95,
      max_false_alarms_per_hour=dict(value=cap, rule="the best single model's, on the validation split"),
      without_false_alarm_limit=summary(uncapped),
      frame_rate_hz=setting.frame_rate_hz, events_per_hour=[setting.events_per_hour[0], setting.events_per_hour[-1],
                                                              len(setting.events_per_hour)],
      networks=[dict(name=n["name"], export_dir=os.path.relpath(n["export_dir"], REPO)
                     if n["export_dir"].startswith(REPO) else n["export_dir"], arch_hash=n["arch_hash"])
                for n in result["networks"]],
      default_platform=dict(platform=PLATFORMS[0], deadline_ms=result["setting"]["deadline_ms"], **summary(result),
                            options=[dict(name=o["name"], kind=o["kind"], feasible=o["feasible"],
                                          operating_point=o.get("operating_point"), test=o.get("test"),
                                          thresholds_q=o.get("thresholds_q"), energy_uj=o.get("energy_uj"),
                                          power_mw_low=o["solution_power_mw"][0] if "solution_power_mw" in o else None,
                                          power_mw_high=o["solution_power_mw"][-1] if "solution_power_mw" in o
                                          else None)
                                     for o in result["options"]]),
      clock_choice=clock,
      device=device,
      planning=dict(networks=len(result["networks"]), options=len(result["options"]),
                    event_rates=len(setting.events_per_hour), seconds=round(planning_s, 2),
                    note="outputs cached; includes loading the dataset and pricing every network at every point"),
      seconds=dict(total=round(time.time() - t0, 1)),
      measurement=dict(cpu_count=os.cpu_count(), load_average_at_end=[round(v, 2) for v in os.getloadavg()]))
  rundir.atomic_write_json(args.out, out)
  shutil.copyfile(files["plot"], os.path.splitext(args.out)[0] + ".png")
  print(json.dumps(dict(default=out["default_platform"]["recommended"], planning_s=out["planning"]["seconds"],
                        device=f"{device['frames_matching']}/{device['frames_checked']} frames on {target}",
                        clock_changes=[(r["platform"], r["deadline_ms"]) for r in clock
                                       if r["clock_choice_changes_recommendation"]]), indent=1))


if __name__ == "__main__":
  main()
