"""Quantization-aware training: int8 fake quantization with straight-through gradients, through the BN fold.

What the int8 TFLite model computes, and so what QAT imitates:
  - weights: int8, symmetric, per output channel (the last axis of every weight), scale = max|w| / 127;
  - activations: int8, asymmetric, per tensor, at every tensor the model materialises (the hooks of
    `edgenas.nn.model.forward_folded`: the input, every operator output after its fused ReLU6, residual sums,
    the pooled vector and the logits); the range always contains 0 so that 0 is exact, as TFLite requires;
  - biases stay float here: TFLite keeps them int32 at scale s_in * s_w, an error orders of magnitude below the
    int8 rounding of the weights and activations.

Activation ranges are *tracked*, not learned: an exponential moving average of each tensor's batch min/max,
then used with a straight-through estimator whose gradient is masked outside the range. Why not LSQ/PACT: the
exporter calibrates int8 ranges from a representative dataset by min/max, so an EMA of min/max is the range the
converter would pick anyway; learned ranges would add parameters with their own learning rate to tune, and on
short retraining runs the EMA settles within a few dozen steps. The ranges are stored in the checkpoint and in
`report.json`, so the exporter can use exactly what training saw.

BatchNorm during QAT: the network runs through `forward_folded` with BN folded from *frozen* running statistics;
what trains are the underlying parameters (conv weights, BN scale and bias, classifier) through the fold, so the
fake-quantised weights are the folded weights the exporter will quantise.
"""
from __future__ import annotations

import functools
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgenas import architecture as arch_lib
from edgenas.nn import model as model_lib

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_QMAX = 127  # symmetric weights use [-127, 127] (TFLite's int8 weight spec)
RANGE_EMA = 0.99


class QuantError(ValueError):
  """Quantization ranges that do not fit the network; the message names the tensor."""


# --------------------------------------------------------------------------------------------------------------
# Fake quantization (pure functions, differentiable with straight-through gradients)


def weight_scales(w: jnp.ndarray) -> jnp.ndarray:
  """Per-output-channel scale max|w| / 127 over every axis but the last; all-zero channels get scale 1."""
  reduce_axes = tuple(range(w.ndim - 1))
  max_abs = jnp.max(jnp.abs(w), axis=reduce_axes)
  return jnp.where(max_abs > 0, max_abs / WEIGHT_QMAX, 1.0)


def fake_quant_weight(w: jnp.ndarray) -> jnp.ndarray:
  """Symmetric int8 per-output-channel quantize-dequantize; the gradient passes straight through (identity),
  since the scale follows max|w| and nothing is clipped."""
  scale = jax.lax.stop_gradient(weight_scales(w))
  q = jnp.clip(jnp.round(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX) * scale
  return w + jax.lax.stop_gradient(q - w)


def activation_qparams(lo, hi):
  """(scale, zero_point, nudged_lo, nudged_hi) of asymmetric int8 for the range [lo, hi], widened to hold 0.

  The zero point is rounded to an integer, so the representable range is nudged slightly (as TFLite does) and
  0.0 maps to an integer exactly."""
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  scale = jnp.maximum(hi - lo, 1e-8) / (INT8_MAX - INT8_MIN)
  zero_point = jnp.clip(jnp.round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX)
  return scale, zero_point, (INT8_MIN - zero_point) * scale, (INT8_MAX - zero_point) * scale


def fake_quant_activation(x: jnp.ndarray, lo, hi) -> jnp.ndarray:
  """Asymmetric int8 per-tensor quantize-dequantize over [lo, hi]; straight-through gradient inside the
  (nudged) range and zero outside it, where the int8 value saturates."""
  lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
  scale, zero_point, qlo, qhi = activation_qparams(lo, hi)
  clipped = jnp.clip(x, qlo, qhi)  # its gradient is the mask: 1 inside the range, 0 outside
  q = (jnp.clip(jnp.round(x / scale) + zero_point, INT8_MIN, INT8_MAX) - zero_point) * scale
  return clipped + jax.lax.stop_gradient(q - clipped)


# --------------------------------------------------------------------------------------------------------------
# Activation ranges


@flax.struct.dataclass
class QuantState:
  """Tracked activation ranges: {tensor name: [lo, hi]} and whether they hold data yet (0/1)."""
  ranges: dict
  initialized: jnp.ndarray


def activation_names(arch: arch_lib.Architecture) -> list[str]:
  """Names of the tensors `forward_folded` offers to `act_fn`, in execution order (traced, never computed)."""
  return list(_activation_names(arch))


@functools.lru_cache(maxsize=64)
def _activation_names(arch: arch_lib.Architecture) -> tuple[str, ...]:
  names = []

  def record(name, y):
    names.append(name)
    return y

  variables = jax.eval_shape(lambda rng: model_lib.init_net(arch, rng), jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct((1,) + tuple(arch.input_shape), jnp.float32)
  jax.eval_shape(lambda v, x: model_lib.forward_folded(arch, model_lib.fold_batchnorm(arch, v), x, act_fn=record),
                 variables, x)
  return tuple(names)


# TFLite's int8 AVERAGE_POOL_2D keeps its input's scale and zero point: the pooled tensor has no range of its own,
# and simulating one makes fake-quant disagree with the exported model.
TIED_TO_INPUT = ("pool",)


def range_source(arch: arch_lib.Architecture, name: str) -> str:
  """The tensor whose range `name` is quantised with: itself, or its input for range-preserving ops."""
  if name not in TIED_TO_INPUT:
    return name
  names = _activation_names(arch)
  return names[names.index(name) - 1]


def init_quant_state(arch: arch_lib.Architecture) -> QuantState:
  ranges = {name: jnp.zeros((2,), jnp.float32) for name in activation_names(arch)}
  return QuantState(ranges=ranges, initialized=jnp.zeros((), jnp.int32))


def _weight_hook(name, w):
  return fake_quant_weight(w)


def qat_forward(arch: arch_lib.Architecture, params, batch_stats, quant: QuantState, images,
                momentum: float = RANGE_EMA):
  """Logits of the fake-quantised, BN-folded network (frozen BN statistics) and the updated ranges.

  Each tensor's range moves towards this batch's min/max by an EMA (the first QAT batch sets it), and the tensor
  is quantised with the updated range, as TF's moving-average quantizers do."""
  folded = model_lib.fold_batchnorm(arch, {"params": params, "batch_stats": batch_stats})
  new_ranges = {}
  first = quant.initialized == 0

  def act_hook(name, y):
    if name in TIED_TO_INPUT:
      new_ranges[name] = new_ranges[range_source(arch, name)]
      return fake_quant_activation(y, new_ranges[name][0], new_ranges[name][1])
    observed = jax.lax.stop_gradient(jnp.stack([jnp.min(y), jnp.max(y)]))
    tracked = jnp.where(first, observed, momentum * quant.ranges[name] + (1.0 - momentum) * observed)
    new_ranges[name] = tracked
    return fake_quant_activation(y, tracked[0], tracked[1])

  logits = model_lib.forward_folded(arch, folded, images, weight_fn=_weight_hook, act_fn=act_hook)
  return logits, QuantState(ranges=new_ranges, initialized=jnp.ones((), jnp.int32))


def fake_quant_logits(arch: arch_lib.Architecture, variables, ranges: Mapping[str, jnp.ndarray], images):
  """Inference of the int8-simulated network with fixed ranges (what the exported model should compute)."""
  missing = [n for n in activation_names(arch) if n not in ranges]
  if missing:
    raise QuantError(f"activation ranges missing for tensor(s) {', '.join(missing)}")
  folded = model_lib.fold_batchnorm(arch, variables)
  return model_lib.forward_folded(arch, folded, images, weight_fn=_weight_hook,
                                  act_fn=lambda name, y: fake_quant_activation(y, *ranges[range_source(arch, name)]))


def calibrate_ranges(arch: arch_lib.Architecture, variables, images: np.ndarray, batch_size: int = 256) -> dict:
  """Post-training ranges: the min/max of every tensor over `images` (the converter's representative-dataset
  calibration), for a network trained without QAT."""
  folded = model_lib.fold_batchnorm(arch, variables)

  @jax.jit
  def batch_ranges(x):
    seen = {}

    def record(name, y):
      seen[name] = jnp.stack([jnp.min(y), jnp.max(y)])
      return y

    model_lib.forward_folded(arch, folded, x, act_fn=record)
    return seen

  ranges = None
  for start in range(0, len(images), batch_size):
    r = jax.device_get(batch_ranges(jnp.asarray(images[start:start + batch_size])))
    ranges = r if ranges is None else {k: np.array([min(ranges[k][0], v[0]), max(ranges[k][1], v[1])])
                                       for k, v in r.items()}
  if ranges is None:
    raise QuantError("calibrate_ranges: no calibration images given")
  return {k: np.asarray(ranges[range_source(arch, k)], np.float32) for k in ranges}


def ranges_to_json(ranges: Mapping[str, jnp.ndarray]) -> dict:
  """{tensor: {"min", "max"}} for report.json (widened to hold 0, as quantization uses them)."""
  out = {}
  for name, r in ranges.items():
    lo, hi = (float(v) for v in np.asarray(r))
    out[name] = {"min": min(lo, 0.0), "max": max(hi, 0.0)}
  return out
