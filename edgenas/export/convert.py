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
int8 grid is finer than QAT's, never coarser. The converter writes each clip as separate RELU6/MINIMUM/MAXIMUM
operators; `fold_clamps` removes them again by letting the producing conv/add write the clamped tensor directly:
a clamp whose bounds hold the tensor's whole int8 range is exactly int8 saturation, which the producer's
requantization already does.

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
# Not clipped: the input is quantised by the caller over the data range (a clip would convert into a RELU of its
# own), and TFLite's int8 AVERAGE_POOL_2D keeps its input's quantization, so the pooled range is not free to set.
UNCLIPPED_TENSORS = ("input", "pool")
PROJECT_SUFFIX, ADD_SUFFIX = "_project", "_add"  # forward_folded's names in a residual block
# Elementwise clamps the converter emits for the range clips, and the operators that can absorb them: those whose
# output requantization TFLM derives from the output tensor's scale at Prepare time.
CLAMP_OPS = ("RELU", "RELU6", "RELU_0_TO_1", "RELU_N1_TO_1", "MINIMUM", "MAXIMUM")
CLAMP_ABSORBERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD")


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
    # A residual block's projection feeds only its add, and the converter gives a clamp between the two the
    # add's quantization, so it would stay as a MINIMUM/MAXIMUM operator; the sum's range is clipped instead.
    if name in UNCLIPPED_TENSORS or (name.endswith(PROJECT_SUFFIX) and
                                     name[:-len(PROJECT_SUFFIX)] + ADD_SUFFIX in bounds):
      return y
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
  return strip_names(fold_clamps(flatbuffer))


def _constant_value(model, tensor) -> Optional[float]:
  """The dequantised value of a constant int8 scalar (or all-equal) tensor, else None."""
  buffer = model.buffers[tensor.buffer] if 0 < tensor.buffer < len(model.buffers) else None
  if buffer is None or buffer.data is None or len(buffer.data) == 0 or tensor.quantization is None:
    return None
  values = np.frombuffer(bytes(bytearray(buffer.data)), np.int8)
  if values.size == 0 or np.any(values != values[0]) or tensor.quantization.scale is None:
    return None
  return float(tensor.quantization.scale[0]) * (int(values[0]) - int(tensor.quantization.zeroPoint[0]))


def _int8_range(tensor) -> Optional[tuple[float, float]]:
  q = tensor.quantization
  if q is None or q.scale is None or len(q.scale) != 1:
    return None
  scale, zero_point = float(q.scale[0]), int(q.zeroPoint[0])
  return scale * (-128 - zero_point), scale * (127 - zero_point)


def fold_clamps(flatbuffer: bytes) -> bytes:
  """Removes RELU/RELU6/MINIMUM/MAXIMUM operators that only saturate: when a clamp's input comes from a
  conv, depthwise, fully-connected or add (and feeds nothing else), and the clamp's bounds hold its output's whole
  int8 range (within one step), the producer writes the clamp's output tensor itself."""
  fb_utils = errors.require("ai_edge_litert.tools.flatbuffer_utils", "rewriting the converted model")
  schema = errors.require("ai_edge_litert.schema_py_generated", "rewriting the converted model")
  model = fb_utils.convert_bytearray_to_object(bytearray(flatbuffer))
  graph = model.subgraphs[0]
  names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

  def op_name(op):
    code = model.operatorCodes[op.opcodeIndex]
    return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")

  readers: dict[int, int] = {}
  for op in graph.operators:
    for t in op.inputs:
      readers[t] = readers.get(t, 0) + 1
  for t in graph.outputs:
    readers[t] = readers.get(t, 0) + 1
  producer = {t: op for op in graph.operators for t in op.outputs}
  bounds = {"RELU": (0.0, np.inf), "RELU6": (0.0, 6.0), "RELU_0_TO_1": (0.0, 1.0), "RELU_N1_TO_1": (-1.0, 1.0)}
  kept = []
  for op in graph.operators:
    kind = op_name(op)
    source = producer.get(op.inputs[0]) if kind in CLAMP_OPS else None
    if source is None or op_name(source) not in CLAMP_ABSORBERS or readers.get(op.inputs[0]) != 1:
      kept.append(op)
      continue
    if kind in ("MINIMUM", "MAXIMUM"):
      c = _constant_value(model, graph.tensors[op.inputs[1]]) if len(op.inputs) == 2 else None
      lo, hi = (None, None) if c is None else ((-np.inf, c) if kind == "MINIMUM" else (c, np.inf))
    else:
      lo, hi = bounds[kind]
    out = graph.tensors[op.outputs[0]]
    rng = _int8_range(out)
    step = float(out.quantization.scale[0]) if rng is not None else 0.0
    if lo is None or rng is None or rng[0] < lo - step or rng[1] > hi + step:
      kept.append(op)
      continue
    source.outputs[0] = op.outputs[0]
    producer[op.outputs[0]] = source
  graph.operators = kept
  return bytes(fb_utils.convert_object_to_bytearray(model))


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
