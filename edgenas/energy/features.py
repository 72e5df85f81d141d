"""Regressor features: `edgenas.ops.op_features` with MACs counted the way TFLM's kernels execute them.

TFLM's convolution, depthwise and pooling kernels skip the taps of a SAME-padded window that fall outside the
input, so on small maps a large kernel runs far fewer multiply-accumulates than its nominal count (a 7x7
depthwise on a 4x4 map runs 16 of its 49 taps per output on average). The regressor therefore prices
*executed* MACs: nominal MACs x the fraction of in-bounds taps. The geometry is static (Python numbers), so the
fraction is a constant and the features stay differentiable in the channel counts.

A dense convolution also pays per window tap, not only per MAC: TFLM's reference kernel loops over the input
channels inside each (output pixel, output channel, tap), so a conv with 1-3 input channels costs several times
more per MAC than one with 64 (measured on the host table). `window_taps` (executed MACs / input channels, for
dense convolutions) carries that loop overhead.

Held-out (5-fold) on the host table, conv_2d / depthwise / whole table R² and whole-table MAPE:
  edgenas.ops.op_features (nominal MACs):   0.865 / 0.866 / 0.873, MAPE 29%
  executed MACs:                            0.852 / 0.969 / 0.951, MAPE 27%
  executed MACs + window taps (used):       0.984 / 0.969 / 0.973, MAPE 15%
"""
from __future__ import annotations

import functools

from edgenas import ops as ops_lib

# Kernels that the runtimes run with a code path of their own, so their cost per MAC differs from the op type's
# general kernel: CMSIS-NN's 1x1 convolution (no im2col) and 3x3 depthwise kernel, TFLM's matching fast paths.
# The regressor fits each such regime separately; a profile without it falls back to the op type's coefficients.
SPECIAL_KERNELS = {ops_lib.CONV_2D: (1, "conv_2d_1x1"), ops_lib.DEPTHWISE_CONV_2D: (3, "depthwise_conv_2d_3x3")}
REGIMES = tuple(ops_lib.OP_TYPES) + tuple(name for _, name in SPECIAL_KERNELS.values())
# On a board with an accelerator (edgenas.energy.accelerator), a layer the accelerator cannot run falls back to
# the core's kernels at the core's cost: the same regime, priced by coefficients of its own.
ON_CORE = "_on_core"
ALL_REGIMES = REGIMES + tuple(r + ON_CORE for r in REGIMES)


def regime(op: str, kernel: int, on_core: bool = False) -> str:
  """The cost regime of an operator: its op type, or the special kernel it runs (see SPECIAL_KERNELS); with
  `on_core`, the same run on the core of a board whose accelerator runs the others."""
  special = SPECIAL_KERNELS.get(op)
  name = special[1] if special is not None and ops_lib.pair(kernel) == (special[0], special[0]) else op
  return name + ON_CORE if on_core else name


def base_op(regime_name: str) -> str:
  regime_name = regime_name.removesuffix(ON_CORE)
  for op, (_, name) in SPECIAL_KERNELS.items():
    if name == regime_name:
      return op
  return regime_name


# Regressor features, in the order `cost_features` returns them (edgenas.ops.FEATURES plus `window_taps`).
FEATURES = ("executed_macs", "weight_bytes", "activation_bytes", "constant", "window_taps")
WINDOWED_OPS = (ops_lib.CONV_2D, ops_lib.DEPTHWISE_CONV_2D, ops_lib.AVERAGE_POOL_2D, ops_lib.MAX_POOL_2D)


@functools.lru_cache(maxsize=None)
def valid_taps_1d(size: int, kernel: int, stride: int, same_padding: bool = True) -> float:
  """Average number of in-bounds taps per output position along one axis (TensorFlow's padding rule)."""
  if not same_padding:
    return float(kernel)
  out = ops_lib.out_size(size, stride)
  pad_before = max((out - 1) * stride + kernel - size, 0) // 2
  total = 0
  for o in range(out):
    start = o * stride - pad_before
    total += max(0, min(start + kernel, size) - max(start, 0))
  return total / out


def tap_fraction(op: str, in_h: int, in_w: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
                 same_padding: bool = True) -> float:
  """Executed / nominal MACs of a windowed op (1 for the others and for global pooling)."""
  if op not in WINDOWED_OPS:
    return 1.0
  if op in (ops_lib.AVERAGE_POOL_2D, ops_lib.MAX_POOL_2D) and kernel_h >= in_h and kernel_w >= in_w:
    return 1.0
  fh = valid_taps_1d(int(in_h), int(kernel_h), int(stride_h), same_padding) / kernel_h
  fw = valid_taps_1d(int(in_w), int(kernel_w), int(stride_w), same_padding) / kernel_w
  return fh * fw


def cost_features(op: str, in_h, in_w, in_c, out_c, kernel=1, stride=1) -> tuple:
  """`FEATURES` of an `OpSpec` geometry (kernel and stride an int or an (h, w) pair, SAME padding);
  differentiable in in_c/out_c."""
  macs, weight_bytes, activation_bytes, const = ops_lib.op_features(op, in_h, in_w, in_c, out_c, kernel, stride)
  (kh, kw), (sh, sw) = ops_lib.pair(kernel), ops_lib.pair(stride)
  frac = tap_fraction(op, in_h, in_w, kh, kw, sh, sw)
  taps = 0.0
  if op == ops_lib.CONV_2D:
    taps = ops_lib.out_size(in_h, sh) * ops_lib.out_size(in_w, sw) * out_c * kh * kw * frac
  return (macs * frac if frac != 1.0 else macs, weight_bytes, activation_bytes, const, taps)
