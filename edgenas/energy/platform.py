"""Platform profiles: one JSON per target (core, clock, memories, power, runtime, its LUT and fitted regressor).

Every figure carries its provenance in `sources` (measured, datasheet, or an estimate and how it was made); the
loader refuses a profile whose figures have no source. Profiles shipped with edgenas live in
`edgenas/energy/platforms/<name>.json`, their tables in `<name>_lut.csv`; `platforms/README.md` documents them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from edgenas.energy import features as features_lib
from edgenas.energy.errors import EnergyModelError

PLATFORM_VERSION = 1
PLATFORMS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "platforms")
DEFAULT_PLATFORM = "stm32l4r5_tflm"
QUANTITIES = ("latency_ms", "energy_uj")
# Fitted only for platforms built on an emulated target: instructions and flash data reads per operator, from its
# counts table (flash reads price the wait states of another operating point: edgenas.energy.operating).
OPTIONAL_QUANTITIES = ("instructions", "flash_reads")
# Figures that must each name their source.
SOURCED_FIELDS = ("clock_mhz", "sram_bytes", "flash_bytes", "static_mw", "active_mw", "lut")
# Each operating point's figures, each with its own source (edgenas.energy.operating).
POINT_FIELDS = ("clock_mhz", "voltage_v", "flash_wait_states", "active_mw")


@dataclasses.dataclass(frozen=True)
class Platform:
  name: str
  description: str
  core: str
  isa: str
  clock_mhz: float
  sram_bytes: int
  flash_bytes: int
  static_mw: float  # drawn between inferences (the device's sleep mode)
  active_mw: float  # average while running inference
  runtime: str
  lut: str  # path as written in the profile (relative to the profile's directory)
  sources: Mapping[str, str]
  # {quantity: {op type: [coefficient per edgenas.energy.features.FEATURES]}}; empty until fitted
  regressor: Mapping[str, Mapping[str, list]]
  fit_quality: Mapping[str, Any]
  calibration: Mapping[str, Any]
  path: str = ""  # the profile file this was read from
  # The emulated core (edgenas.device.targets) whose instruction set and kernels this platform runs; None for
  # the host. Its per-operator counts are what the platform's lookup table is built from.
  target: str | None = None
  # edgenas.energy.cycles: {flash_wait_states, flash_miss_fraction, core_timing, scale, sources}; empty for the host
  cycle_model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Clock / core-voltage choices, as written in the profile (validated); edgenas.energy.operating reads them.
  operating_points: tuple = ()

  @property
  def lut_path(self) -> str:
    return self.lut if os.path.isabs(self.lut) else os.path.join(os.path.dirname(self.path), self.lut)

  def coefficients(self, quantity: str) -> dict[str, tuple[float, ...]]:
    """Fitted per-op-type coefficients for `quantity`; raises when the profile has none."""
    if quantity not in QUANTITIES + OPTIONAL_QUANTITIES:
      raise EnergyModelError(f"unknown quantity {quantity!r}; expected one of {', '.join(QUANTITIES)}")
    coefs = self.regressor.get(quantity)
    if not coefs:
      raise EnergyModelError(f"{self.path}: field 'regressor.{quantity}' is empty; fit the platform first "
                             f"(python -m launch.profile --backend=fit --platform={self.name})")
    return {op: tuple(float(c) for c in v) for op, v in coefs.items()}

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("path")
    for optional in ("target", "cycle_model", "operating_points"):
      if not d[optional]:
        d.pop(optional)
    if "operating_points" in d:
      d["operating_points"] = [dict(p) for p in self.operating_points]
    d["sources"] = dict(self.sources)
    return {"version": PLATFORM_VERSION, **d}


def list_platforms() -> list[str]:
  """Names of the profiles shipped with edgenas."""
  return sorted(f[:-5] for f in os.listdir(PLATFORMS_DIR) if f.endswith(".json"))


def platform_path(name_or_path: str) -> str:
  if name_or_path.endswith(".json") or os.sep in name_or_path:
    return name_or_path
  path = os.path.join(PLATFORMS_DIR, f"{name_or_path}.json")
  if not os.path.exists(path):
    raise EnergyModelError(f"unknown platform {name_or_path!r}; shipped platforms: {', '.join(list_platforms())} "
                           f"(or give the path of a profile .json)")
  return path


def load_platform(name_or_path: str = DEFAULT_PLATFORM) -> Platform:
  """A shipped platform by name (see `list_platforms()`), or a profile JSON by path."""
  path = platform_path(name_or_path)
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise EnergyModelError(f"{path}: no such platform profile") from None
  except json.JSONDecodeError as e:
    raise EnergyModelError(f"{path}: not valid JSON ({e})") from None
  return platform_from_dict(d, path)


def platform_from_dict(d: Mapping[str, Any], path: str = "<platform>") -> Platform:
  if not isinstance(d, Mapping):
    raise EnergyModelError(f"{path}: expected a JSON object")

  def need(key, kind):
    if key not in d:
      raise EnergyModelError(f"{path}: missing field '{key}'")
    v = d[key]
    if kind is float:
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise EnergyModelError(f"{path}: field '{key}' must be a finite number >= 0, got {v!r}")
      return float(v)
    if kind is int:
      if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise EnergyModelError(f"{path}: field '{key}' must be a positive integer, got {v!r}")
      return v
    if not isinstance(v, kind):
      raise EnergyModelError(f"{path}: field '{key}' must be a {kind.__name__}, got {type(v).__name__}")
    return v

  version = need("version", int)
  if version != PLATFORM_VERSION:
    raise EnergyModelError(f"{path}: unsupported 'version' {version}; this edgenas reads version {PLATFORM_VERSION}")
  sources = need("sources", dict)
  missing = [f for f in SOURCED_FIELDS if not str(sources.get(f, "")).strip()]
  if missing:
    raise EnergyModelError(f"{path}: field 'sources' gives no source for {', '.join(missing)}; every figure "
                           f"needs its provenance")
  regressor = d.get("regressor", {}) or {}
  for quantity, coefs in regressor.items():
    if quantity not in QUANTITIES + OPTIONAL_QUANTITIES:
      raise EnergyModelError(f"{path}: field 'regressor.{quantity}' is not a quantity; expected "
                             f"{', '.join(QUANTITIES + OPTIONAL_QUANTITIES)}")
    for op, v in coefs.items():
      where = f"{path}: field 'regressor.{quantity}.{op}'"
      if op not in features_lib.ALL_REGIMES:
        raise EnergyModelError(f"{where}: unknown operator; expected one of {', '.join(features_lib.ALL_REGIMES)}")
      if (not isinstance(v, list) or len(v) != len(features_lib.FEATURES) or
          not all(isinstance(c, (int, float)) and math.isfinite(c) and c >= 0 for c in v)):
        raise EnergyModelError(f"{where}: expected {len(features_lib.FEATURES)} non-negative coefficients "
                               f"({', '.join(features_lib.FEATURES)}), got {v!r}")
  clock = need("clock_mhz", float)
  if clock <= 0:
    raise EnergyModelError(f"{path}: field 'clock_mhz' must be positive, got {clock}")
  name, active_mw = need("name", str), need("active_mw", float)
  cycle_model = _cycle_model_field(d, path)
  return Platform(
      name=name, description=str(d.get("description", "")), core=need("core", str),
      isa=need("isa", str), clock_mhz=clock, sram_bytes=need("sram_bytes", int),
      flash_bytes=need("flash_bytes", int), static_mw=need("static_mw", float),
      active_mw=active_mw, runtime=need("runtime", str), lut=need("lut", str),
      sources=dict(sources), regressor=regressor, fit_quality=d.get("fit_quality", {}) or {},
      calibration=d.get("calibration", {}) or {}, path=path, target=_target_field(d, path),
      cycle_model=cycle_model,
      operating_points=_operating_points_field(d, path, name, clock, active_mw, cycle_model))


def _operating_points_field(d: Mapping[str, Any], path: str, name: str, clock: float, active_mw: float,
                            cycle_model: Mapping[str, Any]) -> tuple:
  """The optional `operating_points` list, every figure checked and sourced; one must be the nominal point."""
  points = d.get("operating_points")
  if points is None:
    return ()
  if not isinstance(points, list) or not points:
    raise EnergyModelError(f"{path}: field 'operating_points' must be a non-empty list of objects")
  seen = set()
  for i, point in enumerate(points):
    where = f"{path}: field 'operating_points[{i}]'"
    if not isinstance(point, Mapping):
      raise EnergyModelError(f"{where} must be an object")
    label = point.get("name")
    if not isinstance(label, str) or not label.strip():
      raise EnergyModelError(f"{where}.name must be a non-empty string, got {label!r}")
    if label in seen:
      raise EnergyModelError(f"{where}.name {label!r} is given twice; point names must be unique")
    seen.add(label)
    where = f"{path}: platform {name}, operating point {label!r}"
    for key in POINT_FIELDS:
      v = point.get(key)
      if key == "flash_wait_states":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
          raise EnergyModelError(f"{where}: field '{key}' must be an integer >= 0, got {v!r}")
      elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise EnergyModelError(f"{where}: field '{key}' must be a finite number > 0, got {v!r}")
    if "voltage_range" in point and not isinstance(point["voltage_range"], str):
      raise EnergyModelError(f"{where}: field 'voltage_range' must be a string, got {point['voltage_range']!r}")
    sources = point.get("sources")
    if not isinstance(sources, Mapping):
      raise EnergyModelError(f"{where}: field 'sources' is missing; every figure needs its provenance")
    for key in POINT_FIELDS:
      if not str(sources.get(key, "")).strip():
        raise EnergyModelError(f"{where}: no source for '{key}' (field 'sources.{key}'); every figure needs its "
                               "provenance")
  nominal_ws = cycle_model.get("flash_wait_states", 0)
  if not any(is_nominal_point(p, clock, nominal_ws, active_mw) for p in points):
    raise EnergyModelError(f"{path}: field 'operating_points' lacks the profile's nominal point (clock_mhz {clock:g}, "
                           f"cycle_model.flash_wait_states {nominal_ws:g}, active_mw {active_mw:g}); list it")
  return tuple(dict(p) for p in points)


def is_nominal_point(point: Mapping[str, Any], clock_mhz: float, flash_wait_states: float, active_mw: float) -> bool:
  """Whether an operating point is the profile's own clock, wait states and active power (where it was fitted)."""
  def close(a, b):
    return abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), abs(float(b)))
  return (close(point["clock_mhz"], clock_mhz) and int(point["flash_wait_states"]) == int(round(flash_wait_states))
          and close(point["active_mw"], active_mw))


def _cycle_model_field(d: Mapping[str, Any], path: str) -> dict:
  section = d.get("cycle_model") or {}
  if section:
    from edgenas.energy import cycles
    cycles.from_profile(section, path)  # validates, naming the field
  return dict(section)


def _target_field(d: Mapping[str, Any], path: str) -> str | None:
  target = d.get("target")
  if target is None:
    return None
  from edgenas.device import targets as targets_lib  # stdlib only: no toolchain is needed to read a profile
  if target not in targets_lib.TARGETS:
    raise EnergyModelError(f"{path}: field 'target' is {target!r}; expected one of {', '.join(targets_lib.TARGETS)}")
  return target


def save_platform(platform: Platform, path: str | None = None) -> None:
  """Writes atomically (a fit that crashes midway never leaves a broken profile)."""
  path = path or platform.path
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(platform.to_dict(), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
