"""Where XLA:CPU must not fuse: a value computed once into a buffer of its own.

XLA fuses an elementwise producer into every consumer, recomputing it per consumer; for a cheap producer with one
consumer that saves a memory pass, but in the supernet a producer with ten or twenty consumers (a layer's output
gradient, a padded activation) was recomputed ten or twenty times, often in a transposed order. These helpers
stop that where it was measured to matter.
"""
import jax
import jax.numpy as jnp


def materialised(g):
  """g, computed into a buffer of its own. XLA has no fusion barrier that survives to fusion (it expands
  `optimization_barrier` into control edges first), but it never fuses across a conditional's operands. The
  predicate depends on g's middle element, so it cannot be folded (a corner may be constant padding); the other
  branch only runs when that element is not finite, and then spreads the NaN or inf over g (the step is lost
  either way, and the loop's NaN check stops the run)."""
  with jax.named_scope("fusion_boundary"):  # names it in profiles (benchmarks/profile_step.py)
    probe = g.reshape(-1)[g.size // 2]
    return jax.lax.cond(jnp.isfinite(probe), lambda g: g, lambda g: g + 0 * probe, g)


@jax.custom_vjp
def gradient_boundary(x):
  """Identity whose cotangent is materialised once (XLA:CPU).

  A layer's output gradient is the sum of every candidate's input gradient in the next layer (shifted sums of
  the depthwise convs, BatchNorm backward terms: 60-odd tensors). XLA:CPU fuses that sum into each of its
  consumers, the ten candidates' projection and BatchNorm gradients, most of them transposed for a weight
  gradient's dot: it was computed ~20 times over, strided, per layer. Measured on the CIFAR-sized supernet
  (2 cores): weight step 8.0 -> 4.3 s."""
  return x


def _gradient_boundary_fwd(x):
  return x, None


def _gradient_boundary_bwd(_, g):
  return (materialised(g),)


gradient_boundary.defvjp(_gradient_boundary_fwd, _gradient_boundary_bwd)
