"""The search space: the backbone, the searchable layers and their candidate ops.

A search space is a MobileNetV2-like backbone: a stem conv, then stages of searchable layers, then an optional
1x1 head conv, global average pooling and a classifier. Every searchable layer chooses one candidate op:
an inverted-residual block (MBConv) with kernel k and expansion e, or `skip` where input and output shapes match.
Inside an expanding block, channel gates decide how many of the expanded channels survive.

`SearchSpace.architecture` turns one choice per layer into the discrete network, an `architecture.Architecture`.

Kernels and strides are an int (square) or an (h, w) pair anywhere in the space: the stem (DS-CNN's 10x4 over a
49x10 MFCC map), a stage's stride (e.g. (2, 1) to downsample time only) and the candidate kernels (e.g. (5, 3)).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from edgenas import architecture as arch_lib
from edgenas import ops as ops_lib


class SpaceError(ValueError):
  """A search space that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One choice of a searchable layer."""
  op: str  # arch_lib.MBCONV or arch_lib.SKIP
  kernel: int | tuple[int, int] = 0
  expansion: int = 0

  @property
  def name(self) -> str:
    return arch_lib.SKIP if self.op == arch_lib.SKIP else f"k{ops_lib.spelled(self.kernel)}e{self.expansion}"


@dataclasses.dataclass(frozen=True)
class LayerSlot:
  """A searchable layer with its fixed geometry and its candidates."""
  index: int
  in_h: int
  in_w: int
  in_channels: int
  out_channels: int
  stride: int | tuple[int, int]
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
  stem_kernel: int | tuple[int, int]
  stem_stride: int | tuple[int, int]
  stages: tuple[tuple[int, int, int | tuple[int, int]], ...]  # (layers, channels, stride)
  kernels: tuple[int | tuple[int, int], ...]
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
         _size(f"space.stages[{i}].stride", _field(s, "stride", f"space.stages[{i}]")))
        for i, s in enumerate(get("stages")))
    space = cls(
        input_shape=tuple(int(x) for x in get("input_shape")),
        num_classes=int(get("num_classes")),
        stem_channels=int(_field(stem, "channels", "space.stem")),
        stem_kernel=_size("space.stem.kernel", _field(stem, "kernel", "space.stem")),
        stem_stride=_size("space.stem.stride", _field(stem, "stride", "space.stem")),
        stages=stages,
        kernels=tuple(_size("space.kernels", k) for k in get("kernels")),
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
    for side in ops_lib.pair(self.stem_kernel):  # any positive size: DS-CNN's stem is 10x4
      _positive("space.stem.kernel", side)
    _check_stride("space.stem.stride", self.stem_stride)
    if not self.stages:
      raise SpaceError("search space: 'space.stages' is empty; give at least one (layers, channels, stride)")
    for i, (n, c, s) in enumerate(self.stages):
      _positive(f"space.stages[{i}].layers", n)
      _positive(f"space.stages[{i}].channels", c)
      _check_stride(f"space.stages[{i}].stride", s)
    if not self.kernels or not self.expansions:
      raise SpaceError("search space: no candidates: 'space.kernels' and 'space.expansions' must be non-empty")
    for k in self.kernels:
      if any(side < 1 or side % 2 == 0 for side in ops_lib.pair(k)):
        raise SpaceError(f"search space: 'space.kernels' must be positive odd sizes (or (h, w) pairs of them), "
                         f"got {k}")
    for e in self.expansions:
      _positive("space.expansions", e)
    _positive("space.gate_group", self.gate_group)
    _positive("space.channel_divisor", self.channel_divisor)
    if self.head_channels < 0:
      raise SpaceError(f"search space: 'space.head_channels' must be >= 0, got {self.head_channels}")
    h, w = _strided(self.input_shape[0], self.input_shape[1], self.stem_stride)
    for i, (_, _, s) in enumerate(self.stages):
      # A stride larger than the map would leave nothing to convolve (per axis: (2, 1) only needs height).
      sh, sw = ops_lib.pair(s)
      if (sh > 1 and h < 2) or (sw > 1 and w < 2):
        raise SpaceError(f"search space: spatial size falls below 1 at 'space.stages[{i}].stride'={s} "
                         f"(map is {h}x{w} there); lower the stride or enlarge 'space.input_shape'")
      h, w = _strided(h, w, s)

  @property
  def mbconv_candidates(self) -> tuple[Candidate, ...]:
    return tuple(Candidate(arch_lib.MBCONV, k, e) for k in self.kernels for e in self.expansions)

  def slots(self) -> list[LayerSlot]:
    """The searchable layers with their geometry; skip is offered only where shapes allow it."""
    h, w = _strided(self.input_shape[0], self.input_shape[1], self.stem_stride)
    c = self.stem_channels
    out = []
    for n, ch, s in self.stages:
      for j in range(n):
        stride = s if j == 0 else 1
        cands = self.mbconv_candidates
        if self.allow_skip and stride == 1 and c == ch:
          cands = cands + (Candidate(arch_lib.SKIP),)
        out.append(LayerSlot(len(out), h, w, c, ch, stride, cands))
        (h, w), c = _strided(h, w, stride), ch
    return out

  def max_candidates(self) -> int:
    return max(len(s.candidates) for s in self.slots())

  def round_channels(self, channels: float) -> int:
    d = self.channel_divisor
    return max(d, int(-(-round(channels) // d) * d))

  def architecture(self, choices: Sequence[int], hidden: Sequence[int | None], name: str = ""
                   ) -> arch_lib.Architecture:
    """The discrete network that picks candidate `choices[i]` with `hidden[i]` expanded channels per layer."""
    slots = self.slots()
    if len(choices) != len(slots) or len(hidden) != len(slots):
      raise SpaceError(f"expected {len(slots)} choices, got {len(choices)}")
    layers = []
    for slot, ci, hid in zip(slots, choices, hidden):
      cand = slot.candidates[ci]
      if cand.op == arch_lib.SKIP:
        layers.append(arch_lib.Layer(arch_lib.SKIP, slot.in_channels, slot.out_channels, 1))
      else:
        hid = slot.in_channels if cand.expansion == 1 else int(hid)
        layers.append(arch_lib.Layer(arch_lib.MBCONV, slot.in_channels, slot.out_channels, slot.stride, cand.kernel,
                                     cand.expansion, hid))
    stem = arch_lib.Stem(self.stem_channels, self.stem_kernel, self.stem_stride)
    return arch_lib.Architecture(self.input_shape, self.num_classes, stem, tuple(layers), self.head_channels, name)


def _field(m, name, where):
  try:
    return m[name]
  except (KeyError, TypeError):
    raise SpaceError(f"search space: missing field '{where}.{name}'") from None


def _size(name, value):
  """A kernel or stride from a config: an int or an (h, w) pair of ints, in its one spelling."""
  if isinstance(value, bool) or not (isinstance(value, int) or (
      isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in value))):
    raise SpaceError(f"search space: '{name}' must be an integer or an (h, w) pair of integers, got {value!r}")
  return ops_lib.canonical(value)


def _strided(h: int, w: int, stride) -> tuple[int, int]:
  sh, sw = ops_lib.pair(stride)
  return ops_lib.out_size(h, sh), ops_lib.out_size(w, sw)


def _check_stride(name, value):
  # A derived network must load as an arch.json, which takes only the strides the operator tables measure.
  if any(side not in arch_lib.STRIDES for side in ops_lib.pair(value)):
    raise SpaceError(f"search space: '{name}' must be {' or '.join(map(str, arch_lib.STRIDES))} (or an (h, w) pair "
                     f"of them), got {value!r}")


def _positive(name, value):
  if not isinstance(value, (int, float)) or value < 1:
    raise SpaceError(f"search space: '{name}' must be a positive integer, got {value!r}")
