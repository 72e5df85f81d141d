"""MCU tables calibrated to real measurements (MLPerf Tiny).

Two ways, the first used by every shipped MCU platform:
  - `calibrate_emulated`: the relative cost of every operator configuration comes from the platform's own target,
    emulated (`edgenas.energy.counts`: instructions per class and flash reads per operator on its instruction
    set and kernels), priced by the platform's cycle model (`edgenas.energy.cycles`: its core's timing per
    instruction class, `edgenas.energy.timing`) whose one constant, the scale, is fitted to the board's
    whole-model measurements; leave-one-out errors are reported.
  - `calibrate` (below, for a platform without an emulated target): relative costs from the `host` table.

Two whole-model measurements per board cannot determine per-operator costs by themselves. In `calibrate` the
relative cost of each operator configuration therefore comes from the `host` table, which times TFLM's
reference kernels one operator at a time. A board's cost of an operator is the host cost split into its
compute part (the MAC, weight-byte and window-tap terms of the host regressor) and its overhead part (activation-byte
and per-call terms), each multiplied by a per-board scale:

    latency_board(op) = s_compute · compute_host(op) + s_overhead · overhead_host(op)

The scales are the only quantities fitted to the board's measurements (non-negative least squares on relative
error over its measured models), the same for every operator and every network: no per-model factor. With one
scale (`scales="single"`), the two measured models over-determine the fit and the residuals show how well the
host's relative costs transfer; with two, the fit is exact on two models and says nothing by itself, so
`leave_one_out` reports each model predicted from a single scale fitted on the other one.

Energy = latency x the board's average active power: measured (energy / latency of the measured rows) where the
board's energy was measured, otherwise a documented assumption, marked as an estimate.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize

from edgenas.energy import accelerator as accelerator_lib
from edgenas.energy import features as features_lib
from edgenas.energy import lut as lut_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy import regressor as regressor_lib
from edgenas.energy import tflite_graph
from edgenas.energy.errors import EnergyModelError

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_MODEL_DIRS = (os.path.join(_REPO_ROOT, "testdata"),
                        os.path.join(_REPO_ROOT, "..", "shared", "data", "mlperf_tiny", "models"))


def reference_model_path(file_name: str) -> str:
  """The repo's copy in testdata/ if present, else the shared MLPerf Tiny directory."""
  for d in REFERENCE_MODEL_DIRS:
    path = os.path.join(d, file_name)
    if os.path.exists(path):
      return path
  raise EnergyModelError(f"reference model {file_name!r} not found in {', '.join(REFERENCE_MODEL_DIRS)}")


def split_cost(coefs: Mapping[str, Sequence[float]], op: str, kernel: int,
               feats: Sequence[float]) -> tuple[float, float]:
  """(compute, overhead) parts of an operator's cost under per-op coefficients (`features.FEATURES` order:
  MACs, weight bytes and window taps are compute; activation bytes and the per-call constant are overhead)."""
  theta = regressor_lib.lookup(coefs, op, kernel)
  return (theta[0] * feats[0] + theta[1] * feats[1] + theta[4] * feats[4], theta[2] * feats[2] + theta[3] * feats[3])


def model_split(coefs, graph: tflite_graph.TfliteGraph) -> np.ndarray:
  """Summed (compute, overhead) host cost of a whole model."""
  return np.sum([split_cost(coefs, o.spec.op, o.spec.kernel, o.features()) for o in graph.ops], axis=0)


def fit_scales(splits: np.ndarray, measured: np.ndarray, single: bool) -> np.ndarray:
  """Non-negative (s_compute, s_overhead) minimising the relative error of split @ s against `measured`."""
  a = splits / measured[:, None]
  if single:
    s, _ = optimize.nnls(a.sum(axis=1, keepdims=True), np.ones(len(measured)))
    return np.array([s[0], s[0]])
  s, _ = optimize.nnls(a, np.ones(len(measured)))
  return s


def calibrate(platform: platform_lib.Platform, host: platform_lib.Platform) -> tuple[platform_lib.Platform,
                                                                                     list[lut_lib.LutRow]]:
  """The platform with fitted scales, power and a reproduction report, and its calibrated LUT rows.

  Reads the measurements and the method from `platform.calibration` (`measurements`: list of {benchmark, model,
  latency_ms, energy_uj or null, source}; `scales`: "single" or "compute_overhead").
  """
  cal = dict(platform.calibration)
  where = f"{platform.path}: field 'calibration"
  measurements = cal.get("measurements")
  if not measurements:
    raise EnergyModelError(f"{where}.measurements' is empty; a calibrated platform needs measured models")
  mode = cal.get("scales", "single")
  if mode not in ("single", "compute_overhead"):
    raise EnergyModelError(f"{where}.scales' must be 'single' or 'compute_overhead', got {mode!r}")
  coefs = host.coefficients("latency_ms")
  graphs = [tflite_graph.read_tflite(reference_model_path(m["model"])) for m in measurements]
  splits = np.array([model_split(coefs, g) for g in graphs])
  latency = np.array([float(m["latency_ms"]) for m in measurements])
  scales = fit_scales(splits, latency, mode == "single")
  predicted = splits @ scales

  energies = [m.get("energy_uj") for m in measurements]
  if all(e is not None for e in energies):
    active_mw = float(np.mean(np.array(energies, float) / latency))
    power_source = (f"measured: mean of energy / latency over the MLPerf Tiny rows "
                    f"({', '.join(m['benchmark'] for m in measurements)}), {active_mw:.2f} mW")
  else:
    active_mw = platform.active_mw
    power_source = platform.sources["active_mw"]

  reproduction = []
  for m, g, p in zip(measurements, graphs, predicted):
    entry = dict(benchmark=m["benchmark"], model=m["model"], measured_latency_ms=float(m["latency_ms"]),
                 predicted_latency_ms=round(float(p), 4),
                 latency_error_pct=round(100 * (p / float(m["latency_ms"]) - 1), 2))
    if m.get("energy_uj") is not None:
      entry.update(measured_energy_uj=float(m["energy_uj"]), predicted_energy_uj=round(float(p * active_mw), 2),
                   energy_error_pct=round(100 * (p * active_mw / float(m["energy_uj"]) - 1), 2))
    reproduction.append(entry)
  leave_one_out = []
  if len(measurements) > 1:
    for i, m in enumerate(measurements):
      rest = [j for j in range(len(measurements)) if j != i]
      s = fit_scales(splits[rest], latency[rest], single=True)
      p = float(splits[i] @ s)
      leave_one_out.append(dict(benchmark=m["benchmark"], predicted_latency_ms=round(p, 4),
                                latency_error_pct=round(100 * (p / latency[i] - 1), 2)))
  cal.update(scale_compute=float(f"{scales[0]:.6g}"), scale_overhead=float(f"{scales[1]:.6g}"),
             host_profile=host.name, reproduction=reproduction, leave_one_out_single_scale=leave_one_out)
  sources = dict(platform.sources, active_mw=power_source)
  calibrated = dataclasses.replace(platform, active_mw=round(active_mw, 4), sources=sources, calibration=cal)
  return calibrated, calibrated_rows(host, calibrated, scales, active_mw)


def calibrated_rows(host: platform_lib.Platform, platform: platform_lib.Platform, scales: np.ndarray,
                    active_mw: float) -> list[lut_lib.LutRow]:
  """The host table's configurations at the board's cost: each measured host row rescaled by the calibrated
  compute/overhead scales in the proportion the host regressor splits that configuration."""
  coefs = host.coefficients("latency_ms")
  source = (f"calibrated: host row x scales (compute {scales[0]:.4g}, overhead {scales[1]:.4g}) fitted to "
            f"MLPerf Tiny measurements of {platform.name}; energy = latency x {active_mw:.4g} mW")
  rows = []
  for r in lut_lib.load_lut(host.lut_path):
    c, o = split_cost(coefs, r.op, r.kernel, features_lib.cost_features(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel,
                                                              r.stride))
    factor = (scales[0] * c + scales[1] * o) / (c + o) if c + o > 0 else scales[1]
    latency = r.latency_ms_mean * factor
    rows.append(dataclasses.replace(r, latency_ms_mean=latency, latency_ms_std=r.latency_ms_std * factor,
                                    energy_uj=latency * active_mw, source=source))
  return rows


# ----------------------------------------------------------------------------------------------------------
# Platforms with an emulated target: the table comes from the target's own instruction and access counts.


def whole_model_counts(model_path: str, target: str, build_dir: str, log=print) -> dict:
  """{instructions, flash_reads, ...} per inference of a measured model on `target` (two seeded inputs; the
  counts of int8 kernels barely depend on the data, and the runner checks them against the host)."""
  import tempfile
  from edgenas.device import runner as device_runner
  with open(model_path, "rb") as f:
    flatbuffer = f.read()
  from edgenas.export import verify
  shape = tuple(int(d) for d in verify.TflmRunner(flatbuffer).input["shape"][1:])
  inputs = np.random.default_rng(0).integers(-128, 128, size=(2,) + shape, dtype=np.int8)
  result = device_runner.run_on_target(flatbuffer, target, inputs, build_dir or tempfile.mkdtemp(),
                                       model_name=os.path.basename(model_path), mem=True, log=log)
  if not result["matches_host"]:
    raise EnergyModelError(f"{model_path} on {target}: the device outputs differ from the host's; the counts "
                           "of a miscompiled program cannot calibrate anything")
  acc = result["data_accesses_per_inference"]
  operators = [dict(op=o["op"], classes=o["classes"], flash_reads=o["flash_reads"]) for o in result["operators"]]
  return dict(target=target, instructions=result["instructions_per_inference"], flash_reads=acc["flash_reads"],
              ram_reads=acc["ram_reads"], ram_writes=acc["ram_writes"],
              classes=result["instruction_classes_per_inference"],
              tflm_commit=result["toolchain"]["tflm_commit"], compiler=result["toolchain"]["compiler"],
              operators=operators)


def whole_model_parts(model, graph: tflite_graph.TfliteGraph, emulated: dict) -> tuple[float, float, int]:
  """(cycles the scale multiplies, flash read cycles, accelerated operators) of a measured model: its emulated
  whole-inference counts, with each operator the board's accelerator runs priced by the accelerator's model
  instead of by its own counts (the interpreter's work between operators stays on the core)."""
  scaled = model.core_cycles(emulated["classes"])
  fixed = float(model.memory_cycles(emulated["flash_reads"]))
  if model.accelerator is None:
    return scaled, fixed, 0
  ops = emulated.get("operators") or []
  if len(ops) != len(graph.ops) or any(o["op"].lower() != g.spec.op for o, g in zip(ops, graph.ops)):
    raise EnergyModelError(f"{graph.path}: the device's operators ({[o['op'] for o in ops]}) do not match the "
                           "file's; cannot price them one by one")
  accelerated = 0
  for g, o in zip(graph.ops, ops):
    geom = accelerator_lib.of_graph_op(g)
    if model.accelerated(geom):
      scaled += model.accelerator.cycles(geom) - model.core_cycles(o["classes"])
      fixed -= float(model.memory_cycles(o["flash_reads"]))
      accelerated += 1
  return scaled, fixed, accelerated


def fit_accelerator(platform: platform_lib.Platform, log=print) -> tuple[dict, "accelerator_lib.MvpModel"]:
  """The profile's `cycle_model.accelerator` section with its model fitted to the measured layers it names
  (`layers`, beside the profile), leaving out the models listed in `held_out`, and its fit report."""
  section = dict(platform.cycle_model["accelerator"])
  where = f"{platform.path}: field 'cycle_model.accelerator"
  layers_file = section.get("layers")
  if not isinstance(layers_file, str) or not layers_file:
    raise EnergyModelError(f"{where}.layers' must name the measured layers file")
  held_out = section.get("held_out", [])
  if not isinstance(held_out, list) or not all(isinstance(m, str) for m in held_out):
    raise EnergyModelError(f"{where}.held_out' must be a list of model names")
  layers = accelerator_lib.load_layers(os.path.join(os.path.dirname(platform.path), layers_file))
  clock = float(section.get("clock_mhz", platform.clock_mhz))
  mvp = accelerator_lib.fit([l for l in layers if l.model not in held_out], clock)
  report = accelerator_lib.fit_report(mvp, layers, clock, held_out)
  for r, q in report["per_regime"].items():
    log(f"accelerator {r}: {q['layers']} layers, accelerator cycles MAPE {q['acc_mape_pct']}%, CPU cycles "
        f"{q['cpu_mape_pct']}%, layer time {q['time_mape_pct']}% ({q['timed_layers']} timed)")
  for name, h in report["held_out_models"].items():
    log(f"accelerator, held out: {name}: {h['predicted_ms']} ms predicted vs {h['measured_ms']} ms measured "
        f"({h['error_pct']:+.1f}%)")
  section.update(model=mvp.to_dict(), fit_quality=report)
  return section, mvp


def calibrate_emulated(platform: platform_lib.Platform, build_dir: str | None = None,
                       log=print) -> tuple[platform_lib.Platform, list[lut_lib.LutRow]]:
  """The platform with its cycle model's scale fitted to its measurements, and its LUT rows priced from the
  counts table of its target (`edgenas.energy.counts`) with its cycle model (`edgenas.energy.cycles`).

  The calibration report holds, per measured model: its emulated counts, the cycles measured and predicted, and
  the leave-one-out errors of latency and energy (each model predicted from the scale and the power fitted on the
  other models)."""
  from edgenas.energy import counts as counts_lib
  from edgenas.energy import cycles as cycles_lib

  where = f"{platform.path}: field"
  if not platform.target:
    raise EnergyModelError(f"{where} 'target' is missing; an emulated calibration needs the platform's core")
  cal = dict(platform.calibration)
  measurements = cal.get("measurements")
  if not measurements:
    raise EnergyModelError(f"{where} 'calibration.measurements' is empty; a calibrated platform needs measured "
                           "models")
  model = cycles_lib.from_profile(platform.cycle_model, platform.path)
  accelerator_section = None
  if "accelerator" in platform.cycle_model:
    accelerator_section, mvp = fit_accelerator(platform, log)
    model = dataclasses.replace(model, accelerator=mvp)
  clock_khz = platform.clock_mhz * 1e3
  emulated = [whole_model_counts(reference_model_path(m["model"]), platform.target, build_dir, log)
              for m in measurements]
  graphs = [tflite_graph.read_tflite(reference_model_path(m["model"])) for m in measurements]
  parts = [whole_model_parts(model, g, e) for g, e in zip(graphs, emulated)]
  scaled = [p[0] for p in parts]
  fixed = [p[1] for p in parts]
  measured_cycles = [float(m["latency_ms"]) * clock_khz for m in measurements]
  scale = cycles_lib.fit_scale_parts(scaled, fixed, measured_cycles)
  model = dataclasses.replace(model, scale=scale)

  energies = [m.get("energy_uj") for m in measurements]
  measured_power = all(e is not None for e in energies)
  powers = [float(e) / float(m["latency_ms"]) for e, m in zip(energies, measurements)] if measured_power else []
  active_mw = float(np.mean(powers)) if measured_power else platform.active_mw
  loo_scales = cycles_lib.leave_one_out_scales(scaled, fixed, measured_cycles) if len(measurements) > 1 else []
  loo_latency = [100 * ((s * scaled[k] + fixed[k]) / measured_cycles[k] - 1) for k, s in enumerate(loo_scales)]
  reproduction = []
  for k, (m, e) in enumerate(zip(measurements, emulated)):
    predicted = scale * scaled[k] + fixed[k]
    e = {key: v for key, v in e.items() if key != "operators"}
    entry = dict(benchmark=m["benchmark"], model=m["model"], emulated=e, measured_cycles=measured_cycles[k],
                 core_cycles=round(model.core_cycles(e["classes"])),
                 predicted_cycles=round(predicted), measured_latency_ms=float(m["latency_ms"]),
                 predicted_latency_ms=round(predicted / clock_khz, 4),
                 latency_error_pct=round(100 * (predicted / measured_cycles[k] - 1), 2),
                 memory_cycles_share=round(fixed[k] / predicted, 4))
    if model.accelerator is not None:
      unscaled = scaled[k] + fixed[k]  # no constant fitted to these measurements at all
      entry.update(accelerated_operators=parts[k][2], accelerator_and_core_cycles=round(scaled[k]),
                   unfitted_latency_ms=round(unscaled / clock_khz, 4),
                   unfitted_latency_error_pct=round(100 * (unscaled / measured_cycles[k] - 1), 2))
    if loo_latency:
      entry["leave_one_out_latency_error_pct"] = round(loo_latency[k], 2)
      if measured_power:
        others = [p for j, p in enumerate(powers) if j != k]
        loo_energy = (1 + loo_latency[k] / 100) * float(m["latency_ms"]) * float(np.mean(others))
        entry["leave_one_out_energy_error_pct"] = round(100 * (loo_energy / float(m["energy_uj"]) - 1), 2)
    reproduction.append(entry)
  count_rows = counts_lib.load_counts(counts_lib.counts_path(platform.target))
  if len(measurements) > 1:
    # The path the search and launch.estimate take: the table priced with the scale fitted on the other models,
    # the regressor fitted on that table, the model's operators priced by the regressor.
    for k, (m, entry) in enumerate(zip(measurements, reproduction)):
      rest = [j for j in range(len(measurements)) if j != k]
      loo = dataclasses.replace(model, scale=loo_scales[k])
      rows = emulated_rows(count_rows, platform, loo, active_mw)
      core_table, on_core = None, [False] * len(rows)
      if loo.accelerator is not None:  # the regressor prices core-run layers with coefficients of their own
        core_table = regressor_lib.core_table(platform, loo, active_mw)
        on_core = [not loo.accelerated(accelerator_lib.geometry(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel,
                                                                r.stride)) for r in rows]
      coefs = regressor_lib.fit_table(rows, on_core, core_table, "latency_ms")
      graph = tflite_graph.read_tflite(reference_model_path(m["model"]))
      predicted_ms = sum(float(np.dot(regressor_lib.lookup(
          coefs, o.spec.op, o.spec.kernel,
          loo.accelerator is not None and not loo.accelerated(accelerator_lib.of_graph_op(o))), o.features()))
                         for o in graph.ops)
      entry["leave_one_out_regressor_latency_ms"] = round(predicted_ms, 3)
      entry["leave_one_out_regressor_latency_error_pct"] = round(100 * (predicted_ms / float(m["latency_ms"]) - 1), 2)
      if measured_power:
        power = float(np.mean([powers[j] for j in rest]))
        entry["leave_one_out_regressor_energy_error_pct"] = round(
            100 * (predicted_ms * power / float(m["energy_uj"]) - 1), 2)
  cal.update(method="emulated class counts x core timing x fitted scale", scale=round(scale, 6),
             target=platform.target, core_timing=model.core_timing, reproduction=reproduction)
  for stale in ("scale_compute", "scale_overhead", "host_profile", "leave_one_out_single_scale", "cpi"):
    cal.pop(stale, None)
  power_source = (f"measured: mean of energy / latency over the MLPerf Tiny rows "
                  f"({', '.join(m['benchmark'] for m in measurements)}), {active_mw:.2f} mW" if measured_power
                  else platform.sources["active_mw"])
  cycle_model = dict(platform.cycle_model, scale=round(scale, 6))
  cycle_model.pop("cpi", None)
  if accelerator_section is not None:
    cycle_model["accelerator"] = accelerator_section
  priced = f"the {platform.target} class counts priced with the {model.core_timing} timing" + (
      f", the layers the accelerator runs priced by its model ({accelerator_section['kind']})"
      if accelerator_section is not None else "")
  sources = dict(cycle_model.get("sources", {}), scale=(
      f"fitted: least squares on the relative error of the MLPerf Tiny latencies "
      f"({', '.join(m['benchmark'] for m in measurements)}) against {priced}"))
  sources.pop("cpi", None)
  cycle_model["sources"] = sources
  sources = dict(platform.sources, active_mw=power_source, lut=(
      f"emulated: counts_{platform.target}.csv priced with this profile's cycle_model (core timing "
      f"{model.core_timing}, scale fitted to the calibration measurements)"))
  calibrated = dataclasses.replace(platform, active_mw=round(active_mw, 4), sources=sources, calibration=cal,
                                   cycle_model=cycle_model)
  return calibrated, emulated_rows(count_rows, calibrated, model, active_mw)


def emulated_rows(count_rows, platform: platform_lib.Platform, model, active_mw: float) -> list[lut_lib.LutRow]:
  """LUT rows: each counted configuration at cycles = scale · core-timing cycles of its instruction classes +
  flash read cycles · flash reads."""
  clock_khz = platform.clock_mhz * 1e3
  source = (f"emulated on {platform.target}: cycles = {model.scale:.4g} x {model.core_timing} timing of the "
            f"executed instruction classes + {model.flash_read_cycles:.4g} x flash reads at "
            f"{platform.clock_mhz:g} MHz; energy = latency x {active_mw:.4g} mW")
  rows = []
  for r in count_rows:
    geom = accelerator_lib.geometry(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride)
    latency = float(model.op_cycles(geom, r.classes, r.flash_reads)) / clock_khz
    row_source = source
    if model.accelerated(geom):
      row_source = (f"emulated on {platform.target}, run by the accelerator: cycles = {model.scale:.4g} x its "
                    f"model fitted to the board's measured layers ({accelerator_lib.regime(geom)}) at "
                    f"{platform.clock_mhz:g} MHz; energy = latency x {active_mw:.4g} mW")
    rows.append(lut_lib.LutRow(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride, r.groups, latency, 0.0,
                               1, latency * active_mw, row_source))
  return rows
