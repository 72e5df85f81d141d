"""Memory model: exact peak SRAM / flash of an Architecture and the smooth surrogate used in search."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgenas import space as space_lib
from edgenas.energy import memory

SPACE = dict(input_shape=(8, 8, 1), num_classes=10, stem=dict(channels=8, kernel=3, stride=1),
             stages=[dict(layers=2, channels=8, stride=1), dict(layers=1, channels=16, stride=2)],
             kernels=[3, 5], expansions=[1, 3])


# Compiled once for the module: eager evaluation dispatches hundreds of tiny ops.
_expected_memory = jax.jit(memory.expected_memory, static_argnums=(0,), static_argnames=("temperature",))


def _space():
  return space_lib.SearchSpace.from_config(SPACE)


def _one_hot(space, choices):
  probs = [jnp.eye(len(s.candidates))[c] for s, c in zip(space.slots(), choices)]
  fracs = [jnp.ones(len(s.candidates)) for s in space.slots()]
  arch = space.architecture(choices, [s.hidden_max(s.candidates[c]) for s, c in zip(space.slots(), choices)])
  return probs, fracs, arch


def test_architecture_memory_by_hand():
  # stem 8x8x1 -> 8x8x8; layer 0: k3e3 residual block on 8x8x8 (hidden 24); layer 1: skip; layer 2: k3e1, stride 2.
  arch = _space().architecture([1, 4, 0], [24, 0, 8])
  m = memory.architecture_memory(arch)
  # Residual block: the 1x1 expansion output (8x8x24) and the depthwise output (8x8x24) live together with the
  # block input (8x8x8) kept for the add.
  assert m["peak_sram_bytes"] == 64 * 24 + 64 * 24 + 64 * 8 == arch.peak_activation_bytes()
  assert m["weight_bytes"] == arch.weight_bytes()
  assert m["flash_bytes"] == m["weight_bytes"] + m["graph_overhead_bytes"]
  channels = 8 + (24 + 24 + 8) + (8 + 16)  # per-channel quantized convs: stem, block 0, block 2
  assert m["graph_overhead_bytes"] == round(memory.FLASH_BASE_BYTES + memory.FLASH_PER_CHANNEL_BYTES * channels)


@pytest.mark.parametrize("choices", [[1, 4, 0], [3, 3, 3], [0, 2, 1]])
def test_surrogate_of_a_one_hot_supernet_bounds_the_exact_figures_tightly(choices):
  space = _space()
  probs, fracs, arch = _one_hot(space, choices)
  soft_peak, flash = _expected_memory(space, probs, fracs, temperature=0.01)
  exact = memory.architecture_memory(arch)
  # log-sum-exp is an upper bound of the max, within temperature x max x log(number of terms).
  assert exact["peak_sram_bytes"] <= float(soft_peak) <= exact["peak_sram_bytes"] * (1 + 0.01 * np.log(40))
  assert float(flash) == pytest.approx(exact["flash_bytes"], abs=2)


def test_surrogate_is_differentiable_and_shrinks_with_the_gates():
  space = _space()
  n = [len(s.candidates) for s in space.slots()]

  def penalty(logits, gates):
    peak, flash = memory.expected_memory(space, [jax.nn.softmax(a) for a in logits],
                                         [jax.nn.sigmoid(g) for g in gates])
    return peak + 0.1 * flash

  logits = [jnp.zeros(k) for k in n]
  gates = [jnp.full(k, 2.0) for k in n]
  g_logits, g_gates = jax.jit(jax.grad(penalty, argnums=(0, 1)))(logits, gates)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in g_logits + g_gates)
  # Every expanding candidate's gate pushes memory up; closing gates lowers both figures.
  assert all(float(g[1]) > 0 for g in g_gates)
  memory_of = jax.jit(lambda fracs: memory.expected_memory(space, [jax.nn.softmax(a) for a in logits], fracs))
  closed = memory_of([jnp.full(k, 0.2) for k in n])
  opened = memory_of([jnp.full(k, 0.9) for k in n])
  assert float(closed[0]) < float(opened[0]) and float(closed[1]) < float(opened[1])


def test_soft_max_is_a_close_upper_bound():
  values = [100.0, 4000.0, 3990.0, 5.0]
  s = float(memory.soft_max(values, temperature=0.01))
  assert 4000.0 <= s <= 4000.0 * (1 + 0.01 * np.log(4))
