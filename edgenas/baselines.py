"""Hand-designed reference networks, expressed as `Architecture`s so they train, cost and export like a searched one.

`baseline_architectures(input_shape, num_classes)` returns:

- `mobilenetv2_1.0`, `mobilenetv2_0.35`: MobileNetV2 (Sandler et al. 2018) at width multiplier 1.0 and 0.35.
  Blocks (expansion t, channels c, repeats n, stride s) as in the paper's Table 2:
      (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1),
  a 3x3 stem of 32 channels with stride 2, a 1x1 head conv of 1280 channels, global average pooling and the
  classifier. Channels are width x c rounded to a multiple of 8 (never down by more than 10%), as the paper's
  reference code does; the head stays 1280 for widths below 1 (as in the paper).
  Scaled to the input:
    * strides: MobileNetV2 downsamples 32x at five places (stem, and the first block of the 24, 32, 64 and 160
      stages). Only as many of them are kept, counting from the *last*, as leave a final map of at least 1x1:
      k = min(5, floor(log2(min(H, W)))). The earliest ones are dropped first, as the usual CIFAR adaptation of
      MobileNetV2 does (stride-1 stem). 224x224 and 32x32 keep all five; 8x8 (digits) keeps three (the 32, 64
      and 160 stages), so the maps are 8x8 up to the 24 stage, then 4x4, 2x2, and 1x1 for the 160 and 320
      stages and the head.
    * depth: for inputs smaller than 32x32 a reduced-depth variant, repeats (1,1,2,2,1,1,1) instead of
      (1,2,3,4,3,3,1): 9 blocks instead of 17, since a 8x8 map has no room for the features the deep stages
      were sized for, and the full depth would only add cost. 32x32 and larger use the paper's depth.
- `dscnn`: a DS-CNN-like plain depthwise-separable CNN (Zhang et al., "Hello Edge", 2017, DS-CNN-S): a first conv
  of 64 channels, then four
  depthwise-separable blocks of 64 channels, global average pooling and the classifier. In this operator
  vocabulary a depthwise-separable block is an expansion-1 MBConv: 3x3 depthwise + ReLU6, then a 1x1 linear
  projection, with a residual add where the shapes match (MobileNetV2's convention; DS-CNN itself has a ReLU
  after the pointwise conv and no residual). The first conv is MLPerf Tiny's KWS reference stem on a
  time x frequency map (an input taller than wide and at least 10x4, e.g. the 49x10 MFCCs): 10x4 with stride 2x2,
  giving 25x5. On square images it is 3x3, with stride 2 when the input is at least 8x8.
"""
from __future__ import annotations

import math

from edgenas import architecture as arch_lib

MOBILENETV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))
REDUCED_REPEATS = (1, 1, 2, 2, 1, 1, 1)
MOBILENETV2_STEM = 32
MOBILENETV2_HEAD = 1280
DSCNN_CHANNELS = 64
DSCNN_BLOCKS = 4
DSCNN_KWS_STEM = (10, 4)  # MLPerf Tiny's KWS DS-CNN: Conv2D(64, (10, 4), strides=(2, 2), padding="same")
WIDTHS = {"mobilenetv2_1.0": 1.0, "mobilenetv2_0.35": 0.35}
NAMES = tuple(WIDTHS) + ("dscnn",)


class BaselineError(ValueError):
  """An unknown baseline name or an input it cannot be scaled to."""


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds to a multiple of `divisor`, never below it and never more than 10% down (MobileNet's rule)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def _kept_strides(input_shape) -> int:
  side = min(input_shape[0], input_shape[1])
  return min(5, int(math.floor(math.log2(side))))


def mobilenetv2(input_shape, num_classes: int, width: float = 1.0, name: str = "") -> arch_lib.Architecture:
  """MobileNetV2 at `width`, scaled to the input as described in the module docstring."""
  input_shape = tuple(int(d) for d in input_shape)
  kept = _kept_strides(input_shape)
  small = min(input_shape[:2]) < 32
  repeats = REDUCED_REPEATS if small else tuple(b[2] for b in MOBILENETV2_BLOCKS)
  # The five downsampling places in order (stem, then the stride-2 stages); the first 5 - kept become stride 1.
  strides = [2 if i >= 5 - kept else 1 for i in range(5)]
  stem_stride, stage_strides = strides[0], iter(strides[1:])
  stem = arch_lib.Stem(make_divisible(MOBILENETV2_STEM * width), 3, stem_stride)
  layers, c = [], stem.channels
  for (t, ch, _, s), n in zip(MOBILENETV2_BLOCKS, repeats):
    out = make_divisible(ch * width)
    stage_stride = next(stage_strides) if s == 2 else 1
    for j in range(n):
      stride = stage_stride if j == 0 else 1
      layers.append(arch_lib.Layer(arch_lib.MBCONV, c, out, stride, 3, t, c * t))
      c = out
  head = make_divisible(MOBILENETV2_HEAD * width) if width > 1.0 else MOBILENETV2_HEAD
  return arch_lib.Architecture(input_shape, num_classes, stem, tuple(layers), head, name)


def dscnn(input_shape, num_classes: int, name: str = "dscnn") -> arch_lib.Architecture:
  """DS-CNN-like depthwise-separable CNN (see the module docstring)."""
  input_shape = tuple(int(d) for d in input_shape)
  h, w = input_shape[:2]
  if h > w and h >= DSCNN_KWS_STEM[0] and w >= DSCNN_KWS_STEM[1]:  # a spectrogram-like map: the KWS reference
    stem = arch_lib.Stem(DSCNN_CHANNELS, DSCNN_KWS_STEM, 2)
  else:
    stem = arch_lib.Stem(DSCNN_CHANNELS, 3, 2 if min(h, w) >= 8 else 1)
  layers = tuple(arch_lib.Layer(arch_lib.MBCONV, DSCNN_CHANNELS, DSCNN_CHANNELS, 1, 3, 1, DSCNN_CHANNELS)
                 for _ in range(DSCNN_BLOCKS))
  return arch_lib.Architecture(input_shape, num_classes, stem, layers, 0, name)


def baseline_architecture(name: str, input_shape, num_classes: int) -> arch_lib.Architecture:
  """One baseline by name (one of `NAMES`)."""
  if len(tuple(input_shape)) != 3:
    raise BaselineError(f"baseline '{name}': input_shape must be (H, W, C), got {input_shape!r}")
  if name in WIDTHS:
    return mobilenetv2(input_shape, num_classes, WIDTHS[name], name)
  if name == "dscnn":
    return dscnn(input_shape, num_classes, name)
  raise BaselineError(f"unknown baseline '{name}'; choose one of {', '.join(NAMES)}")


def check_names(names) -> None:
  """Refuses unknown baseline names up front, before a long search would reach them."""
  unknown = [n for n in names if n not in NAMES]
  if unknown:
    raise BaselineError(f"unknown baseline(s) {', '.join(map(repr, unknown))} in config.baselines; choose from "
                        f"{', '.join(NAMES)}")


def baseline_architectures(input_shape, num_classes: int, names=NAMES) -> dict[str, arch_lib.Architecture]:
  """{name: Architecture} of the reference networks for this input and number of classes."""
  return {n: baseline_architecture(n, input_shape, num_classes) for n in names}


def final_map(arch: arch_lib.Architecture) -> tuple[int, int]:
  """Spatial size of the last feature map (documents the scaling; also a check for tests)."""
  h, w, _ = arch.feature_shapes()[-1]
  return h, w
