"""Differentiable expected cost of a supernet, for any per-operator cost model.

An *op cost function* has the signature `op_cost(op, in_h, in_w, in_c, out_c, kernel, stride) -> scalar`, where
`op` is an `edgenas.ops` type name, the geometry is static except `in_c`/`out_c`, which may be JAX arrays
(expected channel counts). The supernet's expected cost is

    C(α, g) = C_fixed + Σ_layers Σ_candidates p(candidate | α) · C(candidate, hidden = g · hidden_max)

where `g` is the expected open fraction of the candidate's channel gates. It is differentiable in both.
`mac_cost` is the stand-in cost model: MACs, named as such, used when no platform is configured.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp

from edgenas import architecture as arch_lib
from edgenas import ops as ops_lib
from edgenas import space as space_lib

OpCost = Callable[..., "jnp.ndarray"]


def mac_cost(op, in_h, in_w, in_c, out_c, kernel=1, stride=1):
  """Cost = multiply-accumulates. A hardware-agnostic proxy, not energy."""
  return ops_lib.op_features(op, in_h, in_w, in_c, out_c, kernel, stride)[0]


def ops_cost(op_cost: OpCost, op_specs: Sequence[ops_lib.OpSpec]):
  return sum(op_cost(o.op, o.in_h, o.in_w, o.in_c, o.out_c, o.kernel, o.stride) for o in op_specs)


def fixed_ops(space: space_lib.SearchSpace) -> list[ops_lib.OpSpec]:
  """Operators every network in the space runs: stem, head conv, pooling and classifier."""
  probe = space.architecture([0] * len(space.slots()),
                             [s.hidden_max(s.candidates[0]) for s in space.slots()])
  return [o for o in probe.ops() if not o.layer.startswith("layers[")]


def candidate_cost(op_cost: OpCost, slot: space_lib.LayerSlot, cand: space_lib.Candidate, gate_frac=1.0):
  """Cost of one candidate in one slot, with `gate_frac` of its expanded channels open."""
  if cand.op == arch_lib.SKIP:
    return jnp.zeros(())
  expand = cand.expansion != 1
  hidden = slot.hidden_max(cand) * gate_frac if expand else slot.in_channels
  specs = ops_lib.mbconv_ops(slot.in_h, slot.in_w, slot.in_channels, hidden, slot.out_channels, cand.kernel,
                             slot.stride, expand, slot.residual_ok)
  return ops_cost(op_cost, specs)


def candidate_costs(op_cost: OpCost, space: space_lib.SearchSpace, gate_fracs=None) -> list:
  """Per slot, a vector of candidate costs. `gate_fracs[i][c]` is candidate c's open fraction in slot i."""
  out = []
  for i, slot in enumerate(space.slots()):
    costs = [candidate_cost(op_cost, slot, cand, 1.0 if gate_fracs is None else gate_fracs[i][j])
             for j, cand in enumerate(slot.candidates)]
    out.append(jnp.stack([jnp.asarray(c, jnp.float32) for c in costs]))
  return out


def expected_cost(op_cost: OpCost, space: space_lib.SearchSpace, probs: Sequence, gate_fracs: Sequence):
  """E[cost] of the supernet under candidate probabilities `probs[i]` and gate open fractions."""
  total = jnp.asarray(ops_cost(op_cost, fixed_ops(space)), jnp.float32)
  for p, c in zip(probs, candidate_costs(op_cost, space, gate_fracs)):
    total = total + jnp.sum(p * c)
  return total


def architecture_cost(op_cost: OpCost, arch: arch_lib.Architecture):
  """Cost of a derived network under the same model (what the expected cost converges to)."""
  return ops_cost(op_cost, arch.ops())
