"""Operator descriptions shared by the memory model, the energy model and the exporter.

An `OpSpec` is one int8 TFLite operator as the device runs it: its type, input H x W x C, output channels,
kernel and stride (SAME padding). Kernels and strides are an int when square (k x k) or an (h, w) pair when not
(DS-CNN's 10x4 stem over a 49x10 MFCC map); `canonical` keeps one spelling for each, so a square (3, 3) is 3. It is the unit every cost model prices, so the same vocabulary describes an
`Architecture`, a supernet candidate and a `.tflite` file read back from disk.

`op_features` is written with plain arithmetic so it works on Python numbers and on JAX arrays alike: in the
search the channel counts are expectations under the channel gates, and the features must stay differentiable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

# TFLite builtin operator names (lower case) that a cost model may be asked about.
CONV_2D = "conv_2d"
DEPTHWISE_CONV_2D = "depthwise_conv_2d"
FULLY_CONNECTED = "fully_connected"
ADD = "add"
AVERAGE_POOL_2D = "average_pool_2d"
MAX_POOL_2D = "max_pool_2d"
RESHAPE = "reshape"
SOFTMAX = "softmax"

OP_TYPES = (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, AVERAGE_POOL_2D, MAX_POOL_2D, RESHAPE, SOFTMAX)

# Feature names, in the order `op_features` returns them. A cost model is linear in these per op type.
FEATURES = ("macs", "weight_bytes", "activation_bytes", "constant")


def out_size(size: int, stride: int) -> int:
  """Spatial output size of a SAME-padded op (what TFLite and the exporter use)."""
  return -(-size // stride)


def pair(value) -> tuple[int, int]:
  """(h, w) of a kernel or stride given as an int (square) or a pair."""
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise ValueError(f"a kernel or stride is an int or an (h, w) pair, got {value!r}")
    return int(value[0]), int(value[1])
  return int(value), int(value)


def canonical(value):
  """The one spelling of a kernel or stride: an int when square, else an (h, w) tuple."""
  h, w = pair(value)
  return h if h == w else (h, w)


def spelled(value) -> str:
  """'3' or '10x4', for names and messages."""
  h, w = pair(value)
  return str(h) if h == w else f"{h}x{w}"


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """One int8 operator. `in_c`/`out_c` may be fractional only inside the search (expected channels)."""
  op: str
  in_h: int
  in_w: int
  in_c: int
  out_c: int
  kernel: int = 1
  stride: int = 1
  layer: str = ""  # where it came from, for per-operator reports

  def __post_init__(self):
    if self.op not in OP_TYPES:
      raise ValueError(f"unknown operator type {self.op!r}; expected one of {', '.join(OP_TYPES)}")
    object.__setattr__(self, "kernel", canonical(self.kernel))
    object.__setattr__(self, "stride", canonical(self.stride))

  @property
  def out_h(self) -> int:
    return out_size(self.in_h, pair(self.stride)[0])

  @property
  def out_w(self) -> int:
    return out_size(self.in_w, pair(self.stride)[1])

  def features(self) -> tuple:
    return op_features(self.op, self.in_h, self.in_w, self.in_c, self.out_c, self.kernel, self.stride)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def op_counts(op: str, in_h, in_w, in_c, out_c, kernel, stride) -> dict[str, Any]:
  """MACs, int8 weight count, int32 bias count and activation element counts of one operator.

  Global average pooling is an AVERAGE_POOL_2D whose kernel covers the whole input (kernel >= in_h x in_w).
  """
  (kh, kw), (sh, sw) = pair(kernel), pair(stride)
  oh, ow = out_size(in_h, sh), out_size(in_w, sw)
  if op == CONV_2D:
    macs = oh * ow * out_c * kh * kw * in_c
    weights, biases = kh * kw * in_c * out_c, out_c
  elif op == DEPTHWISE_CONV_2D:
    macs = oh * ow * in_c * kh * kw
    weights, biases = kh * kw * in_c, in_c
  elif op == FULLY_CONNECTED:
    macs = in_h * in_w * in_c * out_c
    weights, biases = in_h * in_w * in_c * out_c, out_c
    oh = ow = 1
  elif op == ADD:
    macs, weights, biases = oh * ow * out_c, 0, 0
  elif op in (AVERAGE_POOL_2D, MAX_POOL_2D):
    if kh >= in_h and kw >= in_w:  # global pooling
      oh = ow = 1
    macs, weights, biases = oh * ow * in_c * kh * kw, 0, 0
  elif op in (RESHAPE, SOFTMAX):
    macs, weights, biases = in_h * in_w * in_c, 0, 0
  else:
    raise ValueError(f"unknown operator type {op!r}; expected one of {', '.join(OP_TYPES)}")
  in_elems = in_h * in_w * in_c * (2 if op == ADD else 1)  # ADD reads two inputs
  out_elems = oh * ow * out_c
  return dict(macs=macs, weights=weights, biases=biases, in_elems=in_elems, out_elems=out_elems)


def op_features(op: str, in_h, in_w, in_c, out_c, kernel=1, stride=1) -> tuple:
  """(macs, weight_bytes, activation_bytes, 1) for a cost model; int8 weights, int32 biases, int8 activations."""
  c = op_counts(op, in_h, in_w, in_c, out_c, kernel, stride)
  return (c["macs"], c["weights"] + 4 * c["biases"], c["in_elems"] + c["out_elems"], 1.0)


def mbconv_ops(in_h: int, in_w: int, in_c, hidden, out_c, kernel: int, stride: int, expand: bool,
               residual: bool, layer: str = "") -> list[OpSpec]:
  """The operators of an inverted-residual block: [1x1 expand] -> kxk depthwise -> 1x1 project [-> add].

  `hidden` is the number of channels the depthwise works on (in_c when there is no expansion).
  """
  ops = []
  if expand:
    ops.append(OpSpec(CONV_2D, in_h, in_w, in_c, hidden, 1, 1, f"{layer}/expand"))
  ops.append(OpSpec(DEPTHWISE_CONV_2D, in_h, in_w, hidden, hidden, kernel, stride, f"{layer}/depthwise"))
  oh, ow = out_size(in_h, pair(stride)[0]), out_size(in_w, pair(stride)[1])
  ops.append(OpSpec(CONV_2D, oh, ow, hidden, out_c, 1, 1, f"{layer}/project"))
  if residual:
    ops.append(OpSpec(ADD, oh, ow, out_c, out_c, 1, 1, f"{layer}/add"))
  return ops


def total_macs(ops) -> float:
  return sum(op_counts(o.op, o.in_h, o.in_w, o.in_c, o.out_c, o.kernel, o.stride)["macs"] for o in ops)
