"""The derived network: the plain, versioned description of one discrete network that every downstream stage reads.

An `Architecture` is what a search derives (or a baseline builds) and what energy estimation, retraining,
quantisation and export read: a stem conv, a sequence of layers (an inverted-residual block (MBConv) with its kernel,
expansion and surviving depthwise width, or `skip`), an optional 1x1 head conv, global average pooling and a
classifier. It is plain data, JSON in and out (`arch.json`, versioned), with shape inference, MACs, parameters, int8
weight bytes and the peak live activation bytes.

Kernels and strides are an int when square, or an [h, w] pair when not (`edgenas.ops.canonical`): DS-CNN's stem
is a 10x4 kernel with stride 2 over a 49x10 MFCC map, and a layer may downsample time only with stride [2, 1].
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

from edgenas import ops as ops_lib

ARCH_VERSION = 1
SKIP = "skip"
MBCONV = "mbconv"
STRIDES = (1, 2)  # the strides the platforms' operator tables are measured at
# The arch.json schema: every field at every level (anything else is refused); `name` and `head_channels` are
# optional on reading.
TOP_FIELDS = ("version", "name", "input_shape", "num_classes", "stem", "layers", "head_channels")
STEM_FIELDS = ("channels", "kernel", "stride")
LAYER_FIELDS = {MBCONV: ("op", "in_channels", "out_channels", "stride", "kernel", "expansion", "hidden"),
                SKIP: ("op", "in_channels", "out_channels", "stride")}


class ArchitectureError(ValueError):
  """An architecture (or arch.json) that cannot work; the message names the field."""


def _canonical_fields(obj, *names) -> None:
  """Stores each kernel/stride field in its one spelling (int when square), so equality and hashes agree."""
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
      object.__setattr__(obj, name, ops_lib.canonical(value))


@dataclasses.dataclass(frozen=True)
class Stem:
  channels: int
  kernel: int | tuple[int, int]
  stride: int | tuple[int, int]

  def __post_init__(self):
    _canonical_fields(self, "kernel", "stride")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a derived network. `hidden` is the depthwise width (expanded channels after gating)."""
  op: str
  in_channels: int
  out_channels: int
  stride: int | tuple[int, int]
  kernel: int | tuple[int, int] = 0
  expansion: int = 0
  hidden: int = 0

  def __post_init__(self):
    _canonical_fields(self, "kernel", "stride")

  @property
  def residual(self) -> bool:
    return self.op == MBCONV and self.stride == 1 and self.in_channels == self.out_channels

  @property
  def expand(self) -> bool:
    return self.op == MBCONV and self.expansion != 1


@dataclasses.dataclass(frozen=True)
class Architecture:
  input_shape: tuple[int, int, int]
  num_classes: int
  stem: Stem
  layers: tuple[Layer, ...]
  head_channels: int = 0
  name: str = ""

  def __post_init__(self):
    self.validate()

  # ---- serialisation
  def to_dict(self) -> dict[str, Any]:
    return {
        "version": ARCH_VERSION,
        "name": self.name,
        "input_shape": list(self.input_shape),
        "num_classes": self.num_classes,
        "stem": {k: _jsonable(v) for k, v in dataclasses.asdict(self.stem).items()},
        "layers": [_layer_dict(l) for l in self.layers],
        "head_channels": self.head_channels,
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def save(self, path: str) -> None:
    """Writes atomically, so a crash never leaves a half-written arch.json."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.write(self.to_json() + "\n")
    os.replace(tmp, path)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = "arch.json") -> "Architecture":
    """The architecture an arch.json dict describes. Strict: a missing, mistyped or unknown field at any level is
    refused with its path, so a typo such as `kernal` cannot pass as a default."""
    def fail(message):
      raise ArchitectureError(f"{source}: {message}")

    def fields(m, known, where):
      if not isinstance(m, Mapping):
        fail(f"field '{where or 'arch'}' must be an object, got {m!r}")
      unknown = [k for k in m if k not in known]
      if unknown:
        fail(f"{where + ': ' if where else ''}unknown field {unknown[0]!r} (known: {', '.join(known)})")

    def need(m, key, where, kind=None):
      if key not in m:
        fail(f"missing field '{where}{key}'")
      v = m[key]
      if kind is int and not _is_int(v):
        fail(f"field '{where}{key}' must be an integer, got {v!r}")
      if kind == "size":
        if not (_is_int(v) or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v))):
          fail(f"field '{where}{key}' must be an integer or an [h, w] pair of integers, got {v!r}")
        return ops_lib.canonical(v)
      return v

    fields(d, TOP_FIELDS, "")
    version = need(d, "version", "")
    if not _is_int(version) or version != ARCH_VERSION:
      fail(f"unsupported 'version' {version!r}; this edgenas reads version {ARCH_VERSION}")
    name = d.get("name", "")
    if not isinstance(name, str):
      fail(f"field 'name' must be a string, got {name!r}")
    shape = need(d, "input_shape", "")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_int(x) for x in shape):
      fail(f"field 'input_shape' must be [H, W, C] integers, got {shape!r}")
    num_classes = need(d, "num_classes", "", int)
    stem_raw = need(d, "stem", "")
    fields(stem_raw, STEM_FIELDS, "stem")
    stem = Stem(*(need(stem_raw, k, "stem.", int if k == "channels" else "size") for k in STEM_FIELDS))
    layers_raw = need(d, "layers", "")
    if not isinstance(layers_raw, list):
      fail(f"field 'layers' must be a list, got {layers_raw!r}")
    layers = []
    for i, l in enumerate(layers_raw):
      where = f"layers[{i}]"
      fields(l, LAYER_FIELDS[MBCONV], where)
      op = need(l, "op", f"{where}.")
      if op not in LAYER_FIELDS:
        fail(f"field '{where}.op' must be '{MBCONV}' or '{SKIP}', got {op!r}")
      if op == SKIP:  # a skip has no kernel, expansion or width: such a field is a mistake, not a default
        fields(l, LAYER_FIELDS[SKIP], f"{where} (a skip)")
      layers.append(Layer(**{k: need(l, k, f"{where}.", _FIELD_KINDS.get(k, int)) for k in LAYER_FIELDS[op]}))
    head = d.get("head_channels", 0)
    if not _is_int(head):
      fail(f"field 'head_channels' must be an integer, got {head!r}")
    try:
      return cls(tuple(shape), num_classes, stem, tuple(layers), head, name)
    except ArchitectureError as e:
      raise ArchitectureError(f"{source}: {e}") from None

  @classmethod
  def load(cls, path: str) -> "Architecture":
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise ArchitectureError(f"{path}: no such arch.json") from None
    except json.JSONDecodeError as e:
      raise ArchitectureError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
      raise ArchitectureError(f"{path}: expected a JSON object")
    return cls.from_dict(d, source=path)

  def hash(self) -> str:
    """Identity of the network (name excluded): equal hashes mean the same computation graph."""
    d = self.to_dict()
    d.pop("name")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

  # ---- checks
  def validate(self) -> None:
    """Refuses a network that cannot be built, naming the field: bad sizes, a broken channel chain, a skip that
    changes the shape, a width the expansion cannot give."""
    if len(self.input_shape) != 3 or any(x < 1 for x in self.input_shape):
      raise ArchitectureError(f"'input_shape' must be [H, W, C], all positive, got {list(self.input_shape)}")
    if self.num_classes < 2:
      raise ArchitectureError(f"'num_classes' must be at least 2, got {self.num_classes}")
    if self.stem.channels < 1:
      raise ArchitectureError(f"'stem.channels' must be positive, got {self.stem.channels}")
    _check_kernel("stem.kernel", self.stem.kernel, odd=False)  # DS-CNN's stem is 10x4
    _check_stride("stem.stride", self.stem.stride)
    if not self.layers:
      raise ArchitectureError("'layers' is empty: a network needs at least one layer (every search space and "
                              "baseline has one)")
    c = self.stem.channels
    for i, l in enumerate(self.layers):
      where = f"layers[{i}]"
      if l.in_channels != c:
        raise ArchitectureError(f"'{where}.in_channels' is {l.in_channels} but the previous layer gives {c}")
      if l.out_channels < 1:
        raise ArchitectureError(f"'{where}.out_channels' must be positive, got {l.out_channels}")
      _check_stride(f"{where}.stride", l.stride)
      if l.op == SKIP and (l.stride != 1 or l.in_channels != l.out_channels):
        raise ArchitectureError(f"'{where}' is a skip but changes the shape (stride {l.stride}, {l.in_channels} -> "
                                f"{l.out_channels} channels); a skip needs stride 1 and equal channels")
      if l.op == MBCONV:
        _check_kernel(f"{where}.kernel", l.kernel)
        if l.expansion < 1:
          raise ArchitectureError(f"'{where}.expansion' must be positive, got {l.expansion}")
        if l.hidden < 1:
          raise ArchitectureError(f"'{where}.hidden' must be positive, got {l.hidden}")
        if l.expansion == 1 and l.hidden != l.in_channels:
          raise ArchitectureError(f"'{where}.hidden' must equal in_channels when expansion is 1")
        if l.hidden > l.in_channels * l.expansion:
          raise ArchitectureError(f"'{where}.hidden' is {l.hidden} but in_channels x expansion = {l.in_channels} x "
                                  f"{l.expansion} gives at most {l.in_channels * l.expansion}")
      elif l.op != SKIP:
        raise ArchitectureError(f"'{where}.op' must be '{MBCONV}' or '{SKIP}', got {l.op!r}")
      c = l.out_channels
    if self.head_channels < 0:
      raise ArchitectureError(f"'head_channels' must be >= 0, got {self.head_channels}")

  # ---- accounting
  def feature_shapes(self) -> list[tuple[int, int, int]]:
    """(H, W, C) after the stem and after every layer."""
    sh, sw = ops_lib.pair(self.stem.stride)
    h, w = ops_lib.out_size(self.input_shape[0], sh), ops_lib.out_size(self.input_shape[1], sw)
    shapes = [(h, w, self.stem.channels)]
    for l in self.layers:
      sh, sw = ops_lib.pair(l.stride)
      h, w = ops_lib.out_size(h, sh), ops_lib.out_size(w, sw)
      shapes.append((h, w, l.out_channels))
    return shapes

  def ops(self) -> list[ops_lib.OpSpec]:
    """The int8 operators the exported model runs, in execution order."""
    H, W, C = self.input_shape
    out = [ops_lib.OpSpec(ops_lib.CONV_2D, H, W, C, self.stem.channels, self.stem.kernel, self.stem.stride,
                          "stem")]
    shapes = self.feature_shapes()
    for i, l in enumerate(self.layers):
      h, w, c = shapes[i]
      if l.op == MBCONV:
        out += ops_lib.mbconv_ops(h, w, c, l.hidden, l.out_channels, l.kernel, l.stride, l.expand, l.residual,
                                  f"layers[{i}]")
    h, w, c = shapes[-1]
    if self.head_channels:
      out.append(ops_lib.OpSpec(ops_lib.CONV_2D, h, w, c, self.head_channels, 1, 1, "head"))
      c = self.head_channels
    out.append(ops_lib.OpSpec(ops_lib.AVERAGE_POOL_2D, h, w, c, c, (h, w), (h, w), "pool"))  # global: one window
    out.append(ops_lib.OpSpec(ops_lib.FULLY_CONNECTED, 1, 1, c, self.num_classes, 1, 1, "classifier"))
    return out

  def macs(self) -> int:
    return int(ops_lib.total_macs(self.ops()))

  def params(self) -> int:
    """Trainable parameters of the deployed (BN-folded) network: weights plus biases."""
    total = 0
    for o in self.ops():
      c = ops_lib.op_counts(o.op, o.in_h, o.in_w, o.in_c, o.out_c, o.kernel, o.stride)
      total += c["weights"] + c["biases"]
    return total

  def weight_bytes(self) -> int:
    """int8 weights plus int32 biases."""
    return int(sum(o.features()[1] for o in self.ops()))

  def activation_bytes_per_op(self) -> list[int]:
    """Live int8 activation bytes while each operator runs: its input(s), its output, and a block input that a
    residual add still needs. The largest of these is the peak SRAM the activations need."""
    live = []
    H, W, C = self.input_shape
    stem = self.ops()[0]
    live.append(H * W * C + stem.out_h * stem.out_w * stem.out_c)
    shapes = self.feature_shapes()
    for i, l in enumerate(self.layers):
      if l.op != MBCONV:
        continue
      h, w, c = shapes[i]
      block_in = h * w * c
      kept = block_in if l.residual else 0
      oh, ow, oc = shapes[i + 1]
      hid_in, hid_out = h * w * l.hidden, oh * ow * l.hidden
      if l.expand:
        live.append(block_in + hid_in)
        live.append(hid_in + hid_out + kept)
      else:
        live.append(block_in + hid_out)  # depthwise reads the block input itself
      live.append(hid_out + oh * ow * oc + kept)
      if l.residual:
        live.append(2 * oh * ow * oc + oh * ow * oc)
    h, w, c = shapes[-1]
    if self.head_channels:
      live.append(h * w * c + h * w * self.head_channels)
      c = self.head_channels
    live.append(h * w * c + c)
    live.append(c + self.num_classes)
    return live

  def peak_activation_bytes(self) -> int:
    return max(self.activation_bytes_per_op())

  def summary(self) -> dict[str, Any]:
    return dict(hash=self.hash(), layers=[_layer_name(l) for l in self.layers], macs=self.macs(),
                params=self.params(), weight_bytes=self.weight_bytes(),
                peak_activation_bytes=self.peak_activation_bytes())


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


_FIELD_KINDS = {"op": None, "kernel": "size", "stride": "size"}  # the rest are integers


def _sides(value):
  """(h, w) of a kernel or stride, or None when it is neither an int nor a pair of ints."""
  if _is_int(value):
    return value, value
  if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
    return tuple(value)
  return None


def _check_kernel(name: str, k, odd: bool = True) -> None:
  sides = _sides(k)
  if sides is None or min(sides) < 1 or (odd and any(s % 2 == 0 for s in sides)):
    what = "odd " if odd else ""
    raise ArchitectureError(f"'{name}' must be a positive {what}size or an [h, w] pair of them, got {k!r}")


def _check_stride(name: str, s) -> None:
  sides = _sides(s)
  if sides is None or any(side not in STRIDES for side in sides):
    raise ArchitectureError(f"'{name}' must be {' or '.join(map(str, STRIDES))} (or an [h, w] pair of them), "
                            f"got {s!r}")


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


def _layer_dict(l: Layer) -> dict[str, Any]:
  d = dict(op=l.op, in_channels=l.in_channels, out_channels=l.out_channels, stride=_jsonable(l.stride))
  if l.op == MBCONV:
    d.update(kernel=_jsonable(l.kernel), expansion=l.expansion, hidden=l.hidden)
  return d


def _layer_name(l: Layer) -> str:
  return SKIP if l.op == SKIP else f"k{ops_lib.spelled(l.kernel)}e{l.expansion}:{l.hidden}"
