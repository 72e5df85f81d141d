"""Depthwise 2-D convolution (NHWC, SAME padding as TFLite), with a fast path for XLA:CPU.

`depthwise_conv(x, kernel, stride, impl)` computes y[n,h,w,c] = sum_ij xpad[n, h*sh+i, w*sw+j, c] * kernel[i,j,c].

Two implementations give the same numbers:
- "lax": `lax.conv_general_dilated` with `feature_group_count=C`. Right for GPU/TPU, and the one to export
  (jax2tf turns it into a single DEPTHWISE_CONV_2D). On XLA:CPU it is very slow: XLA lowers the kernel gradient
  of a grouped conv to a dense C x C convolution.
- "shift": kh*kw shifted multiply-adds over one padded copy of x, which XLA:CPU fuses into one loop, with a
  `jax.custom_vjp`. The input gradient is the same kind of shifted sum over the dilated, padded output gradient
  with the kernel flipped. The kernel gradient sum_{n,h,w} xpad_shifted * g is written as halving trees of
  elementwise adds rather than `reduce` ops (XLA:CPU's reduce kernels are several times slower than its fused
  elementwise loops, and k*k reductions over the whole batch were the bottleneck); the taps are a `lax.scan`
  (one compiled body), and on large maps the batch is walked in cache-sized chunks, so each chunk is read k*k
  times from cache, not from memory.
  The backward pass uses only differentiable primitives, so forward-over-reverse (`jax.jvp` of `jax.grad`, the
  exact Hessian-vector products of second-order DARTS) works through the custom VJP.
"auto" picks "shift" on the CPU backend and "lax" elsewhere; the environment variable EDGENAS_DEPTHWISE_IMPL
overrides "auto" for experiments.

Kernel layout: (kh, kw, C), one kh x kw filter per channel (square or not). (kh, kw, 1, C), Flax/TF's HWIO layout
for a depthwise conv, is accepted too and the gradient keeps that shape. The stride is an int or an (sh, sw) pair.
"""
from __future__ import annotations

import numbers
import os

import jax
import jax.numpy as jnp
from jax import lax

from edgenas import ops as ops_lib
from edgenas.nn import fusion

IMPLS = ("auto", "shift", "lax")
IMPL_ENV_VAR = "EDGENAS_DEPTHWISE_IMPL"

# Kernel-gradient chunking: the whole batch is processed at once when the output gradient is at most this many
# bytes (it then stays in cache), otherwise in chunks of images about this size. Measured on a 2-core x86 host.
_CHUNK_BYTES = 2 * 2**20


class DepthwiseError(ValueError):
  """Arguments a depthwise convolution cannot take; the message names the argument and what was expected."""


def resolve_impl(impl: str = "auto") -> str:
  """The implementation `depthwise_conv` runs for `impl`: "shift" or "lax"."""
  if impl not in IMPLS:
    raise DepthwiseError(f"depthwise_conv: impl={impl!r} is unknown; expected one of {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  override = os.environ.get(IMPL_ENV_VAR, "")
  if override:
    if override not in ("shift", "lax"):
      raise DepthwiseError(f"environment variable {IMPL_ENV_VAR}={override!r} is not an implementation; "
                           "expected 'shift' or 'lax'")
    return override
  return "shift" if jax.default_backend() == "cpu" else "lax"


def depthwise_conv(x, kernel, stride=1, impl: str = "auto"):
  """Depthwise SAME convolution of x (N, H, W, C) with kernel (kh, kw, C) or (kh, kw, 1, C) and stride s or
  (sh, sw); returns (N, H', W', C) with H' = ceil(H / sh), exactly as `lax.conv_general_dilated(...,
  padding="SAME")` and TFLite pad."""
  kernel_2d = _checked_kernel(x, kernel, stride)
  stride = ops_lib.pair(stride)  # static Python ints: they select slices and pads
  with jax.named_scope("depthwise"):  # names its operations in profiles (benchmarks/profile_step.py)
    if resolve_impl(impl) == "lax":
      return _lax_depthwise(x, kernel_2d, stride)
    return _shift_depthwise(x, kernel_2d, stride, tuple(x.shape[1:3]))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
  """(output size, pad before, pad after) of TF's SAME padding along one axis; the odd pixel goes after."""
  out = ops_lib.out_size(size, stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, total // 2, total - total // 2


def _is_stride(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _checked_kernel(x, kernel, stride):
  """The kernel as (kh, kw, C) after checking every argument against x."""
  if getattr(x, "ndim", None) != 4:
    raise DepthwiseError(f"depthwise_conv: x must be NHWC (4 dimensions), got shape {getattr(x, 'shape', None)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise DepthwiseError(f"depthwise_conv: x must be floating point, got dtype {x.dtype}")
  channels = x.shape[-1]
  shape = tuple(getattr(kernel, "shape", ()))
  if len(shape) == 4 and shape[2] == 1:
    kernel = kernel.reshape(shape[0], shape[1], shape[3])
  elif len(shape) != 3:
    raise DepthwiseError(f"depthwise_conv: kernel must be (kh, kw, C) or (kh, kw, 1, C), got shape {shape}")
  kh, kw, kernel_channels = kernel.shape
  if kh < 1 or kw < 1:
    raise DepthwiseError(f"depthwise_conv: kernel must be kh x kw with kh, kw >= 1, got shape {shape}")
  if kernel_channels != channels:
    raise DepthwiseError(f"depthwise_conv: kernel has {kernel_channels} channels but x has {channels} "
                         f"(kernel shape {shape}, x shape {x.shape})")
  strides = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
  if len(strides) != 2 or not all(_is_stride(s) for s in strides):
    raise DepthwiseError(f"depthwise_conv: stride must be a positive int or an (sh, sw) pair of them, got "
                         f"{stride!r}")
  return kernel


def _lax_depthwise(x, kernel, stride):
  kh, kw, channels = kernel.shape
  return lax.conv_general_dilated(x, kernel.reshape(kh, kw, 1, channels), stride, "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def _pad_same(x, kernel_hw, stride):
  """x padded as SAME needs it, with the output height and width."""
  out_h, top, bottom = same_padding(x.shape[1], kernel_hw[0], stride[0])
  out_w, left, right = same_padding(x.shape[2], kernel_hw[1], stride[1])
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), out_h, out_w


def _tap(padded, i, j, stride, out_h, out_w):
  """The window of `padded` that kernel tap (i, j) multiplies: padded[:, h*sh+i, w*sw+j, :]."""
  n, _, _, c = padded.shape
  sh, sw = stride
  return lax.slice(padded, (0, i, j, 0), (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c), (1, sh, sw, 1))


def _shifted_sum(padded, kernel, stride, out_h, out_w):
  """sum_ij padded[:, h*sh+i, w*sw+j, :] * kernel[i, j]: one fused elementwise loop on XLA."""
  kh, kw = kernel.shape[:2]
  y = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(padded, i, j, stride, out_h, out_w) * kernel[i, j]
      y = term if y is None else y + term
  return y


def _halving_sum(values):
  """Sum over axis 0 as a tree of elementwise adds of halves (fuses into one loop, unlike a reduce on XLA:CPU)."""
  while values.shape[0] > 1:
    if values.shape[0] % 2:
      values = jnp.concatenate([values, jnp.zeros_like(values[:1])])
    half = values.shape[0] // 2
    values = values[:half] + values[half:]
  return values[0]


def _tap_kernel_grads(padded, g, kernel_hw, stride):
  """sum over n, h, w of padded[n, h*sh+i, w*sw+j, c] * g[n, h, w, c] for every tap: (kh*kw, C).

  Per tap, a tree over the images, then a tree over the output positions. The taps are a `lax.scan`, so the
  program holds one tap body instead of kh*kw unrolled ones: as fast, and it compiles in about 1 s instead of 7 s
  for a 7x7 kernel."""
  n, out_h, out_w, c = g.shape
  sh, sw = stride
  taps = jnp.array([(i, j) for i in range(kernel_hw[0]) for j in range(kernel_hw[1])], jnp.int32)

  def one_tap(carry, tap):
    window = lax.dynamic_slice(padded, (0, tap[0], tap[1], 0), (n, (out_h - 1) * sh + 1, (out_w - 1) * sw + 1, c))
    if sh > 1 or sw > 1:
      window = window[:, ::sh, ::sw]
    per_position = _halving_sum(window * g)
    return carry, _halving_sum(per_position.reshape(out_h * out_w, c))

  _, per_tap = lax.scan(one_tap, None, taps)
  return per_tap


def _largest_divisor_at_most(n, limit):
  return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def _kernel_grad(padded, g, kernel_hw, stride):
  """d loss / d kernel, shape (kh, kw, C). Large batches go through in chunks of images that stay in cache, so
  each chunk is read kh*kw times from cache rather than the whole batch kh*kw times from memory."""
  n, out_h, out_w, c = g.shape
  kh, kw = kernel_hw
  image_bytes = out_h * out_w * c * g.dtype.itemsize
  if n * image_bytes <= _CHUNK_BYTES:
    return _tap_kernel_grads(padded, g, kernel_hw, stride).reshape(kh, kw, c)
  chunk = _largest_divisor_at_most(n, _CHUNK_BYTES // image_bytes)
  # Chunk t holds images t, t + n/chunk, t + 2n/chunk, ...: the loop then walks the second axis of a free
  # reshape, leaving the batch axis free to be sharded over devices, and no chunk is copied into a transposed
  # array first (moving the axis to the front cost as much as the taps themselves).
  padded_chunks = padded.reshape(chunk, n // chunk, *padded.shape[1:])
  g_chunks = g.reshape(chunk, n // chunk, *g.shape[1:])

  def add_chunk(t, total):
    return total + _tap_kernel_grads(lax.dynamic_index_in_dim(padded_chunks, t, axis=1, keepdims=False),
                                     lax.dynamic_index_in_dim(g_chunks, t, axis=1, keepdims=False),
                                     kernel_hw, stride)

  total = lax.fori_loop(0, n // chunk, add_chunk, jnp.zeros((kh * kw, c), g.dtype))
  return total.reshape(kh, kw, c)


def _input_grad(g, kernel, stride, in_h, in_w):
  """d loss / d x: the transposed shifted sum. Scattering g[h, w] * kernel[i, j] to xpad[h*sh+i, w*sw+j] equals
  correlating g, dilated by the stride and padded by k-1 minus the forward padding, with the flipped kernel."""
  kh, kw = kernel.shape[:2]
  sh, sw = stride
  out_h, top, _ = same_padding(in_h, kh, sh)
  out_w, left, _ = same_padding(in_w, kw, sw)
  # Sizes chosen so the correlation output is exactly in_h x in_w (this also covers SAME's extra bottom pad).
  rows = (kh - 1 - top, in_h + top - (out_h - 1) * sh - 1, sh - 1)
  cols = (kw - 1 - left, in_w + left - (out_w - 1) * sw - 1, sw - 1)
  dilated = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), rows, cols, (0, 0, 0)))
  return _shifted_sum(dilated, kernel[::-1, ::-1], (1, 1), in_h, in_w)


def _shift_forward(x, kernel, stride, in_hw=None):
  # in_hw (x's height and width) is for the backward pass, which no longer holds x itself.
  padded, out_h, out_w = _pad_same(x, kernel.shape[:2], stride)
  return _shifted_sum(padded, kernel, stride, out_h, out_w)


_shift_depthwise = jax.custom_vjp(_shift_forward, nondiff_argnums=(2, 3))


def _shift_depthwise_fwd(x, kernel, stride, in_hw):
  # The padded copy is the residual the kernel gradient reads, computed once: rebuilt from x in the backward pass,
  # or left for XLA to fuse into its consumers, it was computed twice (the pad fuses with the BatchNorm and ReLU6
  # that produce x): 0.6 s of a 3.1 s CIFAR-sized weight step.
  padded, out_h, out_w = _pad_same(x, kernel.shape[:2], stride)
  padded = fusion.materialised(padded)
  return _shifted_sum(padded, kernel, stride, out_h, out_w), (padded, kernel)


def _shift_depthwise_bwd(stride, in_hw, residuals, g):
  padded, kernel = residuals
  dx = _input_grad(g, kernel, stride, *in_hw)
  # Cotangents must have their primal's dtype (x and kernel may differ, e.g. bfloat16 activations).
  return dx.astype(padded.dtype), _kernel_grad(padded, g, kernel.shape[:2], stride).astype(kernel.dtype)


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)
