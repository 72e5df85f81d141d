"""A platform's cycle and energy model on top of its target's emulated counts.

    cycles  = scale · Σ_class core cycles per class · executed instructions of that class
              + flash_read_cycles · flash data reads
    latency = cycles / clock
    energy  = latency · active power

- The per-class cycles are the core's timing (`edgenas.energy.timing`: Arm's cycle table for the Cortex-M4, the
  documented pipeline for the Cortex-M7, a scalar pipeline for RV32), applied to the instruction classes the
  emulator counted. They carry the relative operator costs, so a dual-issue core and a single-issue one running
  the same kernels get different tables.
- `flash_read_cycles` is derived, not fitted: the flash wait states at the platform's clock (datasheet) times the
  fraction of data reads that miss the flash accelerator's or data cache's line and pay them
  (`flash_miss_fraction`: one line fetch per line of sequentially read weights). Each figure keeps its source in
  the profile's `cycle_model.sources`.
- `scale` is the one constant fitted per board, to its MLPerf Tiny whole-model measurements (least squares on the
  relative error): measured cycles per modelled cycle. It absorbs what the timing leaves out (instruction fetch
  from flash, cache misses, misprediction), and where the measured software differs from the emulated one (an
  older TFLM, another runtime) that difference too, which the calibration report states.

With two measured models per board and one fitted constant, leave-one-out is meaningful: each model is predicted
from the constant fitted on the other (`leave_one_out`).

A board with an accelerator (`accelerator`: the EFR32MG24's MVP, `edgenas.energy.accelerator`) prices the layers
the accelerator runs with the accelerator's own model, fitted to that board's per-layer measurements, instead of
the core's counts; the scale then multiplies both (`op_cycles`) and is expected near 1.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from edgenas.energy import accelerator as accelerator_lib
from edgenas.energy import timing as timing_lib
from edgenas.energy.errors import EnergyModelError


@dataclasses.dataclass(frozen=True)
class CycleModel:
  flash_wait_states: float
  flash_miss_fraction: float
  core_timing: str
  scale: float | None = None  # None until fitted
  accelerator: "accelerator_lib.MvpModel | None" = None  # layers it runs are priced by it, not by the core

  @property
  def timing(self) -> timing_lib.CoreTiming:
    return timing_lib.get(self.core_timing)

  @property
  def flash_read_cycles(self) -> float:
    return self.flash_wait_states * self.flash_miss_fraction

  def memory_cycles(self, flash_reads) -> np.ndarray:
    return self.flash_read_cycles * np.asarray(flash_reads, np.float64)

  def core_cycles(self, classes: Mapping[str, float]) -> float:
    """The core timing's cycles for one set of class counts (before the fitted scale)."""
    return self.timing.modelled_cycles(classes)

  def cycles(self, classes: Mapping[str, float], flash_reads) -> float:
    if self.scale is None:
      raise EnergyModelError("cycle model: scale is not fitted yet")
    return float(self.scale * self.core_cycles(classes) + self.memory_cycles(flash_reads))

  def accelerated(self, geom: "accelerator_lib.Geometry | None") -> bool:
    return (self.accelerator is not None and geom is not None and geom.op in accelerator_lib.ACCELERATED_OPS
            and accelerator_lib.supported(geom))

  def op_parts(self, geom, classes: Mapping[str, float], flash_reads) -> tuple[float, float]:
    """(cycles the scale multiplies, flash read cycles) of one operator: the accelerator's model where it runs
    the layer (no core flash term: its cycles are measured ones), else the core timing of its counts."""
    if self.accelerated(geom):
      return self.accelerator.cycles(geom), 0.0
    return self.core_cycles(classes), float(self.memory_cycles(flash_reads))

  def op_cycles(self, geom, classes: Mapping[str, float], flash_reads) -> float:
    if self.scale is None:
      raise EnergyModelError("cycle model: scale is not fitted yet")
    scaled, fixed = self.op_parts(geom, classes, flash_reads)
    return float(self.scale * scaled + fixed)


def from_profile(section: Mapping, where: str) -> CycleModel:
  """The `cycle_model` section of a platform profile; raises naming the field that is missing or bad."""
  if not isinstance(section, Mapping):
    raise EnergyModelError(f"{where}: field 'cycle_model' must be an object")
  values = {}
  for key in ("flash_wait_states", "flash_miss_fraction"):
    v = section.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
      raise EnergyModelError(f"{where}: field 'cycle_model.{key}' must be a number >= 0, got {v!r}")
    values[key] = float(v)
  core = section.get("core_timing")
  if not isinstance(core, str) or core not in timing_lib.TIMINGS:
    raise EnergyModelError(f"{where}: field 'cycle_model.core_timing' must be one of "
                           f"{', '.join(sorted(timing_lib.TIMINGS))}, got {core!r}")
  sources = section.get("sources", {})
  for key in ("flash_wait_states", "flash_miss_fraction", "core_timing"):
    if not str(sources.get(key, "")).strip():
      raise EnergyModelError(f"{where}: field 'cycle_model.sources.{key}' is empty; every figure needs its "
                             "provenance")
  scale = section.get("scale")
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
    raise EnergyModelError(f"{where}: field 'cycle_model.scale' must be a number > 0, got {scale!r}")
  mvp = None
  acc = section.get("accelerator")
  if acc is not None:
    if not isinstance(acc, Mapping) or not str(acc.get("source", "")).strip():
      raise EnergyModelError(f"{where}: field 'cycle_model.accelerator' must be an object with its 'source'")
    if acc.get("model") is not None:  # absent until `launch.profile --backend=calibrate` fits it
      mvp = accelerator_lib.from_dict(acc["model"], f"{where}: field 'cycle_model.accelerator.model'")
  return CycleModel(values["flash_wait_states"], values["flash_miss_fraction"], core,
                    None if scale is None else float(scale), mvp)


def fit_scale(model: CycleModel, classes: Sequence[Mapping[str, float]], flash_reads: Sequence[float],
              measured_cycles: Sequence[float]) -> float:
  """The scale minimising Σ (predicted / measured − 1)² over the measured models (closed form)."""
  core = np.asarray([model.core_cycles(c) for c in classes], np.float64)
  return fit_scale_parts(core, model.memory_cycles(flash_reads), measured_cycles)


def fit_scale_parts(scaled: Sequence[float], fixed: Sequence[float], measured_cycles: Sequence[float]) -> float:
  """The scale s minimising Σ ((s · scaled + fixed) / measured − 1)² (closed form)."""
  core = np.asarray(scaled, np.float64)
  m = np.asarray(measured_cycles, np.float64)
  rest = m - np.asarray(fixed, np.float64)
  a = core / m
  scale = float(np.sum(a * (rest / m)) / np.sum(a * a))
  if not np.isfinite(scale) or scale <= 0:
    raise EnergyModelError(f"cycle model: the measurements give no positive scale (got {scale})")
  return scale


def leave_one_out_scales(scaled: Sequence[float], fixed: Sequence[float],
                         measured_cycles: Sequence[float]) -> list[float]:
  """Per model, the scale fitted (`fit_scale_parts`) on the other models alone."""
  n = len(measured_cycles)
  return [fit_scale_parts(*([v[j] for j in range(n) if j != k] for v in (scaled, fixed, measured_cycles)))
          for k in range(n)]


def leave_one_out(model: CycleModel, classes, flash_reads, measured_cycles) -> list[float]:
  """Per model, the relative error (%) of its cycles predicted with the scale fitted on the other models."""
  scaled = [model.core_cycles(c) for c in classes]
  fixed = [float(model.memory_cycles(f)) for f in flash_reads]
  scales = leave_one_out_scales(scaled, fixed, measured_cycles)
  return [float(100.0 * ((s * a + b) / m - 1.0)) for s, a, b, m in zip(scales, scaled, fixed, measured_cycles)]
