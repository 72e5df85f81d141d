"""The derived, discrete network as a Flax module, and its BatchNorm-folded form.

`Net(arch)` is what retraining trains: conv (no bias) -> BatchNorm -> ReLU6 everywhere, 1x1 convs written as
Dense over the channel axis (cheap on CPU, vmappable), depthwise through `edgenas.nn.depthwise`.

`fold_batchnorm` turns trained variables into per-operator (weight, bias) pairs exactly as the int8 model holds
them, and `forward_folded` runs that folded network. Quantization-aware training and the exporter both go through
`forward_folded`, so what QAT learns is what the exporter converts: the fold is written once.

`forward_folded(..., ops=...)` picks the implementations of the 1x1 and depthwise convolutions: `TRAIN_OPS` (the
default) are the fast ones of the backend, `EXPORT_OPS` the same arithmetic written as the primitives jax2tf and
the TFLite converter turn into one CONV_2D / DEPTHWISE_CONV_2D each (see `edgenas.export.convert`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from edgenas import architecture as arch_lib
from edgenas import ops as ops_lib
from edgenas.nn.depthwise import depthwise_conv

BN_MOMENTUM = 0.9
BN_EPS = 1e-3


def relu6(x):
  return jnp.clip(x, 0.0, 6.0)


def conv2d(x, w, stride):
  """Regular SAME conv, NHWC/HWIO, as TFLite's CONV_2D; `stride` an int or an (sh, sw) pair."""
  return jax.lax.conv_general_dilated(x, w, ops_lib.pair(stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pointwise(x, w):
  """1x1 conv as a matmul over channels."""
  return jnp.einsum("nhwc,cd->nhwd", x, w)


def _pointwise_as_conv(x, w):
  """1x1 conv as `lax.conv_general_dilated`: the same arithmetic as `pointwise`, but it converts to CONV_2D
  (an einsum converts to FULLY_CONNECTED over 4-D tensors)."""
  return conv2d(x, w[None, None], 1)


@dataclasses.dataclass(frozen=True)
class Ops:
  """The implementations `forward_folded` computes its 1x1 and depthwise convolutions with."""
  pointwise: Callable  # (x (N, H, W, Cin), w (Cin, Cout)) -> (N, H, W, Cout)
  depthwise: Callable  # (x (N, H, W, C), w (k, k, C), stride) -> (N, H', W', C)


# The fastest form on the backend: an einsum, and the depthwise "auto" impl (k*k shifted adds on CPU).
TRAIN_OPS = Ops(pointwise=pointwise, depthwise=depthwise_conv)
# What the TFLite converter lowers to one operator each: a conv for 1x1, a grouped conv for depthwise.
EXPORT_OPS = Ops(pointwise=_pointwise_as_conv, depthwise=functools.partial(depthwise_conv, impl="lax"))


def global_avg_pool(x):
  """Written as avg_pool over the whole map: it converts to AVERAGE_POOL_2D (CMSIS-NN accelerates it); a mean
  would become SUM, whose LiteRT reference kernel is wrong."""
  h, w = x.shape[1], x.shape[2]
  return nn.avg_pool(x, (h, w), strides=(h, w), padding="VALID")[:, 0, 0, :]


class ConvBN(nn.Module):
  """One conv-type operator followed by BatchNorm. kind: "conv", "pointwise" or "depthwise"."""
  kind: str
  features: int
  kernel: int | tuple[int, int] = 1
  stride: int | tuple[int, int] = 1

  @nn.compact
  def __call__(self, x, train: bool):
    cin = x.shape[-1]
    init = nn.initializers.variance_scaling(2.0, "fan_out" if self.kind != "depthwise" else "fan_in", "normal")
    if self.kind == "conv":
      w = self.param("kernel", init, (*ops_lib.pair(self.kernel), cin, self.features))
      y = conv2d(x, w, self.stride)
    elif self.kind == "pointwise":
      w = self.param("kernel", init, (cin, self.features))
      y = pointwise(x, w)
    elif self.kind == "depthwise":
      w = self.param("kernel", init, (*ops_lib.pair(self.kernel), cin))
      y = depthwise_conv(x, w, self.stride)
    else:
      raise ValueError(f"unknown conv kind {self.kind!r}")
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, name="bn")(y)


class Net(nn.Module):
  arch: arch_lib.Architecture

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.arch
    x = relu6(ConvBN("conv", a.stem.channels, a.stem.kernel, a.stem.stride, name="stem")(x, train))
    for i, l in enumerate(a.layers):
      if l.op == arch_lib.SKIP:
        continue
      inp = x
      if l.expand:
        x = relu6(ConvBN("pointwise", l.hidden, name=f"layers_{i}_expand")(x, train))
      x = relu6(ConvBN("depthwise", l.hidden, l.kernel, l.stride, name=f"layers_{i}_dw")(x, train))
      x = ConvBN("pointwise", l.out_channels, name=f"layers_{i}_project")(x, train)
      if l.residual:
        x = x + inp
    if a.head_channels:
      x = relu6(ConvBN("pointwise", a.head_channels, name="head")(x, train))
    x = global_avg_pool(x)
    return nn.Dense(a.num_classes, name="classifier")(x)


def op_names(arch: arch_lib.Architecture) -> list[str]:
  """Names of the conv-type operators of `Net(arch)`, in execution order (keys of the folded params)."""
  names = ["stem"]
  for i, l in enumerate(arch.layers):
    if l.op == arch_lib.SKIP:
      continue
    if l.expand:
      names.append(f"layers_{i}_expand")
    names += [f"layers_{i}_dw", f"layers_{i}_project"]
  if arch.head_channels:
    names.append("head")
  return names


def fold_batchnorm(arch: arch_lib.Architecture, variables) -> dict:
  """{op name: {"w", "b"}} with BatchNorm's running statistics folded into each conv's weight and bias.

  The output-channel axis is the last axis of every weight (HWIO, (Cin, Cout), (k, k, C)), so the per-channel
  scale broadcasts the same way for all three kinds.
  """
  params, stats = variables["params"], variables["batch_stats"]
  folded = {}
  for name in op_names(arch):
    bn_p, bn_s = params[name]["bn"], stats[name]["bn"]
    scale = bn_p["scale"] / jnp.sqrt(bn_s["var"] + BN_EPS)
    folded[name] = {"w": params[name]["kernel"] * scale, "b": bn_p["bias"] - bn_s["mean"] * scale}
  folded["classifier"] = {"w": params["classifier"]["kernel"], "b": params["classifier"]["bias"]}
  return folded


WeightFn = Callable[[str, jnp.ndarray], jnp.ndarray]
ActFn = Callable[[str, jnp.ndarray], jnp.ndarray]


def forward_folded(arch: arch_lib.Architecture, folded: dict, x, weight_fn: Optional[WeightFn] = None,
                   act_fn: Optional[ActFn] = None, ops: Ops = TRAIN_OPS):
  """The BN-folded network. `weight_fn(name, w)` and `act_fn(name, y)` are hooks for fake quantization:
  weights are passed per operator, activations at every tensor the int8 model materialises (the input, every
  operator output after its fused ReLU6, every residual sum, the pooled vector and the logits). `ops`: how the
  1x1 and depthwise convolutions are computed (`TRAIN_OPS` or `EXPORT_OPS`)."""
  wq = weight_fn or (lambda name, w: w)
  aq = act_fn or (lambda name, y: y)

  def op(name, x, kind, stride=1, act=True):
    p = folded[name]
    w = wq(name, p["w"])
    if kind == "conv":
      y = conv2d(x, w, stride)
    elif kind == "pointwise":
      y = ops.pointwise(x, w)
    else:
      y = ops.depthwise(x, w, stride)
    y = y + p["b"]
    return aq(name, relu6(y) if act else y)

  x = aq("input", x)
  x = op("stem", x, "conv", arch.stem.stride)
  for i, l in enumerate(arch.layers):
    if l.op == arch_lib.SKIP:
      continue
    inp = x
    if l.expand:
      x = op(f"layers_{i}_expand", x, "pointwise")
    x = op(f"layers_{i}_dw", x, "depthwise", l.stride)
    x = op(f"layers_{i}_project", x, "pointwise", act=False)
    if l.residual:
      x = aq(f"layers_{i}_add", x + inp)
  if arch.head_channels:
    x = op("head", x, "pointwise")
  x = aq("pool", global_avg_pool(x))
  p = folded["classifier"]
  return aq("classifier", x @ wq("classifier", p["w"]) + p["b"])


def init_net(arch: arch_lib.Architecture, rng) -> dict:
  """Variables of `Net(arch)`, initialised under jit (eager Flax init is slow for many layers)."""
  net = Net(arch)
  x = jnp.zeros((1,) + tuple(arch.input_shape), jnp.float32)
  return jax.jit(lambda r: net.init(r, x, train=False))(rng)
