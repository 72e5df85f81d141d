"""Reads an int8 `.tflite` file into the operators a cost model prices.

Each operator becomes a `GraphOp`: an `edgenas.ops.OpSpec` (the shared vocabulary) plus the exact figures taken
from the file's tensors (MACs from the real kernel shape, weight bytes from the real constant buffers, activation
bytes from the real tensor shapes). The OpSpec carries the file's kernel and stride as they are (an (h, w) pair
when not square, e.g. the DS-CNN reference model's 10x4 stem and 25x5 pooling window); OpSpec assumes SAME
padding, so costs always use the exact figures on the GraphOp (a VALID op's taps are all in bounds).

The flatbuffer schema comes from `ai_edge_litert` (imported lazily: importing edgenas never loads LiteRT).
"""
from __future__ import annotations

import dataclasses
import math

from edgenas import ops as ops_lib
from edgenas.energy import features as features_lib
from edgenas.energy.errors import EnergyModelError

# Bytes per element of the TFLite tensor types an int8 model contains.
_TYPE_BYTES = {"FLOAT32": 4, "FLOAT16": 2, "INT32": 4, "UINT8": 1, "INT64": 8, "INT16": 2, "INT8": 1, "BOOL": 1,
               "UINT32": 4, "INT4": 1}


@dataclasses.dataclass(frozen=True)
class Tensor:
  index: int
  shape: tuple[int, ...]
  dtype: str
  nbytes: int
  constant: bool  # data stored in the flatbuffer (flash), not in the arena


@dataclasses.dataclass(frozen=True)
class GraphOp:
  index: int
  spec: ops_lib.OpSpec
  kernel_h: int
  kernel_w: int
  stride_h: int
  stride_w: int
  padding: str  # "same" or "valid"
  macs: int  # nominal, as edgenas.ops counts them
  executed_macs: float  # taps outside a SAME-padded input skipped, as TFLM's kernels do
  weight_bytes: int  # constant inputs the kernel reads (int8 weights + int32 biases)
  activation_bytes: int  # arena tensors it reads and writes
  inputs: tuple[int, ...]  # arena tensors read
  outputs: tuple[int, ...]

  def features(self) -> tuple:
    """Same meaning and order as `edgenas.energy.features.cost_features`, from the file's exact shapes."""
    taps = self.executed_macs / self.spec.in_c if self.spec.op == ops_lib.CONV_2D else 0.0
    return (float(self.executed_macs), float(self.weight_bytes), float(self.activation_bytes), 1.0, float(taps))


@dataclasses.dataclass(frozen=True)
class TfliteGraph:
  path: str
  file_bytes: int
  tensors: tuple[Tensor, ...]
  ops: tuple[GraphOp, ...]
  inputs: tuple[int, ...]
  outputs: tuple[int, ...]

  def op_specs(self) -> list[ops_lib.OpSpec]:
    return [o.spec for o in self.ops]

  def constant_bytes(self) -> int:
    return sum(t.nbytes for t in self.tensors if t.constant)


def _schema():
  from ai_edge_litert import schema_py_generated  # lazily: see module docstring
  return schema_py_generated


def _enum_names(enum_cls) -> dict[int, str]:
  return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def _unpack(flatbuffer: bytes, source: str):
  if len(flatbuffer) < 8 or flatbuffer[4:8] != b"TFL3":
    raise EnergyModelError(f"{source}: not a TFLite flatbuffer (file identifier 'TFL3' missing)")
  try:
    model = _schema().ModelT.InitFromPackedBuf(flatbuffer, 0)
  except Exception as e:  # a corrupt buffer can fail anywhere inside the generated reader
    raise EnergyModelError(f"{source}: cannot parse the TFLite flatbuffer ({type(e).__name__}: {e})") from None
  if not model.subgraphs:
    raise EnergyModelError(f"{source}: the model has no subgraph")
  if len(model.subgraphs) > 1:
    raise EnergyModelError(f"{source}: {len(model.subgraphs)} subgraphs; only single-subgraph models "
                           f"(no control flow) can be costed")
  return model


def _op_name(model, op) -> str:
  code = model.operatorCodes[op.opcodeIndex]
  builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
  return _enum_names(_schema().BuiltinOperator).get(builtin, f"builtin#{builtin}")


def operator_names(flatbuffer: bytes, source: str = "<flatbuffer>") -> list[str]:
  """The builtin operator names of the model, lower case (e.g. ['conv_2d', 'add'])."""
  model = _unpack(flatbuffer, source)
  return [_op_name(model, op).lower() for op in model.subgraphs[0].operators]


def read_tflite(path: str) -> TfliteGraph:
  """Parses `path`; raises EnergyModelError naming the file and the operator it cannot cost."""
  try:
    with open(path, "rb") as f:
      flatbuffer = f.read()
  except FileNotFoundError:
    raise EnergyModelError(f"{path}: no such .tflite file") from None
  return parse_tflite(flatbuffer, path)


def parse_tflite(flatbuffer: bytes, source: str = "<flatbuffer>") -> TfliteGraph:
  schema = _schema()
  model = _unpack(flatbuffer, source)
  graph = model.subgraphs[0]
  type_names = _enum_names(schema.TensorType)
  tensors = []
  for i, t in enumerate(graph.tensors):
    dtype = type_names.get(t.type, f"type#{t.type}")
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
    buffer = model.buffers[t.buffer] if 0 < t.buffer < len(model.buffers) else None
    constant = buffer is not None and (buffer.data is not None and len(buffer.data) > 0 or bool(buffer.size))
    if dtype not in _TYPE_BYTES:
      raise EnergyModelError(f"{source}: tensor {i} has type {dtype}, which an int8 TFLite Micro model does not use")
    tensors.append(Tensor(i, shape, dtype, math.prod(shape) * _TYPE_BYTES[dtype], constant))
  ops = [_graph_op(i, _op_name(model, op), op, tensors, source) for i, op in enumerate(graph.operators)]
  return TfliteGraph(source, len(flatbuffer), tuple(tensors), tuple(ops), tuple(int(i) for i in graph.inputs),
                     tuple(int(i) for i in graph.outputs))


def _nhwc(t: Tensor) -> tuple[int, int, int]:
  """(H, W, C) of an activation; rank-2 [batch, features] tensors are 1 x 1 x features."""
  s = t.shape
  if len(s) == 4:
    return s[1], s[2], s[3]
  if len(s) == 2:
    return 1, 1, s[1]
  if len(s) == 3:
    return 1, s[1], s[2]
  return 1, 1, max(1, math.prod(s))


def _graph_op(index: int, name: str, op, tensors: list[Tensor], source: str) -> GraphOp:
  kind = name.lower()
  where = f"{source}: operator {index} ({name})"
  if kind not in ops_lib.OP_TYPES:
    raise EnergyModelError(f"{where}: operator {name} cannot be costed; the energy model covers "
                           f"{', '.join(t.upper() for t in ops_lib.OP_TYPES)}")
  inputs = [tensors[i] for i in op.inputs if i >= 0]
  outputs = [tensors[i] for i in op.outputs]
  act_in = [t for t in inputs if not t.constant]
  consts = [t for t in inputs if t.constant]
  for t in act_in + outputs:
    if t.dtype != "INT8":
      raise EnergyModelError(f"{where}: activation tensor {t.index} is {t.dtype}; only int8 models can be costed")
  if not act_in or len(outputs) != 1:
    raise EnergyModelError(f"{where}: expected arena input(s) and one output, got {len(act_in)} and {len(outputs)}")
  in_h, in_w, in_c = _nhwc(act_in[0])
  out_h, out_w, out_c = _nhwc(outputs[0])
  opts = op.builtinOptions
  kernel_h = kernel_w = stride_h = stride_w = 1
  padding = "same"
  weight_bytes = 0
  if kind in (ops_lib.CONV_2D, ops_lib.DEPTHWISE_CONV_2D):
    w_shape = consts[0].shape if consts else None
    if w_shape is None or len(w_shape) != 4:
      raise EnergyModelError(f"{where}: expected a constant 4-D weight tensor")
    kernel_h, kernel_w = w_shape[1], w_shape[2]
    stride_h, stride_w = opts.strideH, opts.strideW
    padding = "same" if opts.padding == 0 else "valid"
    weight_bytes = sum(t.nbytes for t in consts)
    taps = kernel_h * kernel_w * (in_c if kind == ops_lib.CONV_2D else 1)
    macs = out_h * out_w * out_c * taps
  elif kind == ops_lib.FULLY_CONNECTED:
    if not consts:
      raise EnergyModelError(f"{where}: expected a constant weight matrix")
    weight_bytes = sum(t.nbytes for t in consts)
    in_h, in_w, in_c = 1, 1, consts[0].shape[-1]
    macs = consts[0].shape[0] * consts[0].shape[-1]
  elif kind in (ops_lib.AVERAGE_POOL_2D, ops_lib.MAX_POOL_2D):
    kernel_h, kernel_w = opts.filterHeight, opts.filterWidth
    stride_h, stride_w = opts.strideH, opts.strideW
    padding = "same" if opts.padding == 0 else "valid"
    macs = out_h * out_w * out_c * kernel_h * kernel_w
  else:  # add, reshape, softmax: one pass over the elements
    macs = out_h * out_w * out_c
  activation_bytes = sum(t.nbytes for t in act_in) + outputs[0].nbytes
  spec = ops_lib.OpSpec(kind, in_h, in_w, in_c, out_c, (kernel_h, kernel_w), (stride_h, stride_w), f"op[{index}]")
  frac = features_lib.tap_fraction(kind, in_h, in_w, kernel_h, kernel_w, stride_h, stride_w, padding == "same")
  return GraphOp(index, spec, kernel_h, kernel_w, stride_h, stride_w, padding, int(macs), macs * frac,
                 int(weight_bytes), int(activation_bytes), tuple(t.index for t in act_in),
                 tuple(t.index for t in outputs))

