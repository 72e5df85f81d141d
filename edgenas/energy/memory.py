"""Memory model: peak SRAM of the int8 activations and flash of the model, exact and smooth.

- Exact, for an `Architecture`: peak live activation bytes from `Architecture.peak_activation_bytes()` (inputs,
  output and a residual block input kept alive), flash = int8 weights + int32 biases + flatbuffer overhead.
- Exact, for a `.tflite`: the largest set of arena tensors alive at once (a tensor lives from the operator that
  writes it, or the start for graph inputs, to its last reader, or the end for graph outputs); flash = file size.
- Smooth surrogate for the search: `expected_memory(space, probs, gate_fracs)` takes, per slot, the expectation
  over candidates of each candidate's live bytes (hidden channels = gate fraction x maximum) and combines the
  layers with a log-sum-exp soft maximum, so the peak has a gradient to every layer, not only the largest.

TFLM needs a little more than the live set (its arena planner is greedy, and it keeps ~1-3 KB of its own
structures); that slack belongs in the budget check, not in this figure.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from edgenas import architecture as arch_lib
from edgenas import cost as cost_lib
from edgenas import ops as ops_lib
from edgenas import space as space_lib
from edgenas.energy import tflite_graph

# Flatbuffer bytes beyond the constant buffers, fitted to the two MLPerf Tiny reference models with names
# stripped (as edgenas.export writes them): 16064 B with 336 per-channel-quantized output channels and 23224 B
# with 576. Per channel, the weight and bias tensors each store a float32 scale and an int64 zero point (24 B)
# plus vector headers and alignment.
FLASH_BASE_BYTES = 6040
FLASH_PER_CHANNEL_BYTES = 29.83


def _quantized_channels(op_specs: Sequence[ops_lib.OpSpec]):
  return sum(o.out_c for o in op_specs if o.op in (ops_lib.CONV_2D, ops_lib.DEPTHWISE_CONV_2D))


def graph_overhead_bytes(op_specs: Sequence[ops_lib.OpSpec]):
  """Flatbuffer overhead (operators, tensors, quantization parameters) of a model running `op_specs`."""
  return FLASH_BASE_BYTES + FLASH_PER_CHANNEL_BYTES * _quantized_channels(op_specs)


def architecture_memory(arch: arch_lib.Architecture) -> dict:
  """Exact peak SRAM and flash of a derived network, in bytes."""
  weights = arch.weight_bytes()
  overhead = int(round(graph_overhead_bytes(arch.ops())))
  return dict(peak_sram_bytes=arch.peak_activation_bytes(), flash_bytes=weights + overhead,
              weight_bytes=weights, graph_overhead_bytes=overhead)


def tflite_live_bytes(graph: tflite_graph.TfliteGraph) -> list[int]:
  """Bytes of arena tensors alive while each operator runs."""
  n = len(graph.ops)
  first, last = {}, {}
  for t in graph.inputs:
    first[t] = 0
  for i, op in enumerate(graph.ops):
    for t in op.outputs:
      first.setdefault(t, i)
      last[t] = max(last.get(t, i), i)
    for t in op.inputs:
      first.setdefault(t, 0)
      last[t] = max(last.get(t, i), i)
  for t in graph.outputs:
    last[t] = n - 1
  sizes = {t.index: t.nbytes for t in graph.tensors if not t.constant}
  return [sum(sizes[t] for t in first if t in sizes and first[t] <= i <= last.get(t, first[t])) for i in range(n)]


def tflite_memory(graph: tflite_graph.TfliteGraph) -> dict:
  """Exact peak SRAM (largest live activation set) and flash (the flatbuffer as stored) of a .tflite."""
  live = tflite_live_bytes(graph)
  constants = graph.constant_bytes()
  return dict(peak_sram_bytes=max(live) if live else 0, flash_bytes=graph.file_bytes, weight_bytes=constants,
              graph_overhead_bytes=graph.file_bytes - constants, live_bytes_per_op=live)


# ----------------------------------------------------------------------------------------------------------
# Smooth surrogate


def soft_max(values, temperature: float = 0.05):
  """τ·s·logsumexp(x / (τ·s)) with s the (constant) largest value: an upper bound of max(x), within
  τ·s·log(n) of it, with a gradient to every element."""
  x = jnp.stack([jnp.asarray(v, jnp.float32) for v in values])
  scale = jax.lax.stop_gradient(jnp.maximum(jnp.max(x), 1.0)) * temperature
  return scale * jax.nn.logsumexp(x / scale)


def block_live_bytes(h: int, w: int, c, stride: int, out_c, hidden, expand: bool, residual: bool) -> list:
  """Live activation bytes while each operator of an MBConv block runs (same accounting as
  `Architecture.activation_bytes_per_op`), with `hidden` possibly an expected (fractional) channel count."""
  sh, sw = ops_lib.pair(stride)
  oh, ow = ops_lib.out_size(h, sh), ops_lib.out_size(w, sw)
  block_in, kept = h * w * c, (h * w * c if residual else 0)
  hid_in, hid_out, out = h * w * hidden, oh * ow * hidden, oh * ow * out_c
  live = [block_in + hid_in, hid_in + hid_out + kept] if expand else [block_in + hid_out]
  live.append(hid_out + out + kept)
  if residual:
    live.append(3 * out)
  return live


def _candidate_live(slot: space_lib.LayerSlot, cand: space_lib.Candidate, gate_frac, temperature):
  if cand.op == arch_lib.SKIP:
    return jnp.zeros(())
  expand = cand.expansion != 1
  hidden = slot.hidden_max(cand) * gate_frac if expand else slot.in_channels
  return soft_max(block_live_bytes(slot.in_h, slot.in_w, slot.in_channels, slot.stride, slot.out_channels, hidden,
                                   expand, slot.residual_ok), temperature)


def _fixed_live(space: space_lib.SearchSpace) -> list[int]:
  """Live bytes (input + output) of the stem, head, pooling and classifier, which every network runs."""
  live = []
  for o in cost_lib.fixed_ops(space):
    c = ops_lib.op_counts(o.op, o.in_h, o.in_w, o.in_c, o.out_c, o.kernel, o.stride)
    live.append(c["in_elems"] + c["out_elems"])
  return live


def expected_memory(space: space_lib.SearchSpace, probs: Sequence, gate_fracs: Sequence,
                    temperature: float = 0.05):
  """(soft peak SRAM bytes, expected flash bytes) of the supernet; differentiable in `probs` and `gate_fracs`.

  `probs[i][c]` is the probability of candidate c in slot i and `gate_fracs[i][c]` its expected open fraction of
  expanded channels (the same arguments as `edgenas.cost.expected_cost`). The peak is a soft maximum (see
  `soft_max`) over the fixed operators and, per slot, the expected soft peak of its candidates.
  """
  per_layer = list(_fixed_live(space))
  flash = jnp.asarray(cost_lib.ops_cost(_flash_cost, cost_lib.fixed_ops(space)), jnp.float32) + FLASH_BASE_BYTES
  flash_costs = cost_lib.candidate_costs(_flash_cost, space, gate_fracs)
  for i, slot in enumerate(space.slots()):
    live = jnp.stack([_candidate_live(slot, cand, gate_fracs[i][j], temperature)
                      for j, cand in enumerate(slot.candidates)])
    per_layer.append(jnp.sum(probs[i] * live))
    flash = flash + jnp.sum(probs[i] * flash_costs[i])
  return soft_max(per_layer, temperature), flash


def _flash_cost(op, in_h, in_w, in_c, out_c, kernel=1, stride=1):
  """Flash of one operator in the op-cost convention: weights, biases and per-channel quantization parameters."""
  weight_bytes = ops_lib.op_features(op, in_h, in_w, in_c, out_c, kernel, stride)[1]
  per_channel = out_c if op in (ops_lib.CONV_2D, ops_lib.DEPTHWISE_CONV_2D) else 0
  return weight_bytes + FLASH_PER_CHANNEL_BYTES * per_channel
