"""Where a device program's flash goes: bytes per input object, read from the GNU ld map file.

`object_sizes(map_path)` sums the `.text*`, `.rodata*` and `.data*` input sections (what the image stores in
flash) per object file, e.g. `libtflm.a(conv.o)`. `measure(target, ...)` builds one program per operator type,
each registering only that operator, and splits flash into the runtime every program links (interpreter, C
library, start-up) and the objects only one operator pulls in; `memory.predict` adds them up for any model.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Sequence

_SECTION = re.compile(r"^ (\.(?:text|rodata|data)[^\s]*)(?:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(\S.*))?$")
_CONTINUATION = re.compile(r"^\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(\S.*)$")


def object_sizes(map_path: str) -> dict[str, int]:
  """{object: flash bytes} from a map file (sections named on one line and placed on the next are handled)."""
  sizes: dict[str, int] = {}
  with open(map_path, errors="replace") as f:
    lines = f.read().split("Linker script and memory map", 1)[-1].splitlines()
  pending = False
  for line in lines:
    m = _SECTION.match(line)
    if m:
      if m.group(2) is None:
        pending = True
        continue
      size, obj = int(m.group(3), 16), m.group(4)
    elif pending and _CONTINUATION.match(line):
      c = _CONTINUATION.match(line)
      size, obj = int(c.group(2), 16), c.group(3)
    else:
      pending = False
      continue
    pending = False
    if size:
      key = os.path.basename(obj) if "(" not in obj else obj[obj.rfind("/") + 1:]
      sizes[key] = sizes.get(key, 0) + size
  return sizes


def split(programs: dict[str, tuple[dict[str, int], int]]) -> dict:
  """{runtime, per_op, objects} from {op: (object sizes, flash bytes without model and test data)}: objects in
  every program are the runtime; the rest of a program's objects are its operator's code."""
  common = set.intersection(*(set(s) for s, _ in programs.values()))
  per_op, objects, runtimes = {}, {}, []
  for op, (sizes, flash) in programs.items():
    own = {o: b for o, b in sizes.items() if o not in common}
    per_op[op] = sum(own.values())
    objects[op] = sorted(own)
    runtimes.append(flash - per_op[op])
  return dict(runtime=int(round(sum(runtimes) / len(runtimes))), runtime_spread=int(max(runtimes) - min(runtimes)),
              per_op=per_op, objects=objects)


def measure(target: str, models: dict[str, bytes], build_dir: str, log: Callable[[str], None] = print) -> dict:
  """Builds and runs one program per {op name: single-operator model} on `target`; returns `split`'s table and
  each program's arena measurement (for the tail fit)."""
  import numpy as np
  from edgenas.device import runner
  from edgenas.energy import tflite_graph

  programs, runs = {}, {}
  for op, fb in models.items():
    graph = tflite_graph.parse_tflite(fb)
    size = sum(int(np.prod(graph.tensors[t].shape)) for t in graph.inputs)  # every input, one after another
    inputs = np.random.default_rng(0).integers(-128, 128, size=(1, size), dtype=np.int8)
    result = runner.run_on_target(fb, target, inputs, os.path.join(build_dir, op), model_name=op, log=log)
    sizes = object_sizes(os.path.join(build_dir, op, target, "edgenas_model.map"))
    model_obj = sizes.pop("model_data.o", 0)
    flash = result["elf"]["flash_bytes"] - model_obj
    programs[op] = (sizes, flash)
    runs[op] = result
  return dict(split(programs), runs=runs)


def ops_of(flatbuffer: bytes) -> Sequence[str]:
  from edgenas.export import verify
  return sorted({o["op"] for o in verify.model_ops(flatbuffer)})
