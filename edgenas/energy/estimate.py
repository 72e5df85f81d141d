"""Per-inference latency, energy, SRAM and flash of a network on a platform, with a per-operator breakdown.

`estimate_architecture(arch, platform)` prices an `Architecture` (arch.json); `estimate_tflite(path, platform)`
prices any int8 `.tflite` built from the operators of `edgenas.ops`. Both return a JSON-ready dict. Operators
whose features lie outside what the platform's table covers are flagged (`out_of_range`): the regressor
extrapolates there, and the report says so instead of trusting it silently.

Solution power of a duty-cycled device running `rate_hz` inferences per second: P = P_static + rate x E.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from edgenas import architecture as arch_lib
from edgenas import ops as ops_lib
from edgenas.energy import features as features_lib
from edgenas.energy import lut as lut_lib
from edgenas.energy import memory as memory_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy import regressor as regressor_lib
from edgenas.energy import tflite_graph
from edgenas.energy.errors import EnergyModelError

REPORT_VERSION = 1


@functools.lru_cache(maxsize=16)
def _table_ranges(lut_path: str) -> dict:
  rows = lut_lib.load_lut(lut_path)
  out: dict[str, dict[str, tuple[float, float]]] = {}
  for r in rows:
    f = features_lib.cost_features(r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride)
    vals = dict(macs=f[0], weight_bytes=f[1], activation_bytes=f[2], in_c=r.in_c, out_c=r.out_c)
    rng = out.setdefault(r.op, {})
    for k, v in vals.items():
      lo, hi = rng.get(k, (np.inf, -np.inf))
      rng[k] = (min(lo, v), max(hi, v))
  return out


def range_flags(platform: platform_lib.Platform, spec: ops_lib.OpSpec, feats: Sequence[float]) -> list[str]:
  """Human-readable reasons why this operator is outside the platform table's coverage (empty if inside)."""
  ranges = _table_ranges(platform.lut_path).get(spec.op)
  if ranges is None:
    return [f"{spec.op}: the table has no {spec.op} rows"]
  query = dict(macs=feats[0], weight_bytes=feats[1], activation_bytes=feats[2], in_c=spec.in_c, out_c=spec.out_c)
  flags = []
  for k, v in query.items():
    lo, hi = ranges[k]
    if v > hi or v < lo:
      flags.append(f"{k}={v:g} outside the table's {spec.op} range [{lo:g}, {hi:g}]")
  return flags


def _price(platform: platform_lib.Platform, specs: Sequence[ops_lib.OpSpec], feats: np.ndarray):
  """(latency ms, energy µJ) per operator, with the platform's JAX regressor (on a board with an accelerator,
  the coefficients of the core-run regimes for the layers the accelerator cannot run)."""
  on_core = regressor_lib.core_predicate(platform)
  flags = [bool(on_core(s.op, s.in_h, s.in_w, s.in_c, s.out_c, s.kernel, s.stride)) for s in specs]
  op_index = jnp.asarray([regressor_lib.regime_index(s.op, s.kernel, c) for s, c in zip(specs, flags)])
  out = []
  for quantity in ("latency_ms", "energy_uj"):
    coefs = platform.coefficients(quantity)
    missing = sorted({s.op + (features_lib.ON_CORE if c else "") for s, c in zip(specs, flags)} - set(coefs))
    if missing:
      raise EnergyModelError(f"platform {platform.name}: no cost coefficients for operator(s) {', '.join(missing)}")
    out.append(np.asarray(regressor_lib.predict(regressor_lib.coefficient_matrix(coefs), op_index,
                                                jnp.asarray(feats, jnp.float32)), np.float64))
  return out


def _counted(platform: platform_lib.Platform, specs, feats, quantity: str) -> np.ndarray | None:
  """Predicted instructions or flash data reads per operator on the platform's emulated target (None for the
  host, or a profile fitted before the quantity was)."""
  coefs = platform.regressor.get(quantity)
  if not coefs or any(s.op not in coefs for s in specs):
    return None
  op_index = jnp.asarray([regressor_lib.regime_index(s.op, s.kernel) for s in specs])
  matrix = regressor_lib.coefficient_matrix(platform.coefficients(quantity))
  return np.asarray(regressor_lib.predict(matrix, op_index, jnp.asarray(feats, jnp.float32)), np.float64)


def _report(platform, model_name, specs, feats, nominal_macs, memory, rate_hz, battery_mwh) -> dict:
  latency, energy = _price(platform, specs, feats)
  instructions = _counted(platform, specs, feats, "instructions")
  flash_reads = _counted(platform, specs, feats, "flash_reads")
  clock_khz = platform.clock_mhz * 1e3
  operators, flags = [], []
  for i, (s, f) in enumerate(zip(specs, feats)):
    op_flags = range_flags(platform, s, f)
    flags += [f"{s.layer or f'op[{i}]'}: {m}" for m in op_flags]
    operators.append(dict(index=i, layer=s.layer, op=s.op, input_hwc=[s.in_h, s.in_w, s.in_c], out_c=s.out_c,
                          kernel=s.kernel, stride=s.stride, macs=int(nominal_macs[i]),
                          executed_macs=float(f[0]), latency_ms=float(latency[i]), energy_uj=float(energy[i]),
                          cycles=float(latency[i] * clock_khz),
                          instructions=None if instructions is None else float(instructions[i]),
                          flash_reads=None if flash_reads is None else float(flash_reads[i]),
                          out_of_range=op_flags))
  total_latency, total_energy = float(latency.sum()), float(energy.sum())
  report = dict(
      version=REPORT_VERSION, platform=platform.name, model=model_name, latency_ms=total_latency,
      energy_uj=total_energy, cycles=total_latency * clock_khz,
      instructions=None if instructions is None else float(instructions.sum()),
      flash_reads=None if flash_reads is None else float(flash_reads.sum()),
      target=platform.target, macs=int(sum(nominal_macs)), peak_sram_bytes=int(memory["peak_sram_bytes"]),
      flash_bytes=int(memory["flash_bytes"]), weight_bytes=int(memory["weight_bytes"]),
      graph_overhead_bytes=int(memory["graph_overhead_bytes"]), sram_budget_bytes=platform.sram_bytes,
      flash_budget_bytes=platform.flash_bytes, fits_sram=memory["peak_sram_bytes"] <= platform.sram_bytes,
      fits_flash=memory["flash_bytes"] <= platform.flash_bytes, out_of_range=flags, operators=operators,
      fit_quality={q: {k: platform.fit_quality.get(q, {}).get(k) for k in ("r2", "r2_log", "mape_pct")}
                   for q in platform_lib.QUANTITIES},
      note=("peak_sram_bytes is the largest live activation set; TFLM's arena also holds a few KB of its own "
            "structures"))
  if rate_hz is not None:
    report["power"] = solution_power(platform, total_latency, total_energy, rate_hz)
    if battery_mwh is not None:
      report["battery"] = battery_life(report["power"]["solution_power_mw"], battery_mwh)
  elif battery_mwh is not None:
    raise EnergyModelError("battery life needs an inference rate (rate_hz / --rate)")
  return report


def solution_power(platform: platform_lib.Platform, latency_ms: float, energy_uj: float, rate_hz: float) -> dict:
  """P = P_static + rate x E for `rate_hz` inferences per second; errors when the device cannot keep up."""
  if rate_hz < 0:
    raise EnergyModelError(f"inference rate must be >= 0, got {rate_hz}")
  duty = rate_hz * latency_ms / 1e3
  if duty > 1:
    raise EnergyModelError(f"{rate_hz:g} inferences/s need {duty:.2f} s of compute per second on "
                           f"{platform.name} ({latency_ms:.2f} ms each); the highest possible rate is "
                           f"{1e3 / latency_ms:.3g}/s")
  return dict(rate_hz=rate_hz, static_mw=platform.static_mw, duty_cycle=duty,
              solution_power_mw=platform.static_mw + rate_hz * energy_uj / 1e3)


def battery_life(power_mw: float, battery_mwh: float) -> dict:
  if battery_mwh <= 0:
    raise EnergyModelError(f"battery capacity must be positive, got {battery_mwh} mWh")
  hours = battery_mwh / power_mw if power_mw > 0 else float("inf")
  return dict(battery_mwh=battery_mwh, life_hours=hours, life_days=hours / 24)


def _platform(platform) -> platform_lib.Platform:
  return platform_lib.load_platform(platform) if isinstance(platform, str) else platform


def estimate_architecture(arch: arch_lib.Architecture, platform, rate_hz: float | None = None,
                          battery_mwh: float | None = None) -> dict:
  """Report for a derived network (see module docstring); `platform` is a Platform or a name/path."""
  platform = _platform(platform)
  specs = arch.ops()
  feats = np.array([features_lib.cost_features(s.op, s.in_h, s.in_w, s.in_c, s.out_c, s.kernel, s.stride)
                    for s in specs], np.float64)
  macs = [ops_lib.op_features(s.op, s.in_h, s.in_w, s.in_c, s.out_c, s.kernel, s.stride)[0] for s in specs]
  return _report(platform, arch.name or f"arch:{arch.hash()}", specs, feats, macs,
                 memory_lib.architecture_memory(arch), rate_hz, battery_mwh)


def estimate_tflite(path: str, platform, rate_hz: float | None = None, battery_mwh: float | None = None) -> dict:
  """Report for an int8 .tflite file; errors name any operator the model cannot cost."""
  platform = _platform(platform)
  graph = tflite_graph.read_tflite(path)
  feats = np.array([o.features() for o in graph.ops], np.float64)
  memory = memory_lib.tflite_memory(graph)
  report = _report(platform, path, graph.op_specs(), feats, [o.macs for o in graph.ops], memory, rate_hz,
                   battery_mwh)
  if platform.target:
    from edgenas.device import memory as device_memory  # the device truth: arena and whole-program flash
    with open(path, "rb") as f:
      report["device_memory"] = device_memory.predict(f.read(), platform.target)
  return report
