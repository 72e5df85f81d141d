"""The search space and the derived, discrete network (`Architecture`).

A search space is a MobileNetV2-like backbone: a stem conv, then stages of searchable layers, then an optional
1x1 head conv, global average pooling and a classifier. Every searchable layer chooses one candidate op:
an inverted-residual block (MBConv) with kernel k and expansion e, or `skip` where input and output shapes match.
Inside an expanding block, channel gates decide how many of the expanded channels survive.

`Architecture` is what the search produces and everything downstream (energy, retraining, export) reads:
plain data, JSON in and out (`arch.json`, versioned), with shape inference, MACs, parameters, int8 weight bytes
and the peak live activation bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

from edgenas import ops as ops_lib

ARCH_VERSION = 1
SKIP = "skip"
MBCONV = "mbconv"


class SpaceError(ValueError):
  """A search space or architecture that cannot work; the message names the field."""


# --------------------------------------------------------------------------------------------------------------
# Search space


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One choice of a searchable layer."""
  op: str  # MBCONV or SKIP
  kernel: int = 0
  expansion: int = 0

  @property
  def name(self) -> str:
    return SKIP if self.op == SKIP else f"k{self.kernel}e{self.expansion}"


@dataclasses.dataclass(frozen=True)
class LayerSlot:
  """A searchable layer with its fixed geometry and its candidates."""
  index: int
  in_h: int
  in_w: int
  in_channels: int
  out_channels: int
  stride: int
  candidates: tuple[Candidate, ...]

  @property
  def residual_ok(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels

  def hidden_max(self, cand: Candidate) -> int:
    return self.in_channels * cand.expansion


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  input_shape: tuple[int, int, int]
  num_classes: int
  stem_channels: int
  stem_kernel: int
  stem_stride: int
  stages: tuple[tuple[int, int, int], ...]  # (layers, channels, stride)
  kernels: tuple[int, ...]
  expansions: tuple[int, ...]
  allow_skip: bool
  gate_group: int  # expanded channels per channel gate (granularity)
  channel_divisor: int  # derived channel counts are rounded up to a multiple of this
  head_channels: int  # 0: no head conv

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "SearchSpace":
    """Builds and validates a space from a config mapping (e.g. `config.space`)."""
    def get(name, default=None):
      if name in cfg:
        return cfg[name]
      if default is None:
        raise SpaceError(f"search space: missing field 'space.{name}'")
      return default

    stem = get("stem")
    stages = tuple(
        (int(_field(s, "layers", f"space.stages[{i}]")), int(_field(s, "channels", f"space.stages[{i}]")),
         int(_field(s, "stride", f"space.stages[{i}]"))) for i, s in enumerate(get("stages")))
    space = cls(
        input_shape=tuple(int(x) for x in get("input_shape")),
        num_classes=int(get("num_classes")),
        stem_channels=int(_field(stem, "channels", "space.stem")),
        stem_kernel=int(_field(stem, "kernel", "space.stem")),
        stem_stride=int(_field(stem, "stride", "space.stem")),
        stages=stages,
        kernels=tuple(int(k) for k in get("kernels")),
        expansions=tuple(int(e) for e in get("expansions")),
        allow_skip=bool(get("allow_skip", True)),
        gate_group=int(get("gate_group", 4)),
        channel_divisor=int(get("channel_divisor", 4)),
        head_channels=int(get("head_channels", 0) or 0),
    )
    space.validate()
    return space

  def validate(self) -> None:
    if len(self.input_shape) != 3 or any(d < 1 for d in self.input_shape):
      raise SpaceError(f"search space: 'space.input_shape' must be (H, W, C) with positive sizes, got "
                       f"{self.input_shape}")
    _positive("space.num_classes", self.num_classes)
    if self.num_classes < 2:
      raise SpaceError(f"search space: 'space.num_classes' must be at least 2, got {self.num_classes}")
    _positive("space.stem.channels", self.stem_channels)
    _positive("space.stem.kernel", self.stem_kernel)
    _positive("space.stem.stride", self.stem_stride)
    if not self.stages:
      raise SpaceError("search space: 'space.stages' is empty; give at least one (layers, channels, stride)")
    for i, (n, c, s) in enumerate(self.stages):
      _positive(f"space.stages[{i}].layers", n)
      _positive(f"space.stages[{i}].channels", c)
      _positive(f"space.stages[{i}].stride", s)
    if not self.kernels or not self.expansions:
      raise SpaceError("search space: no candidates: 'space.kernels' and 'space.expansions' must be non-empty")
    for k in self.kernels:
      if k < 1 or k % 2 == 0:
        raise SpaceError(f"search space: 'space.kernels' must be positive odd sizes, got {k}")
    for e in self.expansions:
      _positive("space.expansions", e)
    _positive("space.gate_group", self.gate_group)
    _positive("space.channel_divisor", self.channel_divisor)
    if self.head_channels < 0:
      raise SpaceError(f"search space: 'space.head_channels' must be >= 0, got {self.head_channels}")
    h, w = self.input_shape[0], self.input_shape[1]
    h, w = ops_lib.out_size(h, self.stem_stride), ops_lib.out_size(w, self.stem_stride)
    for i, (_, _, s) in enumerate(self.stages):
      # A stride larger than the map would leave nothing to convolve.
      if s > 1 and (h < 2 or w < 2):
        raise SpaceError(f"search space: spatial size falls below 1 at 'space.stages[{i}].stride'={s} "
                         f"(map is {h}x{w} there); lower the stride or enlarge 'space.input_shape'")
      h, w = ops_lib.out_size(h, s), ops_lib.out_size(w, s)

  @property
  def mbconv_candidates(self) -> tuple[Candidate, ...]:
    return tuple(Candidate(MBCONV, k, e) for k in self.kernels for e in self.expansions)

  def slots(self) -> list[LayerSlot]:
    """The searchable layers with their geometry; skip is offered only where shapes allow it."""
    h = ops_lib.out_size(self.input_shape[0], self.stem_stride)
    w = ops_lib.out_size(self.input_shape[1], self.stem_stride)
    c = self.stem_channels
    out = []
    for n, ch, s in self.stages:
      for j in range(n):
        stride = s if j == 0 else 1
        cands = self.mbconv_candidates
        if self.allow_skip and stride == 1 and c == ch:
          cands = cands + (Candidate(SKIP),)
        out.append(LayerSlot(len(out), h, w, c, ch, stride, cands))
        h, w, c = ops_lib.out_size(h, stride), ops_lib.out_size(w, stride), ch
    return out

  def max_candidates(self) -> int:
    return max(len(s.candidates) for s in self.slots())

  def round_channels(self, channels: float) -> int:
    d = self.channel_divisor
    return max(d, int(-(-round(channels) // d) * d))

  def architecture(self, choices: Sequence[int], hidden: Sequence[int | None], name: str = "") -> "Architecture":
    """The discrete network that picks candidate `choices[i]` with `hidden[i]` expanded channels per layer."""
    slots = self.slots()
    if len(choices) != len(slots) or len(hidden) != len(slots):
      raise SpaceError(f"expected {len(slots)} choices, got {len(choices)}")
    layers = []
    for slot, ci, hid in zip(slots, choices, hidden):
      cand = slot.candidates[ci]
      if cand.op == SKIP:
        layers.append(Layer(SKIP, slot.in_channels, slot.out_channels, 1))
      else:
        hid = slot.in_channels if cand.expansion == 1 else int(hid)
        layers.append(Layer(MBCONV, slot.in_channels, slot.out_channels, slot.stride, cand.kernel, cand.expansion,
                            hid))
    return Architecture(self.input_shape, self.num_classes, Stem(self.stem_channels, self.stem_kernel,
                                                                 self.stem_stride), tuple(layers),
                        self.head_channels, name)


def _field(m, name, where):
  try:
    return m[name]
  except (KeyError, TypeError):
    raise SpaceError(f"search space: missing field '{where}.{name}'") from None


def _positive(name, value):
  if not isinstance(value, (int, float)) or value < 1:
    raise SpaceError(f"search space: '{name}' must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Architecture


@dataclasses.dataclass(frozen=True)
class Stem:
  channels: int
  kernel: int
  stride: int


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a derived network. `hidden` is the depthwise width (expanded channels after gating)."""
  op: str
  in_channels: int
  out_channels: int
  stride: int
  kernel: int = 0
  expansion: int = 0
  hidden: int = 0

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
        "stem": dataclasses.asdict(self.stem),
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
    def need(m, key, where, kind=None):
      if not isinstance(m, Mapping) or key not in m:
        raise SpaceError(f"{source}: missing field '{where}{key}'")
      v = m[key]
      if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise SpaceError(f"{source}: field '{where}{key}' must be an integer, got {v!r}")
      return v

    version = need(d, "version", "")
    if version != ARCH_VERSION:
      raise SpaceError(f"{source}: unsupported 'version' {version!r}; this edgenas reads version {ARCH_VERSION}")
    shape = need(d, "input_shape", "")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(isinstance(x, int) for x in shape):
      raise SpaceError(f"{source}: field 'input_shape' must be [H, W, C] integers, got {shape!r}")
    stem = need(d, "stem", "")
    layers_raw = need(d, "layers", "")
    if not isinstance(layers_raw, list):
      raise SpaceError(f"{source}: field 'layers' must be a list")
    layers = []
    for i, l in enumerate(layers_raw):
      where = f"layers[{i}]."
      op = need(l, "op", where)
      if op not in (MBCONV, SKIP):
        raise SpaceError(f"{source}: field '{where}op' must be '{MBCONV}' or '{SKIP}', got {op!r}")
      fields = dict(op=op, in_channels=need(l, "in_channels", where, int),
                    out_channels=need(l, "out_channels", where, int), stride=need(l, "stride", where, int))
      if op == MBCONV:
        fields.update(kernel=need(l, "kernel", where, int), expansion=need(l, "expansion", where, int),
                      hidden=need(l, "hidden", where, int))
      layers.append(Layer(**fields))
    try:
      return cls(tuple(shape), need(d, "num_classes", "", int),
                 Stem(need(stem, "channels", "stem.", int), need(stem, "kernel", "stem.", int),
                      need(stem, "stride", "stem.", int)),
                 tuple(layers), int(d.get("head_channels", 0)), str(d.get("name", "")))
    except SpaceError as e:
      raise SpaceError(f"{source}: {e}") from None

  @classmethod
  def load(cls, path: str) -> "Architecture":
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise SpaceError(f"{path}: no such arch.json") from None
    except json.JSONDecodeError as e:
      raise SpaceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
      raise SpaceError(f"{path}: expected a JSON object")
    return cls.from_dict(d, source=path)

  def hash(self) -> str:
    """Identity of the network (name excluded): equal hashes mean the same computation graph."""
    d = self.to_dict()
    d.pop("name")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

  # ---- checks
  def validate(self) -> None:
    if any(x < 1 for x in self.input_shape):
      raise SpaceError(f"'input_shape' must be positive, got {self.input_shape}")
    if self.num_classes < 2:
      raise SpaceError(f"'num_classes' must be at least 2, got {self.num_classes}")
    for name in ("channels", "kernel", "stride"):
      if getattr(self.stem, name) < 1:
        raise SpaceError(f"'stem.{name}' must be positive, got {getattr(self.stem, name)}")
    c = self.stem.channels
    for i, l in enumerate(self.layers):
      if l.in_channels != c:
        raise SpaceError(f"'layers[{i}].in_channels' is {l.in_channels} but the previous layer gives {c}")
      if l.out_channels < 1 or l.stride < 1:
        raise SpaceError(f"'layers[{i}]' needs positive out_channels and stride")
      if l.op == SKIP and (l.stride != 1 or l.in_channels != l.out_channels):
        raise SpaceError(f"'layers[{i}]' is a skip but changes the shape")
      if l.op == MBCONV:
        if l.kernel < 1 or l.kernel % 2 == 0:
          raise SpaceError(f"'layers[{i}].kernel' must be a positive odd size, got {l.kernel}")
        if l.expansion < 1 or l.hidden < 1:
          raise SpaceError(f"'layers[{i}]' needs positive expansion and hidden, got {l.expansion}, {l.hidden}")
        if l.expansion == 1 and l.hidden != l.in_channels:
          raise SpaceError(f"'layers[{i}].hidden' must equal in_channels when expansion is 1")
      c = l.out_channels
    if self.head_channels < 0:
      raise SpaceError(f"'head_channels' must be >= 0, got {self.head_channels}")

  # ---- accounting
  def feature_shapes(self) -> list[tuple[int, int, int]]:
    """(H, W, C) after the stem and after every layer."""
    h = ops_lib.out_size(self.input_shape[0], self.stem.stride)
    w = ops_lib.out_size(self.input_shape[1], self.stem.stride)
    shapes = [(h, w, self.stem.channels)]
    for l in self.layers:
      h, w = ops_lib.out_size(h, l.stride), ops_lib.out_size(w, l.stride)
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
    out.append(ops_lib.OpSpec(ops_lib.AVERAGE_POOL_2D, h, w, c, c, max(h, w), max(h, w), "pool"))
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


def _layer_dict(l: Layer) -> dict[str, Any]:
  d = dict(op=l.op, in_channels=l.in_channels, out_channels=l.out_channels, stride=l.stride)
  if l.op == MBCONV:
    d.update(kernel=l.kernel, expansion=l.expansion, hidden=l.hidden)
  return d


def _layer_name(l: Layer) -> str:
  return SKIP if l.op == SKIP else f"k{l.kernel}e{l.expansion}:{l.hidden}"
