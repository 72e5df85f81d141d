"""Operating points: the clock / core-voltage choices of a platform, and a network priced at each.

A profile's `operating_points` (validated by `edgenas.energy.platform`) list, per point, the clock, the core
voltage (range or scale as the datasheet names it), the flash wait states the clock needs in that range and the
active power there, each figure with its source. The profile's own clock, wait states and active power are one
of them: the nominal point, where the cost model was calibrated.

Cycles at the nominal point split into the flash term of `edgenas.energy.cycles` and the rest:

    cycles_nominal = compute + ws_nominal · miss · flash_reads
    cycles(point)  = compute + ws_point · miss · flash_reads      (compute cycles do not change with the clock)
    latency        = cycles(point) / clock(point),   energy = latency · active_mw(point)

so a lower clock pays fewer wait states per flash read but draws its active power, whose constant part does not
shrink with the clock, for longer. `choose` picks the point of least solution power that meets a deadline.
Everything here is plain numpy: `price` takes scalars or arrays (per operator).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import numpy as np

from edgenas.energy import platform as platform_lib
from edgenas.energy.errors import EnergyModelError


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  name: str
  clock_mhz: float
  voltage_v: float | None  # core voltage; None where the profile lists no points (the nominal point alone)
  flash_wait_states: int
  active_mw: float
  voltage_range: str = ""  # the datasheet's name for the range / scale, e.g. "Range 1 boost", "VOS0"
  nominal: bool = False  # the profile's own clock, wait states and active power
  sources: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _nominal_ws(platform: platform_lib.Platform) -> int:
  return int(round(float(platform.cycle_model.get("flash_wait_states", 0))))


def _miss_fraction(platform: platform_lib.Platform) -> float:
  return float(platform.cycle_model.get("flash_miss_fraction", 0.0))


def _is_nominal(platform: platform_lib.Platform, p: Mapping) -> bool:
  return platform_lib.is_nominal_point(p, platform.clock_mhz, _nominal_ws(platform), platform.active_mw)


def points(platform: platform_lib.Platform) -> list[OperatingPoint]:
  """The profile's operating points in its order; the nominal point alone when it lists none."""
  if platform.operating_points:
    return [OperatingPoint(name=p["name"], clock_mhz=float(p["clock_mhz"]), voltage_v=float(p["voltage_v"]),
                           flash_wait_states=int(p["flash_wait_states"]), active_mw=float(p["active_mw"]),
                           voltage_range=str(p.get("voltage_range", "")), nominal=_is_nominal(platform, p),
                           sources=dict(p["sources"]))
            for p in platform.operating_points]
  ws_source = platform.cycle_model.get("sources", {}).get("flash_wait_states", "no cycle model: no flash term")
  return [OperatingPoint(name="nominal", clock_mhz=platform.clock_mhz, voltage_v=None,
                         flash_wait_states=_nominal_ws(platform), active_mw=platform.active_mw, nominal=True,
                         sources=dict(clock_mhz=platform.sources["clock_mhz"], voltage_v="not given in the profile",
                                      flash_wait_states=ws_source, active_mw=platform.sources["active_mw"]))]


def nominal_point(platform: platform_lib.Platform) -> OperatingPoint:
  return next(p for p in points(platform) if p.nominal)


def _out(x: np.ndarray):
  return float(x) if np.ndim(x) == 0 else x


def price(platform: platform_lib.Platform, point: OperatingPoint, cycles_nominal, flash_reads,
          energy_nominal=None) -> dict:
  """{latency_ms, energy_uj, cycles} at `point` of work that takes `cycles_nominal` cycles at the nominal point
  with `flash_reads` flash data reads (scalars, or arrays e.g. per operator).

  `energy_nominal` (optional, µJ): the estimate's energy at the nominal point. The energy regressor is fitted
  apart from the latency one, so its figure differs from latency x active power by the rounding of the
  coefficients (~1e-5); given, every point's energy takes the same factor and the nominal one is reproduced.
  """
  nominal = np.asarray(cycles_nominal, np.float64)
  miss, ws_nominal = _miss_fraction(platform), _nominal_ws(platform)
  if point.flash_wait_states == ws_nominal:  # the flash term is the nominal one: the cycles are exactly those
    cycles = nominal
  else:
    if flash_reads is None:
      raise EnergyModelError(f"platform {platform.name}: pricing operating point {point.name!r} needs flash reads "
                             f"per operator, which the profile has no regressor for; refit it (python -m "
                             f"launch.profile --backend=fit --platform={platform.name})")
    reads = np.asarray(flash_reads, np.float64)
    compute = nominal - ws_nominal * miss * reads
    # The two regressors are fitted apart: a flash term above the cycles is rounding, not negative compute.
    cycles = np.maximum(compute, 0.0) + point.flash_wait_states * miss * reads
  latency = cycles / (point.clock_mhz * 1e3)
  energy = latency * point.active_mw
  if energy_nominal is not None:
    at_nominal = nominal / (platform.clock_mhz * 1e3) * platform.active_mw
    factor = np.divide(np.asarray(energy_nominal, np.float64), at_nominal, out=np.ones_like(at_nominal),
                       where=at_nominal > 0)
    energy = energy * factor
  return dict(latency_ms=_out(latency), energy_uj=_out(energy), cycles=_out(cycles))


def _check_deadline(deadline_ms) -> float:
  if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not math.isfinite(deadline_ms) \
      or deadline_ms <= 0:
    raise EnergyModelError(f"the deadline must be a finite number of milliseconds > 0, got {deadline_ms!r}")
  return float(deadline_ms)


def choose(platform: platform_lib.Platform, candidates_fn: Callable[[OperatingPoint], tuple[float, float]],
           deadline_ms: float) -> tuple[OperatingPoint, list[dict]]:
  """The point of least solution power among those meeting the deadline, and the table of every point.

  `candidates_fn(point) -> (latency_ms, solution_power_mw)`: what runs at that point (one network, a cascade...);
  an infinite power marks a point that cannot keep up. Raises, naming the fastest point, when none meets it.
  """
  deadline = _check_deadline(deadline_ms)
  candidates = points(platform)
  table = []
  for p in candidates:
    latency, power = (float(v) for v in candidates_fn(p))
    table.append(dict(point=p.name, clock_mhz=p.clock_mhz, voltage_v=p.voltage_v, voltage_range=p.voltage_range,
                      flash_wait_states=p.flash_wait_states, active_mw=p.active_mw, latency_ms=latency,
                      solution_power_mw=power, meets_deadline=bool(latency <= deadline and math.isfinite(power))))
  ok = [r for r in table if r["meets_deadline"]]
  if not ok:
    fastest = min(table, key=lambda r: r["latency_ms"])
    where = (f"the fastest, {fastest['point']} ({fastest['clock_mhz']:g} MHz), takes "
             f"{fastest['latency_ms']:.4g} ms")
    if fastest["latency_ms"] <= deadline:
      raise EnergyModelError(f"platform {platform.name}: no operating point both meets the deadline of "
                             f"{deadline:g} ms and keeps up with the work (duty cycle above 1); {where}")
    raise EnergyModelError(f"platform {platform.name}: no operating point meets the deadline of {deadline:g} ms; "
                           f"{where}")
  best = min(ok, key=lambda r: r["solution_power_mw"])
  return next(p for p in candidates if p.name == best["point"]), table


def best_for_report(platform: platform_lib.Platform, report: Mapping, rate_hz: float,
                    deadline_ms: float | None = None) -> dict:
  """One network's estimate report (`edgenas.energy.estimate`) at every point, run `rate_hz` times a second:
  solution power P = P_static + rate x E(point); the deadline defaults to the frame period 1 / rate."""
  if isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, float)) or not math.isfinite(rate_hz) or rate_hz <= 0:
    raise EnergyModelError(f"pricing operating points needs an inference rate > 0 per second, got {rate_hz!r}")
  deadline = _check_deadline(1e3 / rate_hz if deadline_ms is None else deadline_ms)
  priced = {p.name: price(platform, p, report["cycles"], report.get("flash_reads"), report["energy_uj"])
            for p in points(platform)}

  def at_point(p: OperatingPoint):
    latency, energy = priced[p.name]["latency_ms"], priced[p.name]["energy_uj"]
    if rate_hz * latency / 1e3 > 1:  # cannot run rate_hz inferences a second at this clock
      return latency, math.inf
    return latency, platform.static_mw + rate_hz * energy / 1e3

  chosen, table = choose(platform, at_point, deadline)
  for row in table:
    row.update(energy_uj=priced[row["point"]]["energy_uj"], cycles=priced[row["point"]]["cycles"],
               duty_cycle=rate_hz * row["latency_ms"] / 1e3)
    if not math.isfinite(row["solution_power_mw"]):  # JSON has no infinity; the duty cycle says why
      row["solution_power_mw"] = None
  return dict(rate_hz=float(rate_hz), deadline_ms=deadline, static_mw=platform.static_mw,
              chosen=next(r for r in table if r["point"] == chosen.name), points=table)
