"""Deployment planner: which network, or which two-stage cascade, and which clock, for an always-on detector.

A battery-powered detector runs on every sensor frame, so its lifetime is set by its solution power, not by the
energy of one inference:

    single model   P(e) = P_static + f · E
    cascade A → B  P(e) = P_static + f · E_A + f · trigger_A(e) · E_B
                   trigger_A(e) = p(e) · recall_A + (1 − p(e)) · false_trigger_A,   p(e) = e · k / (3600 f)

with f frames per second (1 s windows, 50% overlap: f = 2), e events per hour, each event positive in k frames,
and E the int8 network's energy per inference at the operating point (clock, wait states, power) chosen for it.
Stage A is small and tuned for recall; B runs only when A fires. A cascade wins while events are rare, since A's
false triggers, not events, set how often B runs; as events grow more frequent B runs more often, and above the
*crossover* event rate the best single model wins. Power is linear in e, so the crossover is solved exactly.

Every figure comes from the int8 models as exported, run in the TFLite Micro interpreter:
  1. thresholds are calibrated on the validation split: a stage fires when its int8 output byte for the positive
     class reaches its threshold (exactly what the device compares). A single model takes the highest threshold
     whose validation recall meets the requirement. A cascade takes, among the threshold pairs meeting the recall
     requirement with no more validation false alarms than its stage B alone, the pair whose stage A fires least
     (the pair with the fewest false alarms when none matches B);
  2. recall, precision, false triggers and trigger rates are then measured on the test split;
  3. each option's energy comes from the platform's cost model (`edgenas.energy.estimate`) priced at each of the
     platform's operating points (`edgenas.energy.operating`); the option runs at the point that minimises its
     solution power averaged over the event-rate range, among the points that meet the latency deadline (both
     stages back to back, by default the frame period).

`plan(...)` returns plan.json's content; `write_plan` writes plan.json, plan.png and plan.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import time
from typing import Mapping, Sequence

import numpy as np

from edgenas import rundir
from edgenas.console import say

PLAN_VERSION = 1
PLAN_FILE = "plan.json"
PLOT_FILE = "plan.png"
REPORT_FILE = "plan.md"
SCORES_DIR = "scores"  # cached int8 outputs of every network on the validation and test splits
EXPORT_REPORT = "report.json"
MODEL_FILE = "model.tflite"
# The fields of a retrain config that decide which clips are in which split: networks planned together must agree.
DATA_FIELDS = ("dataset", "data_dir", "val_fraction", "data_seed", "image_size", "channels")


class PlanError(ValueError):
  """Bad planner input: the message names the network, flag or figure."""


# --------------------------------------------------------------------------------------------------------------
# Networks


@dataclasses.dataclass
class Network:
  name: str
  export_dir: str
  tflite: str
  config: dict  # the retrain config it was trained with
  arch_hash: str
  sha256: str


def _retrain_config(export_dir: str, report: Mapping) -> dict:
  # The workdir the export sits in (<retrain workdir>/export) first, then the one its report recorded.
  candidates = [os.path.dirname(os.path.abspath(export_dir))]
  workdir = (report.get("retrain") or {}).get("workdir")
  if workdir and workdir not in candidates:
    candidates.append(workdir)
  for w in candidates:
    path = os.path.join(w, rundir.CONFIG_FILE)
    if os.path.isfile(path):
      recorded = rundir.read_json(path)
      config = recorded.get("config", recorded) if isinstance(recorded, dict) else None
      if isinstance(config, dict) and "dataset" in config:
        return config
  raise PlanError(f"{export_dir}: cannot find the retrain config.json it was exported from (looked in "
                  f"{', '.join(candidates)}); export it from a retrain workdir (launch.export --workdir=DIR)")


def _export_dirs(path: str) -> list[str]:
  """The export directories a --networks entry stands for: an export dir, a retrain workdir (its export/, made
  when missing), a pipeline workdir (its searched network and baselines) or a sweep workdir (its members)."""
  from edgenas import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from edgenas import train as train_lib  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise PlanError(f"network {path}: no such directory")
  if os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, EXPORT_REPORT)):
    return [path]
  if os.path.isfile(os.path.join(path, train_lib.REPORT_FILE)) and os.path.isfile(
      os.path.join(path, rundir.CONFIG_FILE)) and os.path.isfile(os.path.join(path, train_lib.ARCH_FILE)):
    export_dir = os.path.join(path, "export")
    if not os.path.isfile(os.path.join(export_dir, EXPORT_REPORT)):
      from edgenas import export as export_lib  # pylint: disable=g-import-not-at-top
      say(f"plan: {path} is not exported yet; exporting it to {export_dir}")
      report = export_lib.export_workdir(path, strict=False)  # the planner measures the int8 model itself
      if not report["checks"]["passed"]:
        say(f"plan: warning: {export_dir}: the export's accuracy checks failed (report.json); planning with it")
    return [export_dir]
  found = []
  if os.path.isdir(os.path.join(path, "retrain")):  # a pipeline workdir
    found += _export_dirs(os.path.join(path, "retrain"))
  members = os.path.join(path, "members")
  if os.path.isdir(members):  # a sweep workdir
    for m in sorted(os.listdir(members)):
      if os.path.isdir(os.path.join(members, m, sweep_lib.RETRAIN_DIR)):
        found += _export_dirs(os.path.join(members, m, sweep_lib.RETRAIN_DIR))
  base = os.path.join(path, sweep_lib.BASELINES_DIR)  # both keep their baselines here
  if found and os.path.isdir(base):
    for name in sorted(os.listdir(base)):
      found += _export_dirs(os.path.join(base, name))
  if not found:
    raise PlanError(f"network {path}: not an export dir (model.tflite + report.json), a retrain workdir, a "
                    "pipeline workdir or a sweep workdir with retrained members")
  return found


def load_networks(paths: Sequence[str]) -> list[Network]:
  """Every network the --networks entries name, checked to share one dataset and label set."""
  dirs = []
  for p in paths:
    for d in _export_dirs(p):
      if d not in dirs:
        dirs.append(d)
  networks, names = [], set()
  for d in dirs:
    report = rundir.read_json(os.path.join(d, EXPORT_REPORT))
    tflite = os.path.join(d, report.get("model_file", MODEL_FILE))
    if not os.path.isfile(tflite):
      raise PlanError(f"network {d}: {tflite} is missing")
    with open(tflite, "rb") as f:
      sha = hashlib.sha256(f.read()).hexdigest()
    config = _retrain_config(d, report)
    name = report.get("arch_name") or f"arch_{report.get('arch_hash', sha[:12])}"
    if name in ("searched", "", "random") or name in names:  # names users can tell apart in the plot
      name = f"{name}_{report.get('arch_hash', sha)[:6]}"
    names.add(name)
    networks.append(Network(name, d, tflite, config, report.get("arch_hash", ""), sha))
  if len(networks) < 2:
    raise PlanError(f"the planner needs two or more networks, got {len(networks)} ({', '.join(dirs) or 'none'})")
  _check_same_data(networks)
  return networks


def _data_key(config: Mapping) -> dict:
  out = {k: config.get(k) for k in DATA_FIELDS}
  if out["data_seed"] is None:
    out["data_seed"] = config.get("seed", 0)  # configs from before data_seed split with seed
  out["image_size"] = out["image_size"] or 0
  out["channels"] = out["channels"] or 0
  out["data_dir"] = os.path.abspath(os.path.expanduser(out["data_dir"])) if out["data_dir"] else ""
  return out


def _check_same_data(networks: Sequence[Network]) -> None:
  first = _data_key(networks[0].config)
  for n in networks[1:]:
    key = _data_key(n.config)
    for field in DATA_FIELDS:
      if _jsonable(key[field]) != _jsonable(first[field]):
        raise PlanError(f"networks trained on different data: {n.name} has {field}={key[field]!r}, "
                        f"{networks[0].name} has {field}={first[field]!r}; plan networks of one dataset and split")


def _jsonable(v):
  return list(v) if isinstance(v, tuple) else v


def label_names(dataset_name: str, num_classes: int) -> list[str]:
  if dataset_name in ("kws", "tfds:speech_commands"):
    from edgenas import audio  # pylint: disable=g-import-not-at-top
    return list(audio.LABELS)
  return [str(i) for i in range(num_classes)]


def positive_index(positive: str, labels: Sequence[str]) -> int:
  if positive in labels:
    return list(labels).index(positive)
  if positive.isdigit() and int(positive) < len(labels):
    return int(positive)
  raise PlanError(f"--positive={positive!r} is not a class of this dataset ({', '.join(labels)})")


# --------------------------------------------------------------------------------------------------------------
# Scores: the int8 outputs of every network on the validation and test splits, in the TFLite Micro interpreter


def int8_outputs(network: Network, dataset, cache_dir: str) -> dict[str, np.ndarray]:
  """{"val": int8 [N, classes], "test": ...}, cached by the model's sha256 and the data fields."""
  from edgenas import data as data_lib  # pylint: disable=g-import-not-at-top
  from edgenas.export import verify  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256((network.sha256 + repr(sorted(_data_key(network.config).items()))).encode()).hexdigest()
  path = os.path.join(cache_dir, f"{network.name}-{key[:16]}.npz")
  if os.path.isfile(path):
    with np.load(path) as z:
      if len(z["val"]) == len(dataset.val) and len(z["test"]) == len(dataset.test):
        return {"val": z["val"], "test": z["test"]}
  with open(network.tflite, "rb") as f:
    runner = verify.TflmRunner(f.read())
  t0, out = time.time(), {}
  for split in ("val", "test"):
    rows = []
    for images, _ in data_lib.chunks(getattr(dataset, split), 512):
      rows.append(runner.run_int8(runner.quantize_input(images)))
    out[split] = np.concatenate(rows)
  say(f"plan: {network.name}: int8 outputs on {len(out['val'])} validation and {len(out['test'])} test clips in "
      f"{time.time() - t0:.1f} s (TFLite Micro)")
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **out)
  os.replace(tmp, path)
  return out


# --------------------------------------------------------------------------------------------------------------
# Thresholds and detection rates. A score is the int8 output byte of the positive class: -128 ... 127.

LEVELS = 256


def _survival(scores: np.ndarray) -> np.ndarray:
  """counts[t + 128] = #(score >= t) for t in -128 ... 127."""
  hist = np.bincount(scores.astype(np.int64) + 128, minlength=LEVELS)
  return np.cumsum(hist[::-1])[::-1]


def _survival_2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """counts[i, j] = #(a >= i - 128 and b >= j - 128)."""
  hist = np.zeros((LEVELS, LEVELS), np.int64)
  np.add.at(hist, (a.astype(np.int64) + 128, b.astype(np.int64) + 128), 1)
  return np.cumsum(np.cumsum(hist[::-1, ::-1], axis=0), axis=1)[::-1, ::-1]


def calibrate_single(pos: np.ndarray, neg: np.ndarray, min_recall: float) -> tuple[int, dict]:
  """The highest threshold whose validation recall is >= min_recall (the fewest false alarms at that recall)."""
  rec = _survival(pos) / max(1, len(pos))
  ok = np.nonzero(rec >= min_recall - 1e-12)[0]
  t = int(ok.max()) - 128  # -128 always fires: recall 1 is always reachable
  return t, dict(recall=float(rec[t + 128]), false_triggers=int(_survival(neg)[t + 128]))


def calibrate_cascade(pos_a, neg_a, pos_b, neg_b, min_recall: float, max_false_alarms: int) -> tuple[int, int, dict]:
  """(t_a, t_b): among pairs with validation recall >= min_recall and at most `max_false_alarms` false
  detections, the one whose stage A fires least often on negatives; the fewest false detections when none has."""
  tp = _survival_2d(pos_a, pos_b) / max(1, len(pos_a))
  fp = _survival_2d(neg_a, neg_b)
  a_fires = np.broadcast_to(_survival(neg_a)[:, None], (LEVELS, LEVELS))
  feasible = tp >= min_recall - 1e-12
  strict = feasible & (fp <= max_false_alarms)
  if strict.any():
    cost = np.where(strict, a_fires * (len(neg_a) + 1) + fp, np.iinfo(np.int64).max)
    rule = "fewest stage-1 triggers with no more false alarms than stage 2 alone"
  else:
    cost = np.where(feasible, fp * (len(neg_a) + 1) + a_fires, np.iinfo(np.int64).max)
    rule = "fewest false alarms (none matches stage 2 alone)"
  i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
  return int(i) - 128, int(j) - 128, dict(recall=float(tp[i, j]), false_triggers=int(fp[i, j]),
                                          stage1_false_triggers=int(a_fires[i, j]), rule=rule)


def detection_rates(fires: np.ndarray, stage1_fires: np.ndarray, is_pos: np.ndarray) -> dict:
  """Recall, precision (at the split's class mix), false-trigger rate and stage-1 trigger rates on one split."""
  pos, neg = is_pos, ~is_pos
  tp, fp = int(np.sum(fires & pos)), int(np.sum(fires & neg))
  return dict(positives=int(pos.sum()), negatives=int(neg.sum()), true_positives=tp, false_positives=fp,
              recall=tp / max(1, int(pos.sum())), precision=tp / max(1, tp + fp),
              false_trigger_rate=fp / max(1, int(neg.sum())),
              stage1_recall=float(np.mean(stage1_fires[pos])) if pos.any() else 0.0,
              stage1_false_trigger_rate=float(np.mean(stage1_fires[neg])) if neg.any() else 0.0)


# --------------------------------------------------------------------------------------------------------------
# Power


@dataclasses.dataclass(frozen=True)
class Setting:
  """The deployment: frames per second, events per hour to plan over, frames an event is positive in."""
  frame_rate_hz: float
  events_per_hour: tuple[float, ...]
  frames_per_event: float = 1.0
  battery_mwh: float | None = None
  deadline_ms: float | None = None  # default: the frame period

  @property
  def deadline(self) -> float:
    return self.deadline_ms if self.deadline_ms is not None else 1e3 / self.frame_rate_hz

  def positive_fraction(self, events_per_hour) -> np.ndarray:
    return np.asarray(events_per_hour, np.float64) * self.frames_per_event / (3600.0 * self.frame_rate_hz)


def stage_costs(platform, points, network: Network) -> list[dict]:
  """Per operating point: the network's latency (ms) and energy (µJ) per inference."""
  from edgenas.energy import estimate  # pylint: disable=g-import-not-at-top
  from edgenas.energy import operating  # pylint: disable=g-import-not-at-top
  report = estimate.estimate_tflite(network.tflite, platform)
  if report.get("flash_reads") is None:
    raise PlanError(f"platform {platform.name}: its cost model has no flash-read counts, so it cannot price "
                    "operating points; refit it with launch.profile")
  return [dict(point=p.name, **operating.price(platform, p, report["cycles"], report["flash_reads"],
                                              report["energy_uj"]))
          for p in points]


def option_power(setting: Setting, static_mw: float, stage1: dict, stage2: dict | None, rates: dict,
                 events_per_hour) -> np.ndarray:
  """Solution power (mW) over event rates; `rates`: the test split's stage-1 recall and false-trigger rate."""
  f = setting.frame_rate_hz
  p = setting.positive_fraction(events_per_hour)
  power = np.full_like(p, static_mw + f * stage1["energy_uj"] / 1e3)
  if stage2 is not None:
    trigger = p * rates["stage1_recall"] + (1 - p) * rates["stage1_false_trigger_rate"]
    power = power + f * trigger * stage2["energy_uj"] / 1e3
  return power


def crossover(power_a: Sequence[float], power_b: Sequence[float], events_per_hour: Sequence[float]) -> float | None:
  """The event rate where two options linear in e draw equal power (None if they never cross at e >= 0)."""
  e = np.asarray(events_per_hour, np.float64)
  da, db = np.polyfit(e, power_a, 1), np.polyfit(e, power_b, 1)
  slope, offset = da[0] - db[0], da[1] - db[1]
  if abs(slope) < 1e-18:
    return None
  x = -offset / slope
  return float(x) if x >= 0 else None


# --------------------------------------------------------------------------------------------------------------
# The plan


def plan(network_paths: Sequence[str], platform_name: str, positive: str, setting: Setting, *,
         min_recall: float = 0.95, min_precision: float = 0.0, max_false_alarms_per_hour: float | None = None,
         out_dir: str, nominal_only: bool = False) -> dict:
  """Every single model and every two-stage cascade (cheaper stage first), calibrated, measured and priced."""
  from edgenas import data as data_lib  # pylint: disable=g-import-not-at-top
  from edgenas.energy import operating  # pylint: disable=g-import-not-at-top
  from edgenas.energy import platform as platform_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  if not 0.0 < min_recall <= 1.0:
    raise PlanError(f"--min_recall must be in (0, 1], got {min_recall}: no threshold reaches it")
  if not 0.0 <= min_precision <= 1.0:
    raise PlanError(f"--min_precision must be in [0, 1], got {min_precision}: no threshold reaches it")
  if not setting.frame_rate_hz > 0:
    raise PlanError(f"the frame rate must be > 0, got {setting.frame_rate_hz}")
  if not setting.events_per_hour or min(setting.events_per_hour) < 0:
    raise PlanError(f"events per hour must be >= 0 and not empty, got {setting.events_per_hour}")
  t0 = time.time()
  platform = platform_lib.load_platform(platform_name)
  points = operating.points(platform)
  if nominal_only:  # the clock the platform's profile was measured at: what planning without clock choice sees
    points = [operating.nominal_point(platform)]
  networks = load_networks(network_paths)
  config = ml_collections.ConfigDict(networks[0].config)
  dataset = data_lib.load_data(config)
  labels = label_names(dataset.name, dataset.num_classes)
  pos_index = positive_index(positive, labels)
  outputs = {n.name: int8_outputs(n, dataset, os.path.join(out_dir, SCORES_DIR)) for n in networks}
  for n in networks:
    if outputs[n.name]["test"].shape[1] != dataset.num_classes:
      raise PlanError(f"network {n.name} has {outputs[n.name]['test'].shape[1]} outputs; the dataset "
                      f"{dataset.name} has {dataset.num_classes} classes: a different label set")
  t_eval = time.time()
  costs = {n.name: stage_costs(platform, points, n) for n in networks}
  if max_false_alarms_per_hour is not None and not max_false_alarms_per_hour >= 0:
    raise PlanError(f"--max_false_alarms_per_hour must be >= 0, got {max_false_alarms_per_hour}")
  options = _options(networks, outputs, costs, dataset, pos_index, platform, points, setting, min_recall,
                     min_precision, max_false_alarms_per_hour)
  t_plan = time.time()
  result = dict(
      version=PLAN_VERSION, platform=platform.name, dataset=dataset.name, labels=labels,
      positive=dict(label=labels[pos_index], index=pos_index),
      setting=dict(frame_rate_hz=setting.frame_rate_hz, frames_per_event=setting.frames_per_event,
                   events_per_hour=list(setting.events_per_hour), deadline_ms=setting.deadline,
                   battery_mwh=setting.battery_mwh, min_recall=min_recall, min_precision=min_precision,
                   max_false_alarms_per_hour=max_false_alarms_per_hour,
                   static_mw=platform.static_mw),
      networks=[dict(name=n.name, export_dir=n.export_dir, tflite=n.tflite, arch_hash=n.arch_hash,
                     sha256=n.sha256, costs=costs[n.name]) for n in networks],
      operating_points=[dataclasses.asdict(p) for p in points],
      options=options)
  result.update(_recommend(options, setting, labels[pos_index]))
  result["deployment"] = _deployment(result, networks)
  result["setting"]["clock_choice"] = "nominal clock only" if nominal_only else "every operating point"
  result["seconds"] = dict(evaluate=round(t_eval - t0, 2), plan=round(t_plan - t_eval, 3),
                           total=round(time.time() - t0, 2))
  return result


def _options(networks, outputs, costs, dataset, pos_index, platform, points, setting, min_recall, min_precision,
             max_false_alarms_per_hour):
  from edgenas.energy import operating  # pylint: disable=g-import-not-at-top
  from edgenas.energy.errors import EnergyModelError  # pylint: disable=g-import-not-at-top
  val_pos = np.asarray(dataset.val.labels) == pos_index
  test_pos = np.asarray(dataset.test.labels) == pos_index
  if not val_pos.any() or not test_pos.any():
    raise PlanError(f"the positive class has {int(val_pos.sum())} validation and {int(test_pos.sum())} test clips; "
                    "thresholds cannot be calibrated")
  score = {n: {s: o[s][:, pos_index] for s in ("val", "test")} for n, o in outputs.items()}
  singles = {}
  for n in networks:
    t, val = calibrate_single(score[n.name]["val"][val_pos], score[n.name]["val"][~val_pos], min_recall)
    singles[n.name] = (t, val)
  by_point = {name: {c["point"]: c for c in rows} for name, rows in costs.items()}
  cheapest = {n.name: min(c["energy_uj"] for c in costs[n.name]) for n in networks}
  candidates = [(n.name,) for n in networks]  # and every pair with the cheaper network first
  candidates += [(a.name, b.name) for a, b in itertools.permutations(networks, 2)
                 if cheapest[a.name] < cheapest[b.name]]
  options = []
  for stages in candidates:
    if len(stages) == 1:
      (name,), (t, val) = stages, singles[stages[0]]
      thresholds = [t]
      fires_test = score[name]["test"] >= t
      stage1_test = fires_test
      calibration = dict(rule="highest threshold meeting the recall", **val)
    else:
      a, b = stages
      t_b_alone, b_val = singles[b]
      ta, tb, val = calibrate_cascade(score[a]["val"][val_pos], score[a]["val"][~val_pos], score[b]["val"][val_pos],
                                      score[b]["val"][~val_pos], min_recall, b_val["false_triggers"])
      thresholds = [ta, tb]
      stage1_test = score[a]["test"] >= ta
      fires_test = stage1_test & (score[b]["test"] >= tb)
      calibration = val
    val_fires = np.ones(len(val_pos), bool)
    for name, t in zip(stages, thresholds):
      val_fires &= score[name]["val"] >= t
    val_precision = float(np.sum(val_fires & val_pos) / max(1, np.sum(val_fires)))
    # False alarms per hour the validation split predicts (events are rare: nearly every frame is negative)
    val_false_alarms = 3600.0 * setting.frame_rate_hz * float(np.mean(val_fires[~val_pos]))
    rates = detection_rates(fires_test, stage1_test, test_pos)

    def at_point(point, stages=stages, rates=rates):
      if point.name not in by_point[stages[0]]:
        return math.inf, math.inf  # a point left out (nominal_only)
      s1, s2 = _stage_costs_at(by_point, stages, point.name)
      latency = s1["latency_ms"] + (s2["latency_ms"] if s2 else 0.0)
      duty = setting.frame_rate_hz * latency / 1e3  # worst case: every frame runs both stages
      if duty > 1:
        return latency, math.inf
      return latency, float(np.mean(option_power(setting, platform.static_mw, s1, s2, rates,
                                                 setting.events_per_hour)))

    kind = "single" if len(stages) == 1 else "cascade"
    name = " → ".join(stages)
    try:
      chosen, table = operating.choose(platform, at_point, setting.deadline)
    except EnergyModelError as e:
      options.append(dict(name=name, kind=kind, stages=list(stages), feasible=False, why=str(e)))
      continue
    s1, s2 = _stage_costs_at(by_point, stages, chosen.name)
    power = option_power(setting, platform.static_mw, s1, s2, rates, setting.events_per_hour)
    why = []
    if val_precision < min_precision:
      why.append(f"validation precision {val_precision:.3f} < {min_precision}")
    if max_false_alarms_per_hour is not None and val_false_alarms > max_false_alarms_per_hour:
      why.append(f"{val_false_alarms:.0f} false alarms/hour on validation > {max_false_alarms_per_hour:g}")
    option = dict(
        name=name, kind=kind, stages=list(stages), feasible=not why, why="; ".join(why) or None,
        thresholds_q=thresholds, calibration=dict(calibration, precision=val_precision,
                                                  false_alarms_per_hour=val_false_alarms), test=rates,
        operating_point=chosen.name, operating_points=table,
        latency_ms=s1["latency_ms"] + (s2["latency_ms"] if s2 else 0.0),
        energy_uj=dict(stage1=s1["energy_uj"], stage2=s2["energy_uj"] if s2 else None),
        solution_power_mw=[float(x) for x in power],
        false_alarms_per_hour=[float(x) for x in _false_alarms_per_hour(setting, rates)])
    if setting.battery_mwh:
      option["battery_life_days"] = [float(setting.battery_mwh / x / 24) for x in power]
    options.append(option)
  return options


def _stage_costs_at(by_point: Mapping, stages: Sequence[str], point: str) -> tuple[dict, dict | None]:
  """(stage 1's, stage 2's or None) latency and energy at one operating point."""
  return by_point[stages[0]][point], by_point[stages[1]][point] if len(stages) == 2 else None


def _false_alarms_per_hour(setting: Setting, rates: dict) -> np.ndarray:
  p = setting.positive_fraction(setting.events_per_hour)
  return 3600.0 * setting.frame_rate_hz * (1 - p) * rates["false_trigger_rate"]


def _recommend(options: list[dict], setting: Setting, positive_label: str) -> dict:
  ok = [o for o in options if o["feasible"]]
  if not ok:
    reasons = "; ".join(f"{o['name']}: {o['why']}" for o in options[:4])
    raise PlanError(f"no network or cascade meets the requirements ({reasons})")
  e = np.asarray(setting.events_per_hour)
  power = np.asarray([o["solution_power_mw"] for o in ok])
  best_at = [ok[i]["name"] for i in np.argmin(power, axis=0)]
  singles = [o for o in ok if o["kind"] == "single"]
  cascades = [o for o in ok if o["kind"] == "cascade"]
  best_single = min(singles, key=lambda o: float(np.mean(o["solution_power_mw"]))) if singles else None
  bands, start = [], 0
  for k in range(1, len(e) + 1):
    if k == len(e) or best_at[k] != best_at[start]:
      bands.append(dict(option=best_at[start], from_events_per_hour=float(e[start]),
                        to_events_per_hour=float(e[k - 1])))
      start = k
  crossovers = []
  if best_single is not None:
    for c in cascades:
      x = crossover(c["solution_power_mw"], best_single["solution_power_mw"], e)
      low = c["solution_power_mw"][0] < best_single["solution_power_mw"][0]
      crossovers.append(dict(cascade=c["name"], single=best_single["name"], events_per_hour=x,
                             cascade_cheaper_below=bool(low), in_range=x is not None and e.min() <= x <= e.max()))
  best_cascade = min(cascades, key=lambda o: o["solution_power_mw"][0]) if cascades else None
  mid = int(np.argmin(np.abs(np.log10(np.maximum(e, 1e-9)) - np.mean(np.log10(np.maximum(e, 1e-9))))))
  recommended = best_at[mid]
  return dict(best_at=best_at, bands=bands, best_single=best_single["name"] if best_single else None,
              best_cascade_at_lowest_rate=best_cascade["name"] if best_cascade else None,
              crossovers=crossovers, recommended=recommended,
              recommended_at_events_per_hour=float(e[mid]), positive_label=positive_label)


def _deployment(result: dict, networks: Sequence[Network]) -> dict:
  """The recommended option's stages with their int8 thresholds: what a device program of the plan runs."""
  option = next(o for o in result["options"] if o["name"] == result["recommended"])
  by_name = {n.name: n for n in networks}
  stages = []
  for name, t in zip(option["stages"], option["thresholds_q"]):
    n = by_name[name]
    q = rundir.read_json(os.path.join(n.export_dir, EXPORT_REPORT))["quantization"]["output"]
    scale, zp = q["scale"], q["zero_point"]
    stages.append(dict(name=name, tflite=n.tflite, threshold_q=int(t), threshold=float((t - zp) * scale),
                       sha256=n.sha256))
  return dict(kind=option["kind"], positive_index=result["positive"]["index"],
              positive_label=result["positive"]["label"], stages=stages, operating_point=option["operating_point"],
              data_config=networks[0].config)


# --------------------------------------------------------------------------------------------------------------
# Files


def write_plan(result: dict, out_dir: str) -> dict:
  """plan.json, plan.png and plan.md in `out_dir` (each written whole, then moved into place)."""
  os.makedirs(out_dir, exist_ok=True)
  rundir.atomic_write_json(os.path.join(out_dir, PLAN_FILE), result)
  plot(result, os.path.join(out_dir, PLOT_FILE))
  text = report_markdown(result)
  tmp = os.path.join(out_dir, REPORT_FILE + ".tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(out_dir, REPORT_FILE))
  return {k: os.path.join(out_dir, v) for k, v in (("plan", PLAN_FILE), ("plot", PLOT_FILE), ("report", REPORT_FILE))}


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  e = np.asarray(result["setting"]["events_per_hour"])
  fig, ax = plt.subplots(figsize=(7.2, 4.6))
  shown = sorted((o for o in result["options"] if o["feasible"]), key=lambda o: o["solution_power_mw"][0])
  for o in shown:
    style = "-" if o["kind"] == "cascade" else "--"
    width = 2.2 if o["name"] == result["recommended"] else 1.1
    ax.plot(e, o["solution_power_mw"], style, lw=width, label=f"{o['name']} @ {o['operating_point']}")
  for c in result["crossovers"]:
    if c["in_range"]:
      ax.axvline(c["events_per_hour"], color="k", lw=0.6, alpha=0.5)
      ax.annotate(f"crossover\n{c['events_per_hour']:.3g}/h", (c["events_per_hour"], ax.get_ylim()[1]),
                  fontsize=7, ha="left", va="top")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("events per hour")
  ax.set_ylabel("solution power (mW)")
  ax.set_title(f"{result['positive']['label']!r} detector on {result['platform']}, recall ≥ "
               f"{result['setting']['min_recall']:.0%}", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=6, loc="best")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def report_markdown(result: dict) -> str:
  s = result["setting"]
  e = s["events_per_hour"]
  by_name = {o["name"]: o for o in result["options"]}
  rec = by_name[result["recommended"]]
  lines = [f"# Deployment plan: {result['positive']['label']!r} detector on {result['platform']}", "",
           f"{s['frame_rate_hz']:g} frames/s, {e[0]:g}–{e[-1]:g} events per hour, recall ≥ {s['min_recall']:.0%} "
           f"(calibrated on the validation split, measured on the test split), deadline {s['deadline_ms']:g} ms"
           + (f", at most {s['max_false_alarms_per_hour']:g} false alarms/hour (validation)."
              if s.get("max_false_alarms_per_hour") is not None else "."),
           "", "## Recommendation", "",
           f"**{rec['name']}** at operating point **{rec['operating_point']}** "
           f"(best at {result['recommended_at_events_per_hour']:.3g} events/hour, the middle of the range): "
           f"{rec['solution_power_mw'][0]:.4g}–{rec['solution_power_mw'][-1]:.4g} mW, test recall "
           f"{rec['test']['recall']:.3f}, {rec['false_alarms_per_hour'][0]:.1f} false alarms/hour."]
  if "battery_life_days" in rec:
    lines.append(f"Battery life on {s['battery_mwh']:g} mWh: {rec['battery_life_days'][0]:.1f} days at "
                 f"{e[0]:g} events/hour, {rec['battery_life_days'][-1]:.1f} days at {e[-1]:g}.")
  lines += ["", "Best option by event rate:", ""]
  for b in result["bands"]:
    lines.append(f"- {b['from_events_per_hour']:.3g}–{b['to_events_per_hour']:.3g} events/hour: {b['option']}")
  if result["crossovers"]:
    lines += ["", f"Crossovers against the best single model ({result['best_single']}):", ""]
    for c in sorted(result["crossovers"], key=lambda c: -(c["events_per_hour"] or 0))[:6]:
      where = "never (e ≥ 0)" if c["events_per_hour"] is None else f"{c['events_per_hour']:.4g} events/hour"
      side = "cheaper below it" if c["cascade_cheaper_below"] else "dearer below it"
      lines.append(f"- {c['cascade']}: {where} ({side}{'' if c['in_range'] else ', outside the planned range'})")
  lines += ["", "## Options", "",
            "| option | point | latency ms | E stage 1 µJ | E stage 2 µJ | test recall | stage-1 triggers | "
            f"false alarms/h | P mW at {e[0]:g}/h | P mW at {e[-1]:g}/h |", "|---" * 10 + "|"]
  for o in sorted(result["options"], key=lambda o: o.get("solution_power_mw", [math.inf])[0]):
    if not o["feasible"] and "test" not in o:
      lines.append(f"| {o['name']} | – | – | – | – | – | – | – | {o['why']} | |")
      continue
    if not o["feasible"]:
      lines.append(f"| {o['name']} | {o['operating_point']} | – | – | – | {o['test']['recall']:.3f} | – | "
                   f"{o['false_alarms_per_hour'][0]:.1f} | not eligible: {o['why']} | |")
      continue
    e2 = o["energy_uj"]["stage2"]
    lines.append(f"| {o['name']} | {o['operating_point']} | {o['latency_ms']:.1f} | {o['energy_uj']['stage1']:.0f} | "
                 f"{'–' if e2 is None else f'{e2:.0f}'} | {o['test']['recall']:.3f} | "
                 f"{o['test']['stage1_false_trigger_rate']:.3f} | {o['false_alarms_per_hour'][0]:.1f} | "
                 f"{o['solution_power_mw'][0]:.4g} | {o['solution_power_mw'][-1]:.4g} |")
  lines += ["", "Stage-1 triggers: the fraction of negative test frames on which the first stage fires (what sets "
            "how often stage 2 runs). Power: P_static + f·E_1 + f·trigger(e)·E_2 at the option's operating point; "
            "the MFCC front-end's own cost, the same for every option, is not included.", ""]
  return "\n".join(lines)
