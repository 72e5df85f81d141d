"""The instruction-counting QEMU plugin (support/edgenas_icount.c): build it, pass it to QEMU, read its log.

The guest calls a marker function (a noinline `edgenas_marker()`) around each event it wants measured and
prints which event each call was; the plugin writes one `M <instructions before the marker> [<flash reads>
<ram reads> <ram writes>]` line per call and a `T <total> [...]` line when QEMU exits. The host pairs the n-th
mark with the n-th event the program printed: API version 1 plugins cannot read guest registers, so the
guest passes the plugin nothing.

  path = build_plugin()
  marker = symbol_address(elf, "edgenas_marker", nm=target.nm)
  flash, ram = memory_ranges(elf, nm=target.nm)
  cmd = [qemu, *qemu_args, "-kernel", elf, *plugin_args(path, marker, log, flash, ram, mem=True)]
  log = parse_log(log)  # log.marks[i].instructions, log.deltas(), log.total_instructions

With `classes=True` each mark also carries the executed instructions per class and a few events
(`Mark.classes`, names in `CLASS_COUNTERS`), which `edgenas.energy.timing` prices with a core's timings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile

from edgenas.device import errors

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "edgenas_icount.c")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "edgenas", "device")
CFLAGS = ("-shared", "-fPIC", "-O2", "-fvisibility=hidden")
_HOST_COMPILERS = ("cc", "gcc", "clang")
# What classes=on counts, in the plugin's order: exclusive instruction classes, then events on top of them.
INSTRUCTION_CLASSES = ("alu", "mul", "div", "load", "mem_pipelined", "store", "mem_pair", "mem_multi", "branch",
                       "cond_branch", "fp", "other")
EVENTS = ("multi_regs", "cond_taken", "pc_loads")
CLASS_COUNTERS = INSTRUCTION_CLASSES + EVENTS


def _host_compiler() -> str:
  """The host C compiler: $CC if set, else the first of cc, gcc, clang on PATH."""
  cc = os.environ.get("CC")
  candidates = (cc,) if cc else _HOST_COMPILERS
  for name in candidates:
    path = shutil.which(name)
    if path:
      return path
  raise errors.ToolchainMissingError(
      f"no host C compiler ({', '.join(candidates)}) to build the QEMU plugin {SOURCE}; "
      "install one with: apt-get install gcc")


def build_plugin(cache_dir: str | None = None) -> str:
  """Compiles edgenas_icount.c into `cache_dir` (default ~/.cache/edgenas/device) unless a build of the same
  source with the same compiler and flags is there; returns the .so path. The file appears whole or not at all."""
  cc = _host_compiler()
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(CFLAGS).encode()])).hexdigest()[:16]
  directory = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  path = os.path.join(directory, f"libedgenas_icount-{key}.so")
  if os.path.isfile(path):
    return path
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".libedgenas_icount-", suffix=".so", dir=directory)
  os.close(fd)
  try:
    proc = subprocess.run([cc, *CFLAGS, "-o", tmp, SOURCE], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      detail = (proc.stderr or proc.stdout).strip().splitlines()
      raise errors.BuildError(f"building the QEMU plugin with {cc} failed (exit {proc.returncode}): "
                              + " | ".join(detail[:5]))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def _qemu_opt(value: str) -> str:
  """Escapes a value for QEMU's comma-separated option syntax (a comma is written twice)."""
  return value.replace(",", ",,")


def plugin_args(plugin_path: str, marker_addr: int, out_path: str, flash: tuple[int, int] | None = None,
                ram: tuple[int, int] | None = None, mem: bool = False, classes: bool = False,
                dump: str | None = None) -> list[str]:
  """The QEMU arguments that load the plugin: marks at `marker_addr` logged to `out_path`; with `mem`, data
  reads from [flash[0], flash[1]) and reads/writes of [ram[0], ram[1]) counted too; with `classes`, executed
  instructions per class; `dump`: a file listing each translated instruction's address, class and text."""
  if marker_addr < 0:
    raise errors.DeviceError(f"marker address {marker_addr:#x} is negative")
  if mem and flash is None and ram is None:
    raise errors.DeviceError("plugin mem=on needs a flash or a ram address range to classify accesses")
  parts = [_qemu_opt(plugin_path), f"marker={marker_addr:#x}", "out=" + _qemu_opt(out_path)]
  for key, span in (("flash", flash), ("ram", ram)):
    if span is not None:
      lo, hi = span
      if not 0 <= lo < hi:
        raise errors.DeviceError(f"plugin {key} range {lo:#x}-{hi:#x} is empty or negative")
      parts.append(f"{key}={lo:#x}-{hi:#x}")
  if mem:
    parts.append("mem=on")
  if classes:
    parts.append("classes=on")
  if dump is not None:
    if not classes:
      raise errors.DeviceError("plugin dump= needs classes=True")
    parts.append("dump=" + _qemu_opt(dump))
  return ["-plugin", ",".join(parts)]


@dataclasses.dataclass(frozen=True)
class MemCounts:
  """Guest data accesses (counted per access, whatever the width) by address range."""
  flash_reads: int
  ram_reads: int
  ram_writes: int

  def __sub__(self, other: MemCounts) -> MemCounts:
    return MemCounts(self.flash_reads - other.flash_reads, self.ram_reads - other.ram_reads,
                     self.ram_writes - other.ram_writes)


@dataclasses.dataclass(frozen=True)
class Mark:
  """One arrival at the marker: instructions executed before it, the access counts so far (mem=on) and the
  instructions per class and events so far (classes=on: name -> count, names as in CLASS_COUNTERS)."""
  instructions: int
  mem: MemCounts | None = None
  classes: dict[str, int] | None = None


def class_deltas(a: Mark, b: Mark) -> dict[str, int] | None:
  """Per-class counts from mark `a` to mark `b` (None without classes=on)."""
  if a.classes is None or b.classes is None:
    return None
  return {k: b.classes[k] - a.classes[k] for k in b.classes}


@dataclasses.dataclass(frozen=True)
class PluginLog:
  """A parsed plugin log: the marks in order and the totals at QEMU's exit."""
  marks: list[Mark]
  total_instructions: int
  total_mem: MemCounts | None = None
  total_classes: dict[str, int] | None = None

  def deltas(self) -> list[int]:
    """Instructions from each mark to the next (len(marks) - 1 values)."""
    return [b.instructions - a.instructions for a, b in zip(self.marks, self.marks[1:])]

  def mem_deltas(self) -> list[MemCounts]:
    """Access counts from each mark to the next; empty without mem=on."""
    if not self.marks or self.marks[0].mem is None:
      return []
    return [b.mem - a.mem for a, b in zip(self.marks, self.marks[1:])]  # type: ignore[operator]


def parse_log(path: str) -> PluginLog:
  """Reads the plugin's log; a malformed, out-of-order or truncated (no T line: QEMU did not exit normally)
  log raises DeviceError naming the file and line."""
  try:
    with open(path, encoding="ascii") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise errors.DeviceError(f"cannot read plugin log {path}: {e}") from None
  marks: list[Mark] = []
  total: tuple[int, MemCounts | None, dict[str, int] | None] | None = None
  width = None
  names: tuple[str, ...] | None = None
  for number, line in enumerate(lines, start=1):
    where = f"plugin log {path}, line {number}"
    fields = line.split()
    if not fields:
      continue
    if fields[0] == "H":
      if number != 1 or tuple(fields[1:]) != CLASS_COUNTERS:
        raise errors.DeviceError(f"{where}: expected the class header 'H {' '.join(CLASS_COUNTERS)}' on line 1 "
                                 f"(plugin and parser out of step), got {line!r}")
      names = CLASS_COUNTERS
      continue
    classes = None
    if names is not None:
      if "C" not in fields or len(fields) - fields.index("C") - 1 != len(names) or not all(
          x.isdigit() for x in fields[fields.index("C") + 1:]):
        raise errors.DeviceError(f"{where}: expected ' C' and {len(names)} class counts at the end, got {line!r}")
      k = fields.index("C")
      classes = dict(zip(names, (int(x) for x in fields[k + 1:])))
      fields = fields[:k]
    if fields[0] not in ("M", "T") or len(fields) not in (2, 5) or not all(x.isdigit() for x in fields[1:]):
      raise errors.DeviceError(f"{where}: expected 'M|T <count> [<flash reads> <ram reads> <ram writes>]', "
                               f"got {line!r}")
    if total is not None:
      raise errors.DeviceError(f"{where}: {line!r} after the T line")
    if width is not None and len(fields) != width:
      raise errors.DeviceError(f"{where}: {len(fields) - 1} numbers where earlier lines have {width - 1}")
    width = len(fields)
    values = [int(x) for x in fields[1:]]
    mem = MemCounts(*values[1:]) if len(values) == 4 else None
    previous = marks[-1].instructions if marks else 0
    if values[0] < previous:
      raise errors.DeviceError(f"{where}: instruction count {values[0]} below the previous mark's {previous}")
    if classes is not None and sum(classes[c] for c in INSTRUCTION_CLASSES) != values[0]:
      raise errors.DeviceError(f"{where}: the class counts sum to {sum(classes[c] for c in INSTRUCTION_CLASSES)}, "
                               f"not the instruction count {values[0]}")
    if fields[0] == "M":
      marks.append(Mark(values[0], mem, classes))
    else:
      total = (values[0], mem, classes)
  if total is None:
    raise errors.DeviceError(f"plugin log {path} has no T line: QEMU did not exit normally "
                             f"({len(marks)} marks were written)")
  return PluginLog(marks=marks, total_instructions=total[0], total_mem=total[1], total_classes=total[2])


def elf_symbols(elf_path: str, nm: str = "arm-none-eabi-nm") -> dict[str, tuple[int, str]]:
  """name -> (address, nm type letter) of the ELF's defined symbols; a name defined more than once keeps its
  global definition (or, with none, the first local one). Thumb function addresses come back even."""
  if shutil.which(nm) is None:
    raise errors.ToolchainMissingError(f"{nm} not found (it comes with the target's binutils) to read {elf_path}")
  proc = subprocess.run([nm, "-P", "-t", "x", "--defined-only", elf_path], capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    raise errors.DeviceError(f"{nm} {elf_path} failed (exit {proc.returncode}): {proc.stderr.strip()}")
  table: dict[str, tuple[int, str]] = {}
  for line in proc.stdout.splitlines():
    fields = line.split()
    if len(fields) < 3:
      continue
    name, kind, value = fields[0], fields[1], int(fields[2], 16)
    if kind in "Tt":
      value &= ~1  # Thumb: st_value has bit 0 set, QEMU reports the even instruction address
    if name not in table or (kind.isupper() and not table[name][1].isupper()):
      table[name] = (value, kind)
  return table


def symbol_address(elf_path: str, name: str, nm: str = "arm-none-eabi-nm") -> int:
  """The address of symbol `name` in the ELF (even for Thumb functions, as QEMU reports instruction
  addresses); DeviceError if the ELF does not define it."""
  table = elf_symbols(elf_path, nm)
  if name not in table:
    raise errors.DeviceError(f"symbol {name!r} is not defined in {elf_path}")
  return table[name][0]


def memory_ranges(elf_path: str, nm: str = "arm-none-eabi-nm") -> tuple[tuple[int, int], tuple[int, int]]:
  """(flash, ram) address ranges [start, limit) of the regions the board's linker script (cortex_m_sections.ld
  under each Cortex-M board's memory map, riscv_virt.ld) defines, for the plugin's flash= and ram= arguments."""
  table = elf_symbols(elf_path, nm)
  names = ("__edgenas_flash_start", "__edgenas_flash_limit", "__edgenas_ram_start", "__edgenas_ram_limit")
  missing = [n for n in names if n not in table]
  if missing:
    raise errors.DeviceError(f"{elf_path} lacks {', '.join(missing)}: not linked with the edgenas linker script")
  flash_lo, flash_hi, ram_lo, ram_hi = (table[n][0] for n in names)
  return (flash_lo, flash_hi), (ram_lo, ram_hi)
