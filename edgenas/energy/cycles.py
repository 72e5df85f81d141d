"""A platform's cycle and energy model on top of its target's emulated counts.

    cycles  = cpi · instructions + flash_read_cycles · flash data reads
    latency = cycles / clock
    energy  = latency · active power

- `flash_read_cycles` is derived, not fitted: the flash wait states at the platform's clock (datasheet) times the
  fraction of data reads that miss the flash accelerator's or data cache's line and pay them
  (`flash_miss_fraction`: one line fetch per line of sequentially read weights). Each figure keeps its source in
  the profile's `cycle_model.sources`.
- `cpi` is the one constant fitted per board, to its MLPerf Tiny whole-model measurements (least squares on the
  relative error). It absorbs the pipeline (stalls, multi-cycle multiplies, branch penalties), and where the
  measured software differs from the emulated one (an older TFLM, another runtime) that difference too, which
  the calibration report states.

With two measured models per board and one fitted constant, leave-one-out is meaningful: each model is predicted
from the constant fitted on the other (`leave_one_out`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from edgenas.energy.errors import EnergyModelError


@dataclasses.dataclass(frozen=True)
class CycleModel:
  flash_wait_states: float
  flash_miss_fraction: float
  cpi: float | None = None  # None until fitted

  @property
  def flash_read_cycles(self) -> float:
    return self.flash_wait_states * self.flash_miss_fraction

  def memory_cycles(self, flash_reads) -> np.ndarray:
    return self.flash_read_cycles * np.asarray(flash_reads, np.float64)

  def cycles(self, instructions, flash_reads) -> np.ndarray:
    if self.cpi is None:
      raise EnergyModelError("cycle model: cpi is not fitted yet")
    return self.cpi * np.asarray(instructions, np.float64) + self.memory_cycles(flash_reads)


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
  sources = section.get("sources", {})
  for key in ("flash_wait_states", "flash_miss_fraction"):
    if not str(sources.get(key, "")).strip():
      raise EnergyModelError(f"{where}: field 'cycle_model.sources.{key}' is empty; every figure needs its "
                             "provenance")
  cpi = section.get("cpi")
  return CycleModel(values["flash_wait_states"], values["flash_miss_fraction"],
                    None if cpi is None else float(cpi))


def fit_cpi(model: CycleModel, instructions: Sequence[float], flash_reads: Sequence[float],
            measured_cycles: Sequence[float]) -> float:
  """The CPI minimising Σ (predicted / measured − 1)² over the measured models (closed form)."""
  i = np.asarray(instructions, np.float64)
  m = np.asarray(measured_cycles, np.float64)
  rest = m - model.memory_cycles(flash_reads)
  a = i / m
  cpi = float(np.sum(a * (rest / m)) / np.sum(a * a))
  if not np.isfinite(cpi) or cpi <= 0:
    raise EnergyModelError(f"cycle model: the measurements give no positive CPI (got {cpi})")
  return cpi


def leave_one_out(model: CycleModel, instructions, flash_reads, measured_cycles) -> list[float]:
  """Per model, the relative error (%) of its cycles predicted with the CPI fitted on the other models."""
  n = len(measured_cycles)
  errors = []
  for k in range(n):
    rest = [j for j in range(n) if j != k]
    cpi = fit_cpi(model, [instructions[j] for j in rest], [flash_reads[j] for j in rest],
                  [measured_cycles[j] for j in rest])
    predicted = dataclasses.replace(model, cpi=cpi).cycles(instructions[k], flash_reads[k])
    errors.append(float(100.0 * (predicted / measured_cycles[k] - 1.0)))
  return errors
