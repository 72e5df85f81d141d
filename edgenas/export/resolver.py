"""Which `tflite::MicroMutableOpResolver` method registers each TFLite operator, read from TensorFlow Lite Micro.

TFLM declares one `Add*` method per kernel in `tensorflow/lite/micro/micro_mutable_op_resolver.h`, and each one's
body registers a single operator: `AddBuiltin(BuiltinOperator_<OP>, ...)` or `AddCustom("<custom code>", ...)`.
`parse_header` reads that mapping from the header, so it is exact for the TFLM a program is built against:
  - the device programs (`edgenas.device.runner`) read it from the tree they compile against;
  - the exporter reads it from `TFLM_DIR` when set (the tree its board Makefiles build with), else from
    `tflm_resolver_methods.json`: the pinned TFLM's header (../shared/third_party/tflite-micro/) parsed the same
    way and recorded by `python -m edgenas.export.resolver`, so converting a model and checking it in the
    Python TFLM interpreter need no TFLM sources. `tests/test_export.py` compares the file with that header.

Why not TFLM's generator (`tools/gen_micro_mutable_op_resolver/`): it derives a method name from the operator name
by a spelling rule (`ParseString`) and only then checks the result against this same header. At the pinned commit
the rule misspells CUMSUM (`AddCumsum`; the header has `AddCumSum`), PADV2 and every signal custom operator, and
the module imports mako and TensorFlow's visualize tool. The header is what the rule approximates.

Op versions: TFLM resolves a kernel by operator alone (`MicroOpResolver` "explicitly remove[s] support for Op
versions") and records nowhere which versions a kernel implements, so there is no table to check a version
against. What a newer version brings (tensor types, parameters) a kernel accepts or rejects when it prepares the
model, and the exporter loads and runs every model in the TFLM interpreter. The versions a model uses are
recorded (`verify.op_summary`) and commented next to each registration in `model_ops.h`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
from typing import Mapping, Optional

from edgenas.export import errors

HEADER = "tensorflow/lite/micro/micro_mutable_op_resolver.h"
SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tflm_resolver_methods.json")

_METHOD = re.compile(r"\bTfLiteStatus\s+(Add\w+)\s*\(")
_BUILTIN = re.compile(r"\bAddBuiltin\s*\(\s*(?:tflite::)?BuiltinOperator_(\w+)")
_CUSTOM = re.compile(r'\bAddCustom\s*\(\s*"([^"]+)"')


@dataclasses.dataclass(frozen=True)
class ResolverTable:
  """Operator name as `verify.model_ops` writes it ("CONV_2D", "CUSTOM:<code>") -> its `Add*` method."""
  methods: Mapping[str, str]
  source: str  # where the mapping was read, for error messages


def parse_header(text: str) -> dict[str, str]:
  """{operator: method} of every `Add*` method of a `micro_mutable_op_resolver.h` that registers one named
  operator (AddBuiltin, AddCustom and AddEthosU, whose custom code is computed, are left out)."""
  text = re.sub(r"//[^\n]*", "", text)
  starts = [(m.start(), m.group(1)) for m in _METHOD.finditer(text)]
  methods = {}
  for (start, name), end in zip(starts, [s for s, _ in starts[1:]] + [len(text)]):
    body = text[start:end]
    builtin, custom = _BUILTIN.search(body), _CUSTOM.search(body)
    if builtin and builtin.group(1) != "CUSTOM":
      methods[builtin.group(1)] = name
    elif custom:
      methods[f"CUSTOM:{custom.group(1)}"] = name
  return methods


@functools.lru_cache(maxsize=None)
def from_tflm(tflm_dir: str) -> ResolverTable:
  """The mapping of the TFLM tree at `tflm_dir`, read from its header."""
  path = os.path.join(tflm_dir, HEADER)
  if not os.path.isfile(path):
    raise errors.ExportError(f"TFLM_DIR={tflm_dir} has no {HEADER}; point TFLM_DIR at a tflite-micro checkout, or "
                             "unset it to use the pinned TFLM's resolver table")
  with open(path) as f:
    methods = parse_header(f.read())
  if not methods:
    raise errors.ExportError(f"{path}: no MicroMutableOpResolver Add* methods found; is this TFLM's header?")
  return ResolverTable(methods, path)


@functools.lru_cache(maxsize=None)
def pinned() -> ResolverTable:
  """The mapping recorded from the pinned TFLM (`tflm_resolver_methods.json`)."""
  with open(SNAPSHOT) as f:
    recorded = json.load(f)
  return ResolverTable(recorded["methods"], f"{recorded['header']} of TFLM {recorded['tflm']} "
                                            f"(recorded in {os.path.basename(SNAPSHOT)})")


def table(tflm_dir: Optional[str] = None) -> ResolverTable:
  """The mapping of `tflm_dir`, else of $TFLM_DIR, else the pinned TFLM's."""
  tflm_dir = tflm_dir or os.environ.get("TFLM_DIR")
  return from_tflm(os.path.abspath(tflm_dir)) if tflm_dir else pinned()


def write_snapshot(tflm_dir: str, path: str = SNAPSHOT) -> dict:
  """Records the mapping of the TFLM tree at `tflm_dir` in `path`; returns what was written."""
  from edgenas.device import tflm as tflm_lib
  recorded = dict(generated_by="python -m edgenas.export.resolver", header=HEADER,
                  tflm=tflm_lib.tflm_commit(tflm_dir), methods=dict(sorted(from_tflm(tflm_dir).methods.items())))
  with open(path, "w") as f:
    json.dump(recorded, f, indent=1)
    f.write("\n")
  return recorded


if __name__ == "__main__":
  # python -m edgenas.export.resolver [TFLM_DIR]: re-record the table (default: the tree edgenas.device uses).
  from edgenas.device import tflm as _tflm
  written = write_snapshot(os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else _tflm.resolve_tflm_dir())
  print(f"{SNAPSHOT}: {len(written['methods'])} operators from TFLM {written['tflm']}")
