"""Core timings: the cycles a core spends per instruction class, priced over the emulator's class counts.

The instruction-count plugin (`edgenas.device.plugin`, `classes=on`) splits every executed instruction into
exclusive classes (ALU, multiply, divide, single loads and stores, pipelined loads/stores, LDRD/STRD, LDM/STM,
branches, conditional branches, floating point, other) plus events on top (registers moved by LDM/STM, conditional
branches taken, loads into the PC). A core's timing gives each of them a cycle cost:

    modelled cycles = Σ_class cost(class) · count(class) + Σ_event cost(event) · count(event)

Two cores that run the same kernels (CMSIS-NN on Cortex-M4 and Cortex-M7 is one source compiled twice) then get
different per-operator costs wherever the operators' instruction mixes differ: a dual-issue core gains most on
ALU-heavy code, a core with a slow load path loses most on load-heavy code. What the timing leaves out (fetch
stalls from flash, cache misses, misprediction) is one scale per board, fitted in `edgenas.energy.cycles`.

Every figure names its source. The Cortex-M4 figures are Arm's published cycle table; Arm publishes none for the
Cortex-M7 or Cortex-M33, so their figures are estimates from the documented pipeline, and say so.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from edgenas.device import plugin
from edgenas.energy.errors import EnergyModelError

COUNTERS = plugin.CLASS_COUNTERS  # what the plugin counts, in its order
INSTRUCTION_CLASSES = plugin.INSTRUCTION_CLASSES  # the exclusive ones: they sum to the instruction count


@dataclasses.dataclass(frozen=True)
class CoreTiming:
  name: str
  cycles: Mapping[str, float]  # counter -> cycles per occurrence
  source: str

  def modelled_cycles(self, classes: Mapping[str, float]) -> float:
    """Σ cost · count over the counters (a counter missing from `classes` raises)."""
    missing = [c for c in COUNTERS if c not in classes]
    if missing:
      raise EnergyModelError(f"core timing {self.name}: class counts lack {', '.join(missing)}; count them with "
                             "the plugin's classes=on (python -m launch.profile --backend=emulate)")
    return float(sum(self.cycles[c] * float(classes[c]) for c in COUNTERS))


def _timing(name: str, source: str, **cycles: float) -> CoreTiming:
  if set(cycles) != set(COUNTERS):
    raise AssertionError(f"timing {name}: counters {sorted(set(COUNTERS) ^ set(cycles))} mismatched")
  return CoreTiming(name, dict(cycles), source)


# Pipeline refill after a taken branch on Cortex-M3/M4: "1 to 3 depending on the alignment and width of the target
# instruction, and whether the processor manages to speculate the address early" (TRM); the middle is used.
_M4_REFILL = 2.0

TIMINGS = {
    "cortex-m4": _timing(
        "cortex-m4",
        "Arm Cortex-M4 TRM r0p1 (DDI 0439), Table 3-1 'Cortex-M4 instruction set summary' (zero wait states): ALU, "
        "MUL/MLA and every DSP multiply (SMLAD, SMLAL, ...) 1 cycle; SDIV/UDIV 2-12 (7 used); LDR/STR 2, and 1 when "
        "pipelined after an LDR (the load/store pipelining notes shared with the Cortex-M3 TRM, DDI 0337, 3.3.1); "
        "LDRD/STRD and LDM/STM 1 + N; branches 1 + P with the refill P of 1-3 (2 used); not-taken conditional "
        "branches 1; a load into the PC adds P",
        alu=1, mul=1, div=7, load=2, mem_pipelined=1, store=2, mem_pair=3, mem_multi=1, branch=1 + _M4_REFILL,
        cond_branch=1, fp=1, other=1, multi_regs=1, cond_taken=_M4_REFILL, pc_loads=_M4_REFILL),
    "cortex-m7": _timing(
        "cortex-m7",
        "estimate from the documented pipeline, not a published table (Arm publishes no per-instruction cycle table "
        "for the Cortex-M7): the Cortex-M7 TRM (DDI 0489) describes a 6-stage superscalar pipeline that dual-issues "
        "most ALU pairs (0.5 cycle each), one MAC pipeline (1), a 64-bit load/store path (a single load or store 1, "
        "LDRD/STRD 1, LDM/STM 1 + N/2), and a branch target address cache that predicts loop branches (taken "
        "branches 1, no refill charged; mispredictions go into the fitted scale)",
        alu=0.5, mul=1, div=7, load=1, mem_pipelined=1, store=1, mem_pair=1, mem_multi=1, branch=1, cond_branch=0.5,
        fp=0.5, other=0.5, multi_regs=0.5, cond_taken=0.5, pc_loads=1),
    "rv32-scalar": _timing(
        "rv32-scalar",
        "estimate, a generic in-order scalar RV32IM pipeline (Patterson & Hennessy, Computer Organization and "
        "Design, RISC-V edition, ch. 4: one instruction per cycle, a taken branch or jump flushes one fetched "
        "instruction), with an iterative 32-cycle divider; not the Andes D45's own (dual-issue) timings, which "
        "are not public",
        alu=1, mul=1, div=32, load=1, mem_pipelined=1, store=1, mem_pair=2, mem_multi=1, branch=2, cond_branch=1,
        fp=1, other=1, multi_regs=0, cond_taken=1, pc_loads=0),
}


def get(name: str, where: str = "core timing") -> CoreTiming:
  if name not in TIMINGS:
    raise EnergyModelError(f"{where}: unknown core timing {name!r}; known: {', '.join(sorted(TIMINGS))}")
  return TIMINGS[name]
