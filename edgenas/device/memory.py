"""What a model needs on a 32-bit device: the TFLite Micro arena and the program's flash, predicted from the .tflite.

Arena = head + tail, the two ends of TFLM's single arena:
  - head: the activation tensors and the kernels' scratch buffers, placed by TFLM's greedy planner. `plan_head`
    replays that planner exactly (buffers sorted by size, largest first, each put at the lowest offset where it
    overlaps no buffer alive at the same time; sizes rounded up to 16 bytes; lifetimes in TFLM's scopes: graph
    inputs from scope 0, operator i at scope i + 1). Scratch sizes follow CMSIS-NN's own buffer-size functions
    on Cortex-M (DSP extension: im2col for non-1x1 convolutions, a buffer for depthwise kernels other than 3x3,
    an int32 row for average pooling); TFLM's reference kernels (RISC-V) request none for these operators.
  - tail: what TFLM keeps for the model's lifetime: a fixed part (allocator, graph and interpreter state), one
    TfLiteEvalTensor per tensor, one node per operator, and per output channel of a per-channel-quantised
    convolution an int32 multiplier and shift (8 bytes: this term is exact, not fitted). The three other
    constants are fitted per target to arenas measured on the emulated targets (`code_size.json`, written with
    its provenance by `benchmarks/targets.py`).

Flash = the model + TFLM's code for the operators it uses + the fixed runtime, predicted from per-target code
sizes measured from linker maps (`code_size.json`, written by `benchmarks/targets.py`).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from edgenas import ops as ops_lib
from edgenas.energy import tflite_graph

ALIGNMENT = 16
PER_CHANNEL_BYTES = 8  # int32 output multiplier + int32 shift per channel (TFLM's conv/depthwise OpData)
CODE_SIZE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_size.json")


def _align(n: int) -> int:
  return -(-int(n) // ALIGNMENT) * ALIGNMENT


def cmsis_nn_scratch_bytes(op: tflite_graph.GraphOp, graph: tflite_graph.TfliteGraph) -> int:
  """Scratch bytes CMSIS-NN (DSP extension, not MVE) asks the arena for when running `op` (0 for none)."""
  s = op.spec
  if s.op == ops_lib.CONV_2D:
    one_by_one = op.kernel_h == 1 and op.kernel_w == 1 and op.stride_h == 1 and op.stride_w == 1
    if one_by_one:
      return 0
    cols = op.kernel_h * op.kernel_w * s.in_c
    return 2 * (cols + (-cols) % 4) * 2  # two im2col columns of int16
  if s.op == ops_lib.DEPTHWISE_CONV_2D:
    if s.in_c != s.out_c or (op.kernel_h == 3 and op.kernel_w == 3):  # 3x3: a kernel without scratch
      return 0
    return s.in_c * op.kernel_h * op.kernel_w * 2
  if s.op == ops_lib.AVERAGE_POOL_2D:
    return s.in_c * 4
  return 0


def _buffers(graph: tflite_graph.TfliteGraph, scratch) -> list[tuple[int, int, int]]:
  """(size, first scope, last scope) of every buffer TFLM plans, in the order it adds them: arena tensors by
  index, then each operator's scratch buffer."""
  n = len(graph.ops)
  first: dict[int, int] = {}
  last: dict[int, int] = {}
  for t in graph.inputs:
    first.setdefault(t, 0)
    last[t] = 0
  for i, op in enumerate(graph.ops):
    scope = i + 1
    for t in op.outputs:
      first.setdefault(t, scope)
    for t in op.inputs + op.outputs:
      last[t] = scope
  for t in graph.outputs:
    first.setdefault(t, n)
    last[t] = n
  tensors = {t.index: t for t in graph.tensors}
  out = [(_align(tensors[t].nbytes), first[t], last[t]) for t in sorted(first)
         if not tensors[t].constant and tensors[t].nbytes > 0]
  for i, op in enumerate(graph.ops):
    size = scratch(op, graph)
    if size > 0:
      out.append((_align(size), i + 1, i + 1))
  return out


def greedy_plan(buffers: Sequence[tuple[int, int, int]]) -> int:
  """Bytes TFLM's GreedyMemoryPlanner needs for `buffers` [(size, first, last)]: largest first (ties: the later
  buffer first, as TFLM's stable sort of its reversed list does), each at the lowest offset that clears every
  placed buffer alive at an overlapping time."""
  order = sorted(range(len(buffers)), key=lambda i: (-buffers[i][0], -i))
  placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last), kept sorted by offset
  for i in order:
    size, first, last = buffers[i]
    offset = 0
    for p_off, p_size, p_first, p_last in placed:
      if p_last < first or p_first > last:
        continue  # not alive at the same time
      if p_off - offset >= size:
        break
      offset = max(offset, p_off + p_size)
    placed.append((offset, size, first, last))
    placed.sort(key=lambda p: p[0])
  return max((o + s for o, s, _, _ in placed), default=0)


def plan_head(graph: tflite_graph.TfliteGraph, kernels: str) -> int:
  """The head of the arena: activations and scratch buffers as TFLM plans them (see the module docstring)."""
  scratch = cmsis_nn_scratch_bytes if kernels == "CMSIS-NN" else (lambda op, g: 0)
  return greedy_plan(_buffers(graph, scratch))


def per_channel_count(graph: tflite_graph.TfliteGraph) -> int:
  return sum(o.spec.out_c for o in graph.ops if o.spec.op in (ops_lib.CONV_2D, ops_lib.DEPTHWISE_CONV_2D))


def tail_counts(graph: tflite_graph.TfliteGraph) -> dict:
  """The counts the tail model multiplies: tensors, operators and per-channel-quantised channels."""
  return dict(tensors=len(graph.tensors), ops=len(graph.ops), channels=per_channel_count(graph))


def load_code_size(path: str = CODE_SIZE_FILE) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def predict(flatbuffer: bytes, target: str, table: dict | None = None) -> dict:
  """{predicted_arena_bytes, head_bytes, tail_bytes, predicted_flash_bytes, code_bytes, ...} for `target`; the
  figures that need measured constants are None where `code_size.json` lacks the target."""
  from edgenas.device import targets as targets_lib
  from edgenas.export import verify

  kernels = targets_lib.get_target(target).kernels
  graph = tflite_graph.parse_tflite(flatbuffer)
  table = load_code_size() if table is None else table
  entry = table.get("targets", {}).get(target, {})
  head = plan_head(graph, kernels)
  counts = tail_counts(graph)
  tail = None
  if "tail" in entry:
    c = entry["tail"]
    tail = int(round(c["fixed"] + c["per_tensor"] * counts["tensors"] + c["per_op"] * counts["ops"]
                     + PER_CHANNEL_BYTES * counts["channels"]))
  code = None
  if "code" in entry:
    ops = sorted({o["op"] for o in verify.model_ops(flatbuffer)})
    known = entry["code"]["per_op"]
    missing = [o for o in ops if o not in known]
    if not missing:
      code = int(entry["code"]["runtime"] + sum(known[o] for o in ops))
  return dict(head_bytes=head, tail_bytes=tail, predicted_arena_bytes=None if tail is None else head + tail,
              counts=counts, model_bytes=len(flatbuffer), code_bytes=code,
              predicted_flash_bytes=None if code is None else code + _align(len(flatbuffer)))


def _error_pct(predicted, measured) -> float | None:
  if predicted is None or not measured:
    return None
  return round(100.0 * (predicted / measured - 1.0), 2)


def compare(flatbuffer: bytes, target: str, result: dict, table: dict | None = None) -> dict:
  """The memory model's prediction next to what the target measured (`runner.run_on_target`'s result)."""
  p = predict(flatbuffer, target, table)
  arena_err = _error_pct(p["predicted_arena_bytes"], result.get("arena_used_bytes"))
  flash_err = _error_pct(p["predicted_flash_bytes"], result["elf"]["deployed_flash_bytes"])
  return dict(p, measured_arena_bytes=result.get("arena_used_bytes"),
              measured_flash_bytes=result["elf"]["deployed_flash_bytes"], arena_error_pct=arena_err,
              flash_error_pct=flash_err,
              arena_within_10pct=None if arena_err is None else abs(arena_err) <= 10.0,
              flash_within_10pct=None if flash_err is None else abs(flash_err) <= 10.0)
