"""Per-operator instruction and memory-access counts on an emulated target (the instrument behind MCU tables).

One CSV per target (`platforms/counts_<target>.csv`), written by `python -m launch.profile --backend=emulate
--target=<t>`:

    #edgenas-counts version=2
    op,in_h,in_w,in_c,out_c,kernel,stride,groups,instructions,flash_reads,ram_reads,ram_writes,arena_used_bytes,
    n_alu,n_mul,...,n_pc_loads,source

The `n_<class>` columns are the executed instructions per class and the events the plugin counts
(`edgenas.energy.timing.COUNTERS`); a core timing prices them.

Counts belong to an instruction set and its kernels (CMSIS-NN on Cortex-M, TFLM's reference kernels on RV32),
not to a board: every platform built on that target prices the same counts with its own cycle model
(`edgenas.energy.cycles`). A row with a negative, NaN or non-integer count is refused, naming the file and line.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Iterable

from edgenas import ops as ops_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy import timing as timing_lib
from edgenas.energy.errors import EnergyModelError

COUNTS_VERSION = 2
VERSION_LINE = f"#edgenas-counts version={COUNTS_VERSION}"
GEOMETRY = ("in_h", "in_w", "in_c", "out_c", "kernel", "stride", "groups")
COUNTS = ("instructions", "flash_reads", "ram_reads", "ram_writes", "arena_used_bytes")
CLASS_COLUMNS = tuple(f"n_{c}" for c in timing_lib.COUNTERS)
COLUMNS = ("op",) + GEOMETRY + COUNTS + CLASS_COLUMNS + ("source",)


@dataclasses.dataclass(frozen=True)
class CountRow:
  op: str
  in_h: int
  in_w: int
  in_c: int
  out_c: int
  kernel: int
  stride: int
  groups: int
  instructions: int
  flash_reads: int
  ram_reads: int
  ram_writes: int
  arena_used_bytes: int
  source: str
  classes: dict = dataclasses.field(default_factory=dict)  # counter -> count (timing_lib.COUNTERS)

  def spec(self) -> ops_lib.OpSpec:
    return ops_lib.OpSpec(self.op, self.in_h, self.in_w, self.in_c, self.out_c, self.kernel, self.stride)


def counts_path(target: str) -> str:
  return os.path.join(platform_lib.PLATFORMS_DIR, f"counts_{target}.csv")


def load_counts(path: str) -> list[CountRow]:
  try:
    with open(path, newline="") as f:
      text = f.read()
  except FileNotFoundError:
    raise EnergyModelError(f"{path}: no such counts table; make it with python -m launch.profile "
                           "--backend=emulate --target=<target>") from None
  lines = text.splitlines()
  if not lines or lines[0].strip() != VERSION_LINE:
    raise EnergyModelError(f"{path}: line 1 must be '{VERSION_LINE}', got {(lines[0] if lines else '')!r}")
  reader = csv.DictReader(io.StringIO("\n".join(lines[1:])))
  missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    raise EnergyModelError(f"{path}: missing column(s) {', '.join(missing)}")
  rows = []
  for number, raw in enumerate(reader, start=3):
    where = f"{path}: line {number}"
    op = (raw.get("op") or "").strip()
    if op not in ops_lib.OP_TYPES:
      raise EnergyModelError(f"{where}: field 'op' is {op!r}; expected one of {', '.join(ops_lib.OP_TYPES)}")
    values = {}
    for name in GEOMETRY + COUNTS + CLASS_COLUMNS:
      text_value = (raw.get(name) or "").strip()
      try:
        values[name] = int(text_value)
      except ValueError:
        raise EnergyModelError(f"{where}: field '{name}' must be an integer count, got {text_value!r}") from None
      if values[name] < (1 if name in GEOMETRY else 0):
        raise EnergyModelError(f"{where}: field '{name}' must be {'positive' if name in GEOMETRY else '>= 0'}, "
                               f"got {values[name]}")
    if not (raw.get("source") or "").strip():
      raise EnergyModelError(f"{where}: field 'source' is empty; every figure needs its provenance")
    classes = {c: values.pop(f"n_{c}") for c in timing_lib.COUNTERS}
    if sum(classes[c] for c in timing_lib.INSTRUCTION_CLASSES) != values["instructions"]:
      raise EnergyModelError(f"{where}: the class counts do not sum to the instruction count "
                             f"{values['instructions']}")
    rows.append(CountRow(op=op, source=raw["source"].strip(), classes=classes, **values))
  if not rows:
    raise EnergyModelError(f"{path}: the table has no rows")
  return rows


def save_counts(rows: Iterable[CountRow], path: str) -> None:
  """Written beside `path` and moved into place only when complete: a failed run leaves the old table."""
  buf = io.StringIO()
  buf.write(VERSION_LINE + "\n")
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(COLUMNS)
  for r in rows:
    writer.writerow([r.classes[c[2:]] if c in CLASS_COLUMNS else getattr(r, c) for c in COLUMNS])
  tmp = f"{path}.partial"
  with open(tmp, "w", newline="") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)
