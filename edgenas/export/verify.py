"""Checks an int8 `.tflite` the way the device will run it: in the TFLite Micro interpreter (PyPI `tflite-micro`).

- `model_ops`: every operator with its builtin name, version and tensor types, read from the flatbuffer;
- `check_tflm_ops`: every operator has a TFLite Micro kernel (a `MicroMutableOpResolver` method in the table
  `edgenas.export.resolver` reads from TFLM's own header; that module says why, and what of op versions) and
  every arena tensor is int8 (else UnsupportedOpError naming the operator and its version);
- `TflmRunner`: the TFLM interpreter over a batch of float images (quantised with the model's input parameters)
  -> int8 logits, dequantised logits and predictions;
- `measure_arena`: the arena bytes TFLM's recording allocator reports after one inference (head + tail), checked
  by running the model again in an arena of exactly that size.

TFLM is the golden reference: LiteRT's optimised kernels differ from it by a few LSB. The host build of TFLM runs
the reference kernels with 64-bit pointers; a Cortex-M build with CMSIS-NN needs a little scratch memory more and
pointer-sized structures less (see `device_arena_bytes`).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterator

import numpy as np

from edgenas.export import errors
from edgenas.export import resolver as resolver_lib

# Operators CMSIS-NN has optimised int8 kernels for (the rest run TFLM's reference kernels on Cortex-M too).
CMSIS_NN_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "AVERAGE_POOL_2D",
                          "MAX_POOL_2D", "SOFTMAX", "SVDF", "TRANSPOSE_CONV", "UNIDIRECTIONAL_SEQUENCE_LSTM"})
# Constant tensor types an int8 model may hold: int8 weights, int32 biases and shape operands.
CONSTANT_TYPES = frozenset({"INT8", "INT32"})
ARENA_ALIGNMENT = 16
# How far measure_arena grows the recorded arena figure looking for one the model really loads in.
MAX_ARENA_GROWTH_BYTES = 4096


def _schema():
  return errors.require("ai_edge_litert.schema_py_generated", "reading .tflite files")


def _enum_names(enum_cls) -> dict[int, str]:
  return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def model_ops(flatbuffer: bytes) -> list[dict]:
  """[{index, op, version, inputs: [type], outputs: [type], constant_inputs: [type]}] in execution order."""
  schema = _schema()
  if len(flatbuffer) < 8 or flatbuffer[4:8] != b"TFL3":
    raise errors.ExportError("not a TFLite flatbuffer (file identifier 'TFL3' missing)")
  model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
  if len(model.subgraphs) != 1:
    raise errors.UnsupportedOpError(f"the model has {len(model.subgraphs)} subgraphs; the exporter writes "
                                    "single-subgraph models only")
  op_names, type_names = _enum_names(schema.BuiltinOperator), _enum_names(schema.TensorType)
  graph = model.subgraphs[0]

  def constant(t):
    b = model.buffers[t.buffer] if 0 < t.buffer < len(model.buffers) else None
    return b is not None and (b.data is not None and len(b.data) > 0 or bool(b.size))

  out = []
  for i, op in enumerate(graph.operators):
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    name = op_names.get(builtin, f"BUILTIN_{builtin}")
    if name == "CUSTOM":
      name = f"CUSTOM:{code.customCode.decode() if code.customCode else '?'}"
    ins = [graph.tensors[t] for t in op.inputs if t >= 0]
    outs = [graph.tensors[t] for t in op.outputs]
    out.append(dict(index=i, op=name, version=int(code.version),
                    inputs=[type_names[t.type] for t in ins if not constant(t)],
                    constant_inputs=[type_names[t.type] for t in ins if constant(t)],
                    outputs=[type_names[t.type] for t in outs]))
  return out


def check_tflm_ops(ops: list[dict], table: resolver_lib.ResolverTable | None = None) -> None:
  """Raises UnsupportedOpError naming the first operator TFLM has no kernel for, or a non-int8 tensor. `table`:
  the TFLM to check against (default `resolver.table()`: $TFLM_DIR's, else the pinned one's)."""
  table = resolver_lib.table() if table is None else table
  for o in ops:
    where = f"operator {o['index']} ({o['op']} v{o['version']})"
    if o["op"] not in table.methods:
      raise errors.UnsupportedOpError(f"{where}: TensorFlow Lite Micro has no kernel for {o['op']} (no "
                                      f"MicroMutableOpResolver method in {table.source} registers it); change "
                                      "the network so it converts without it")
    bad = [t for t in o["inputs"] + o["outputs"] if t != "INT8"]
    bad += [t for t in o["constant_inputs"] if t not in CONSTANT_TYPES]
    if bad:
      raise errors.UnsupportedOpError(f"{where}: has {', '.join(sorted(set(bad)))} tensors; a full-integer model "
                                      "for the MCU needs int8 activations (int8 weights, int32 biases)")


def op_summary(ops: list[dict], table: resolver_lib.ResolverTable | None = None) -> list[dict]:
  """Distinct (op, version) pairs with counts and the resolver method of each (None where `table` has none), in
  first-use order: what the resolver registers. TFLM registers kernels per operator: versions are for the record."""
  table = resolver_lib.table() if table is None else table
  seen: dict[tuple[str, int], dict] = {}
  for o in ops:
    key = (o["op"], o["version"])
    if key not in seen:
      seen[key] = dict(op=o["op"], version=o["version"], count=0, tflm_resolver=table.methods.get(o["op"]),
                       cmsis_nn_kernel=o["op"] in CMSIS_NN_OPS)
    seen[key]["count"] += 1
  return list(seen.values())


def _runtime():
  return errors.require("tflite_micro.python.tflite_micro.runtime", "running models in TFLite Micro")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list]:
  """Collects what C++ code writes to file descriptor 2 (TFLM's allocation report goes there, not to Python)."""
  lines: list[str] = []
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield lines
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      lines.extend(tmp.read().decode(errors="replace").splitlines())


def _interpreter(flatbuffer: bytes, arena_bytes: int):
  runtime = _runtime()
  try:
    return runtime.Interpreter.from_bytes(flatbuffer, arena_size=int(arena_bytes))
  except RuntimeError as e:
    raise errors.UnsupportedOpError(f"TFLite Micro cannot load the model in a {arena_bytes}-byte arena: {e} "
                                    "(an operator without a TFLM kernel, or an arena too small)") from None


def generous_arena_bytes(flatbuffer: bytes) -> int:
  """An arena that surely fits before measuring: the model size plus room for every activation twice."""
  return 10 * len(flatbuffer) + 1024 * 1024


class TflmRunner:
  """The model in the TFLite Micro interpreter; batch-1 invokes over float images."""

  def __init__(self, flatbuffer: bytes, arena_bytes: int | None = None):
    from edgenas.energy import tflite_graph
    self.num_inputs = len(tflite_graph.parse_tflite(flatbuffer).inputs)
    self.interpreter = _interpreter(flatbuffer, arena_bytes or generous_arena_bytes(flatbuffer))
    self.input = self.interpreter.get_input_details(0)
    self.output = self.interpreter.get_output_details(0)
    for detail, what in ((self.input, "input"), (self.output, "output")):
      if detail["dtype"] != np.int8:
        raise errors.UnsupportedOpError(f"the model's {what} is {np.dtype(detail['dtype']).name}, not int8")

  @staticmethod
  def _qparams(detail) -> tuple[float, int]:
    q = detail["quantization_parameters"]
    return float(q["scales"][0]), int(q["zero_points"][0])

  @property
  def input_qparams(self) -> tuple[float, int]:
    return self._qparams(self.input)

  @property
  def output_qparams(self) -> tuple[float, int]:
    return self._qparams(self.output)

  def quantize_input(self, images: np.ndarray) -> np.ndarray:
    scale, zero_point = self.input_qparams
    return np.clip(np.round(np.asarray(images, np.float32) / scale) + zero_point, -128, 127).astype(np.int8)

  def run_int8(self, images_int8: np.ndarray) -> np.ndarray:
    """int8 outputs (N, classes) for int8 inputs (N, H, W, C), one invoke per image."""
    shape = tuple(int(d) for d in self.input["shape"])
    outs = []
    for x in images_int8:
      self.interpreter.set_input(x.reshape(shape), 0)
      self.interpreter.invoke()
      outs.append(np.asarray(self.interpreter.get_output(0)).reshape(-1))
    return np.stack(outs) if outs else np.zeros((0, int(np.prod(self.output["shape"]))), np.int8)

  def logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 outputs, dequantised outputs) for float images in the training range."""
    q = self.run_int8(self.quantize_input(images))
    scale, zero_point = self.output_qparams
    return q, (q.astype(np.float32) - zero_point) * scale


_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")


def recorded_arena(flatbuffer: bytes) -> dict:
  """{reported_bytes, head_bytes, tail_bytes, allocation_report}: what TFLM's RecordingMicroAllocator records
  after one inference in a generous arena (16-byte aligned)."""
  runner = TflmRunner(flatbuffer)
  zeros = np.zeros((1,) + tuple(int(d) for d in runner.input["shape"][1:]), np.int8)
  runner.run_int8(zeros)
  with _captured_stderr() as lines:
    runner.interpreter.print_allocations()
  report = "\n".join(lines)
  found = _ARENA_TOTAL.search(report)
  if not found:
    raise errors.ExportError(f"TFLite Micro printed no arena total; its allocation report was:\n{report[:2000]}")
  fig = {k: int(m.group(1)) for k in ("head", "tail")
         for m in [re.search(rf"Arena allocation {k} (\d+) bytes", report)] if m}
  reported = -(-int(found.group(1)) // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
  return dict(reported_bytes=reported, head_bytes=fig.get("head"), tail_bytes=fig.get("tail"),
              allocation_report=[l for l in lines if "RecordingMicroAllocator" in l])


# Loads and runs a model in an arena of the given size in a child process: the tflite-micro wheel can crash the
# process (not raise) when an arena is a little too small for an operator's Prepare (seen with a 1-op
# FULLY_CONNECTED model: a failed temporary allocation, then a fatal check in ResetTempAllocations).
_PROBE = """
import sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
model = open(sys.argv[1], "rb").read()
try:
  interpreter = runtime.Interpreter.from_bytes(model, arena_size=int(sys.argv[2]))
except RuntimeError:
  sys.exit(3)
detail = interpreter.get_input_details(0)
interpreter.set_input(np.zeros(detail["shape"], np.int8), 0)
interpreter.invoke()
"""


def _loads_in(model_path: str, arena: int) -> bool:
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", _PROBE, model_path, str(arena)], capture_output=True)
  return proc.returncode == 0


def measure_arena(flatbuffer: bytes) -> dict:
  """{arena_bytes, reported_bytes, head_bytes, tail_bytes}: the smallest arena (in 16-byte steps from the figure
  TFLM's RecordingMicroAllocator reports after one invoke) in which the model loads and runs.

  The recorded total counts what stays allocated. Operators' Prepare also takes temporary memory from the arena,
  which on a tiny model can exceed the slack left (a 2-kB depthwise model asked for 64 temporary bytes where 32
  were free: testdata/tiny_dw_prepare_temp.tflite), so the figure is confirmed by really loading and running the
  model, and grown until that works. Each try runs in a child process (see _PROBE)."""
  recorded = recorded_arena(flatbuffer)
  reported = recorded["reported_bytes"]
  with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
    f.write(flatbuffer)
    f.flush()
    for arena in range(reported, reported + MAX_ARENA_GROWTH_BYTES + 1, ARENA_ALIGNMENT):
      if _loads_in(f.name, arena):
        break
    else:
      raise errors.ExportError(f"TFLite Micro reported a {reported}-byte arena but the model does not load in "
                               f"{arena} bytes either; its allocation report was:\n"
                               + "\n".join(recorded["allocation_report"])[:2000])
  return dict(recorded, arena_bytes=arena)


def device_arena_bytes(flatbuffer: bytes, host_arena_bytes: int) -> int:
  """The arena to allocate on a Cortex-M or RISC-V board: the host measurement plus the largest im2col-style
  scratch buffer CMSIS-NN may request for one operator (2 x in_c x kh x kw int16 values), plus 1 KB.

  The host figure already counts TFLM's structures with 64-bit pointers, more than a 32-bit MCU needs."""
  from edgenas.energy import tflite_graph  # reads the operator geometry; no TensorFlow

  scratch = 0
  for o in tflite_graph.parse_tflite(flatbuffer).ops:
    if o.spec.op in ("conv_2d", "depthwise_conv_2d"):
      scratch = max(scratch, 2 * 2 * o.spec.in_c * o.kernel_h * o.kernel_w)
  total = host_arena_bytes + scratch + 1024
  return -(-total // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
