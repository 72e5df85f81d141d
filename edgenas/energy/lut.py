"""Per-operator lookup tables (LUT CSV): one row per measured (or calibrated) operator configuration.

The file starts with a version line, then a CSV header and rows:

    #edgenas-lut version=1
    op,in_h,in_w,in_c,out_c,kernel,stride,groups,latency_ms_mean,latency_ms_std,count,energy_uj,source

`groups` is 1 for a dense conv, `in_c` for a depthwise conv (the ProxylessNAS-style expansion/groups key).
`source` says where the row's figures came from (a measurement, or a calibrated model), so no figure is
anonymous.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Iterable

from edgenas import ops as ops_lib
from edgenas.energy.errors import EnergyModelError

LUT_VERSION = 1
VERSION_LINE = f"#edgenas-lut version={LUT_VERSION}"
INT_COLUMNS = ("in_h", "in_w", "in_c", "out_c", "kernel", "stride", "groups", "count")
COST_COLUMNS = ("latency_ms_mean", "latency_ms_std", "energy_uj")
COLUMNS = ("op", "in_h", "in_w", "in_c", "out_c", "kernel", "stride", "groups", "latency_ms_mean",
           "latency_ms_std", "count", "energy_uj", "source")


@dataclasses.dataclass(frozen=True)
class LutRow:
  op: str
  in_h: int
  in_w: int
  in_c: int
  out_c: int
  kernel: int
  stride: int
  groups: int
  latency_ms_mean: float
  latency_ms_std: float
  count: int
  energy_uj: float
  source: str

  def spec(self) -> ops_lib.OpSpec:
    return ops_lib.OpSpec(self.op, self.in_h, self.in_w, self.in_c, self.out_c, self.kernel, self.stride)


def load_lut(path: str) -> list[LutRow]:
  """Reads and validates a LUT CSV; raises EnergyModelError naming the file, row and field on bad input."""
  try:
    with open(path, newline="") as f:
      text = f.read()
  except FileNotFoundError:
    raise EnergyModelError(f"{path}: no such lookup table") from None
  return parse_lut(text, path)


def parse_lut(text: str, source: str = "<lut>") -> list[LutRow]:
  lines = text.splitlines()
  first = lines[0].strip() if lines else ""
  if not first.startswith("#edgenas-lut"):
    raise EnergyModelError(f"{source}: line 1 must be the version line '{VERSION_LINE}', got {first!r}")
  version = first.partition("version=")[2].strip()
  if version != str(LUT_VERSION):
    raise EnergyModelError(f"{source}: unsupported LUT version {version!r}; this edgenas reads version "
                           f"{LUT_VERSION}")
  reader = csv.DictReader(io.StringIO("\n".join(lines[1:])))
  missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    raise EnergyModelError(f"{source}: missing column(s) {', '.join(missing)}; expected columns "
                           f"{','.join(COLUMNS)}")
  # +3: the version line, the header, and 1-based numbering
  rows = [parse_row(raw, f"{source}: line {i + 3}") for i, raw in enumerate(reader)]
  if not rows:
    raise EnergyModelError(f"{source}: the table has no rows")
  return rows


def parse_row(raw: dict, where: str) -> LutRow:
  """One validated row from column -> text; `where` (file and line) prefixes every error."""
  op = (raw.get("op") or "").strip()
  if op not in ops_lib.OP_TYPES:
    raise EnergyModelError(f"{where}: field 'op' is {op!r}; expected one of {', '.join(ops_lib.OP_TYPES)}")
  values = {}
  for name in INT_COLUMNS:
    text = (raw.get(name) or "").strip()
    try:
      values[name] = int(text)
    except ValueError:
      raise EnergyModelError(f"{where}: field '{name}' must be an integer, got {text!r}") from None
    if values[name] < (0 if name == "count" else 1):
      raise EnergyModelError(f"{where}: field '{name}' must be positive, got {values[name]}")
  for name in COST_COLUMNS:
    text = (raw.get(name) or "").strip()
    try:
      values[name] = float(text)
    except ValueError:
      raise EnergyModelError(f"{where}: field '{name}' must be a number, got {text!r}") from None
    if math.isnan(values[name]) or math.isinf(values[name]) or values[name] < 0:
      raise EnergyModelError(f"{where}: field '{name}' must be a finite cost >= 0, got {text!r}")
  source_text = (raw.get("source") or "").strip()
  if not source_text:
    raise EnergyModelError(f"{where}: field 'source' is empty; every figure needs its provenance")
  return LutRow(op=op, source=source_text, **values)


def save_lut(rows: Iterable[LutRow], path: str) -> None:
  """Writes atomically, so an interrupted profiling run never leaves a truncated table."""
  buf = io.StringIO()
  buf.write(VERSION_LINE + "\n")
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(COLUMNS)
  for r in rows:
    writer.writerow([r.op, r.in_h, r.in_w, r.in_c, r.out_c, r.kernel, r.stride, r.groups,
                     f"{r.latency_ms_mean:.6g}", f"{r.latency_ms_std:.6g}", r.count, f"{r.energy_uj:.6g}",
                     r.source])
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)


def groups_of(op: str, in_c: int) -> int:
  return in_c if op == ops_lib.DEPTHWISE_CONV_2D else 1
