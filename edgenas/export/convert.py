"""A trained JAX network to a full-integer int8 `.tflite` (the route ARCHITECTURE.md verified).

`forward_folded` (the BN-folded network QAT trains through) -> `jax2tf.convert` (native serialization, no
gradient) -> `tf.function` -> `TFLiteConverter.from_concrete_functions` with full-integer int8 quantization
(int8 kernels only, int8 input and output, calibrated on training images) -> tensor names stripped.

The network is traced for conversion with `forward_folded(..., ops=model_lib.EXPORT_OPS)`, which differs from the
training path (`TRAIN_OPS`) in two operators:
  - 1x1 convolutions are `lax.conv_general_dilated`. Training writes them as an einsum (fast on CPU), which the
    converter turns into FULLY_CONNECTED over 4-D tensors; as CONV_2D they get the same per-channel weights,
    CMSIS-NN's 1x1 fast path, and match `Architecture.ops()` and the platform tables that price them.
  - the depthwise runs its "lax" grouped convolution (one DEPTHWISE_CONV_2D) instead of the CPU fast path
    (k*k shifted multiply-adds, which would convert into dozens of MUL/ADD operators).
Both are the same arithmetic; `tests/test_export.py` checks the two forward passes agree.

Activation ranges from QAT are respected exactly (`apply_ranges`): after conversion, every tensor the network
materialises, the input included, gets the scale and zero point QAT used for it (`quant.activation_qparams` of
its range, the same nudged formula TFLite uses), and the int32 biases of the operators reading a re-scaled
tensor are re-scaled with it (bias scale = input scale x weight scale). TFLM derives every requantization
multiplier from these scales when it prepares the model, so the int8 model then computes with QAT's grids.
Min/max calibration alone does not: it sees a few hundred images, so its ranges are narrower than QAT's moving
averages, and tensors saturate in int8 where the fake-quant network did not. One tensor cannot follow QAT: TFLite's int8
AVERAGE_POOL_2D keeps its input's quantization, so the pooled vector uses the last feature map's grid.

TensorFlow and LiteRT are imported inside the functions that need them.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from edgenas import architecture as arch_lib
from edgenas.export import errors
from edgenas.nn import model as model_lib

DEFAULT_CALIBRATION_IMAGES = 256
# TFLite operator of each tensor `forward_folded` names (by its suffix), for matching the converted graph.
_OP_OF_TENSOR = (("_expand", ("CONV_2D",)), ("_dw", ("DEPTHWISE_CONV_2D",)), ("_project", ("CONV_2D",)),
                 ("_add", ("ADD",)))
_BIASED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def inference_fn(arch: arch_lib.Architecture, folded: dict) -> Callable:
  """images -> logits of the BN-folded float network, traced into operators TFLite has one kernel for."""
  return lambda x: model_lib.forward_folded(arch, folded, x, ops=model_lib.EXPORT_OPS)


def to_tflite(arch: arch_lib.Architecture, folded: dict, calibration_images: np.ndarray,
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
  # Batch 1 is what the device runs; a fixed shape keeps every tensor static for TFLM.
  tf_fn = tf.function(jax2tf.convert(inference_fn(arch, folded), with_gradient=False), autograph=False,
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
  if act_ranges is not None:
    flatbuffer = apply_ranges(flatbuffer, arch, act_ranges)
  return strip_names(flatbuffer)


def _expected_ops(arch: arch_lib.Architecture) -> list[tuple[str, tuple[str, ...]]]:
  """(tensor name, TFLite operators that may produce it) in execution order. The stem may be a depthwise conv:
  the converter writes a conv over one input channel as DEPTHWISE_CONV_2D with a channel multiplier."""
  from edgenas import quant as quant_lib
  out = []
  for name in quant_lib.activation_names(arch):
    if name == "input":
      continue
    if name in ("stem", "head"):
      out.append((name, ("CONV_2D", "DEPTHWISE_CONV_2D") if name == "stem" else ("CONV_2D",)))
    elif name == "pool":
      out.append((name, ("AVERAGE_POOL_2D",)))
    elif name == "classifier":
      out.append((name, ("FULLY_CONNECTED",)))
    else:
      out.append((name, next(ops for suffix, ops in _OP_OF_TENSOR if name.endswith(suffix))))
  return out


def apply_ranges(flatbuffer: bytes, arch: arch_lib.Architecture, ranges: Mapping) -> bytes:
  """The model with every activation tensor quantised on the grid QAT used for it (see the module docstring);
  the converted operators must match `arch` one to one, else ExportError names the first that does not."""
  from edgenas import quant as quant_lib
  fb_utils = errors.require("ai_edge_litert.tools.flatbuffer_utils", "setting the trained activation ranges")
  schema = errors.require("ai_edge_litert.schema_py_generated", "setting the trained activation ranges")
  model = fb_utils.convert_bytearray_to_object(bytearray(flatbuffer))
  graph = model.subgraphs[0]
  op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
  kinds = [op_names.get(max(model.operatorCodes[op.opcodeIndex].builtinCode,
                            model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode), "?") for op in graph.operators]
  expected = _expected_ops(arch)
  if len(kinds) != len(expected) or any(k not in allowed for k, (_, allowed) in zip(kinds, expected)):
    raise errors.ExportError(f"the converted model's operators {kinds} do not match architecture {arch.hash()} "
                             f"({[allowed[0] for _, allowed in expected]}); cannot apply its activation ranges")
  old_scale = {i: float(t.quantization.scale[0]) for i, t in enumerate(graph.tensors)
               if t.quantization is not None and t.quantization.scale is not None and len(t.quantization.scale)}
  # The input too: the caller quantises images with the model's input parameters, which then clip as QAT did.
  produced = [(graph.inputs[0], "INPUT", "input")]
  produced += [(op.outputs[0], kind, name) for op, kind, (name, _) in zip(graph.operators, kinds, expected)]
  for (tensor, kind, name), op in zip(produced, [None] + list(graph.operators)):
    out = graph.tensors[tensor]
    if kind == "AVERAGE_POOL_2D":  # int8 pooling keeps its input's quantization
      source = graph.tensors[op.inputs[0]].quantization
      out.quantization.scale, out.quantization.zeroPoint = list(source.scale), list(source.zeroPoint)
      continue
    if name not in ranges:
      raise errors.ExportError(f"activation ranges: no range for tensor {name!r}; the ranges given hold "
                               f"{', '.join(sorted(ranges)) or 'nothing'}")
    lo, hi = (float(v) for v in np.asarray(ranges[name]).reshape(-1)[:2])
    scale, zero_point, _, _ = quant_lib.activation_qparams(jnp.float32(lo), jnp.float32(hi))
    out.quantization.scale, out.quantization.zeroPoint = [float(scale)], [int(zero_point)]
  for op, kind in zip(graph.operators, kinds):
    if kind not in _BIASED_OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
      continue
    x, w, b = (graph.tensors[i] for i in op.inputs[:3])
    ratio = old_scale[op.inputs[0]] / float(x.quantization.scale[0])
    if ratio == 1.0:
      continue
    buffer = model.buffers[b.buffer]
    bias = np.frombuffer(bytes(bytearray(buffer.data)), np.int32).astype(np.float64)
    buffer.data = np.round(bias * ratio).astype(np.int32).view(np.uint8)
    b.quantization.scale = [float(x.quantization.scale[0]) * float(s) for s in w.quantization.scale]
  return bytes(fb_utils.convert_object_to_bytearray(model))


def strip_names(flatbuffer: bytes) -> bytes:
  """The flatbuffer without tensor, operator and signature names (smaller flash; names are of no use on an MCU)."""
  fb_utils = errors.require("ai_edge_litert.tools.flatbuffer_utils", "stripping tensor names")
  model = fb_utils.convert_bytearray_to_object(bytearray(flatbuffer))
  fb_utils.strip_strings(model)
  return bytes(fb_utils.convert_object_to_bytearray(model))


def calibration_sample(split, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
  """A fixed random sample of a split's images for calibration (the converter runs them one at a time). Any
  split (`edgenas.data`): only the sampled rows are read."""
  rng = np.random.default_rng(seed)
  take = min(count, len(split))
  return np.asarray(split.take(np.sort(rng.choice(len(split), take, replace=False)))[0])
