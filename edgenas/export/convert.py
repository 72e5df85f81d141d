"""A trained JAX network to a full-integer int8 `.tflite` (the route ARCHITECTURE.md verified).

`forward_folded` (the BN-folded network QAT trains through) -> `jax2tf.convert` (native serialization, no
gradient) -> `tf.function` -> `TFLiteConverter.from_concrete_functions` with full-integer int8 quantization
(int8 kernels only, int8 input and output, calibrated on training images) -> tensor names stripped.

Two things are fixed while the network is traced for conversion (`tflite_lowering`):
  - 1x1 convolutions become `lax.conv_general_dilated`. `forward_folded` writes them as an einsum (fast on CPU),
    which the converter turns into FULLY_CONNECTED over 4-D tensors; as CONV_2D they get the same per-channel
    weights, CMSIS-NN's 1x1 fast path, and match `Architecture.ops()` and the platform tables that price them.
  - the depthwise runs its "lax" grouped convolution (one DEPTHWISE_CONV_2D) instead of the CPU fast path
    (k*k shifted multiply-adds, which would convert into dozens of MUL/ADD operators).
Both are the same arithmetic; `tests/test_export.py` checks the traced function against `forward_folded`.

Activation ranges from QAT are respected by clipping each tensor at its (nudged) int8 range through the `act_fn`
hook: the converter's min/max calibration then cannot see a wider range than training used, and where training
saturated a tensor the calibrated range is exactly the trained one. Where calibration sees a narrower range, the
int8 grid is finer than QAT's, never coarser.

TensorFlow and LiteRT are imported inside the functions that need them.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from edgenas import space as space_lib
from edgenas.export import errors
from edgenas.nn import depthwise as depthwise_lib
from edgenas.nn import model as model_lib

DEFAULT_CALIBRATION_IMAGES = 256


def _pointwise_as_conv(x, w):
  return model_lib.conv2d(x, w[None, None], 1)


@contextlib.contextmanager
def tflite_lowering():
  """Within this block, `forward_folded` traces into operators TFLite has one kernel for (see module doc)."""
  saved = model_lib.pointwise, model_lib.depthwise_conv
  model_lib.pointwise = _pointwise_as_conv
  model_lib.depthwise_conv = functools.partial(depthwise_lib.depthwise_conv, impl="lax")
  try:
    yield
  finally:
    model_lib.pointwise, model_lib.depthwise_conv = saved


def clip_to_ranges(ranges: Mapping[str, np.ndarray]) -> Callable:
  """An `act_fn` clipping every tensor at the int8 range QAT used for it (widened to hold 0 and nudged, exactly
  as `edgenas.quant.fake_quant_activation` quantises)."""
  from edgenas import quant as quant_lib  # only QAT-trained models need it

  bounds = {}
  for name, r in ranges.items():
    lo, hi = (float(v) for v in np.asarray(r).reshape(-1)[:2])
    _, _, qlo, qhi = quant_lib.activation_qparams(jnp.float32(lo), jnp.float32(hi))
    bounds[name] = (float(qlo), float(qhi))

  def act_fn(name, y):
    if name not in bounds:
      raise errors.ExportError(f"activation ranges: no range for tensor {name!r}; the ranges given hold "
                               f"{', '.join(sorted(bounds)) or 'nothing'}")
    lo, hi = bounds[name]
    return jnp.clip(y, lo, hi)

  return act_fn


def inference_fn(arch: space_lib.Architecture, folded: dict, act_ranges: Optional[Mapping] = None) -> Callable:
  """images -> logits of the BN-folded network, clipped at `act_ranges` when given (float, unquantised)."""
  act_fn = clip_to_ranges(act_ranges) if act_ranges is not None else None
  return lambda x: model_lib.forward_folded(arch, folded, x, act_fn=act_fn)


def to_tflite(arch: space_lib.Architecture, folded: dict, calibration_images: np.ndarray,
              act_ranges: Optional[Mapping] = None) -> bytes:
  """Full-integer int8 flatbuffer of the folded network, calibrated on `calibration_images` (N, H, W, C)."""
  tf = errors.require("tensorflow", "the TFLite converter")
  jax2tf = errors.require("jax.experimental.jax2tf", "converting JAX to TensorFlow")
  images = np.asarray(calibration_images, np.float32)
  if images.ndim != 4 or images.shape[1:] != tuple(arch.input_shape):
    raise errors.ExportError(f"calibration images have shape {images.shape}, expected (N, "
                             f"{', '.join(map(str, arch.input_shape))}) for architecture {arch.hash()}")
  if len(images) == 0:
    raise errors.ExportError("no calibration images: the representative dataset is empty")
  folded = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), folded)
  with tflite_lowering():
    fn = inference_fn(arch, folded, act_ranges)
    # Batch 1 is what the device runs; a fixed shape keeps every tensor static for TFLM.
    tf_fn = tf.function(jax2tf.convert(fn, with_gradient=False), autograph=False,
                        input_signature=[tf.TensorSpec((1,) + tuple(arch.input_shape), tf.float32)])
    concrete = tf_fn.get_concrete_function()

  def representative():
    for i in range(len(images)):
      yield [images[i:i + 1]]

  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf_fn)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = representative
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  converter.inference_input_type = tf.int8
  converter.inference_output_type = tf.int8
  try:
    flatbuffer = converter.convert()
  except Exception as e:  # the converter reports failures as several internal exception types
    raise errors.ExportError(f"the TFLite converter failed on architecture {arch.hash()}: "
                             f"{type(e).__name__}: {str(e)[:2000]}") from e
  return strip_names(flatbuffer)


def strip_names(flatbuffer: bytes) -> bytes:
  """The flatbuffer without tensor, operator and signature names (smaller flash; names are of no use on an MCU)."""
  fb_utils = errors.require("ai_edge_litert.tools.flatbuffer_utils", "stripping tensor names")
  model = fb_utils.convert_bytearray_to_object(bytearray(flatbuffer))
  fb_utils.strip_strings(model)
  return bytes(fb_utils.convert_object_to_bytearray(model))


def calibration_sample(images: np.ndarray, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
  """A fixed random sample of training images for calibration (the converter runs them one at a time)."""
  rng = np.random.default_rng(seed)
  take = min(count, len(images))
  return np.asarray(images)[np.sort(rng.choice(len(images), take, replace=False))]
