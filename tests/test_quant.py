"""Fake quantization, straight-through gradients, range tracking, and the BN fold QAT trains through."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgenas import architecture as arch_lib
from edgenas import quant
from edgenas.nn import model

# Stem, an expanding stride-1 residual block, a stride-2 block, and a head conv: every kind of tensor.
ARCH = arch_lib.Architecture((8, 8, 1), 10, arch_lib.Stem(8, 3, 1), (
    arch_lib.Layer(arch_lib.MBCONV, 8, 8, 1, 3, 3, 24),
    arch_lib.Layer(arch_lib.MBCONV, 8, 12, 2, 5, 1, 8),
), head_channels=16, name="quant-test")


# Jitted once per module: eager op-by-op execution of these networks is many times slower than compiling them.
qat_forward = jax.jit(lambda params, stats, state, x: quant.qat_forward(ARCH, params, stats, state, x))
net_eval = jax.jit(lambda v, x: model.Net(ARCH).apply(v, x, train=False))
fake_quant_logits = jax.jit(lambda v, r, x: quant.fake_quant_logits(ARCH, v, r, x))


@pytest.fixture(scope="module")
def variables():
  """Random weights and non-trivial BN statistics and affine parameters, so the fold does real work."""
  v = jax.device_get(model.init_net(ARCH, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)

  def perturb(path, x):
    key = jax.tree_util.keystr(path)
    if key.endswith("['var']"):
      return rng.uniform(0.2, 3.0, x.shape).astype(np.float32)
    if key.endswith("['mean']") or key.endswith("['bias']"):
      return rng.normal(0, 0.5, x.shape).astype(np.float32)
    if key.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return x

  return jax.tree_util.tree_map_with_path(perturb, v)


def test_weight_fake_quant_round_trip_is_within_half_a_step_per_channel():
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 6)) * jnp.arange(1, 7)  # channels of different scale
  scale = quant.weight_scales(w)
  q = quant.fake_quant_weight(w)
  assert scale.shape == (6,)
  np.testing.assert_allclose(scale, np.abs(np.asarray(w)).max(axis=(0, 1, 2)) / 127, rtol=1e-6)
  assert np.all(np.abs(q - w) <= scale / 2 + 1e-6)
  # every value lies on its channel's int8 grid, and the largest magnitude is exact
  levels = np.asarray(q / scale)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert np.abs(levels).max() <= 127 + 1e-4
  np.testing.assert_allclose(np.abs(q).max(axis=(0, 1, 2)), np.abs(w).max(axis=(0, 1, 2)), rtol=1e-6)


def test_weight_fake_quant_gradient_is_straight_through():
  w = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
  upstream = jax.random.normal(jax.random.PRNGKey(3), (4, 5))
  grad = jax.grad(lambda w: jnp.sum(quant.fake_quant_weight(w) * upstream))(w)
  np.testing.assert_allclose(grad, upstream, rtol=1e-6)


def test_weight_fake_quant_keeps_an_all_zero_channel_zero():
  w = jnp.zeros((3, 2)).at[:, 1].set(jnp.array([0.5, -1.0, 0.25]))
  q = quant.fake_quant_weight(w)
  assert np.all(np.isfinite(q)) and np.all(q[:, 0] == 0)


def test_activation_fake_quant_error_bound_saturation_and_exact_zero():
  lo, hi = -1.5, 4.0
  scale, zero_point, qlo, qhi = quant.activation_qparams(lo, hi)
  x = jnp.linspace(-3.0, 6.0, 2001)
  q = quant.fake_quant_activation(x, lo, hi)
  inside = (x >= qlo) & (x <= qhi)
  assert np.all(np.abs(q - x)[inside] <= scale / 2 + 1e-6)
  np.testing.assert_allclose(q[x < qlo], qlo, atol=1e-6)  # saturates at the int8 ends
  np.testing.assert_allclose(q[x > qhi], qhi, atol=1e-6)
  assert float(quant.fake_quant_activation(jnp.zeros(()), lo, hi)) == 0.0  # zero is exactly representable
  assert float(zero_point) == round(-128 - lo / float(scale))
  assert len(np.unique(np.asarray(q))) <= 256


def test_activation_range_is_widened_to_hold_zero():
  _, zero_point, qlo, _ = quant.activation_qparams(0.5, 6.0)  # a ReLU6 output whose batch min was above 0
  assert float(qlo) == 0.0 and float(zero_point) == -128


def test_activation_fake_quant_gradient_is_masked_outside_the_range():
  x = jnp.array([-2.0, -0.5, 0.0, 1.0, 3.9, 5.0])
  grad = jax.grad(lambda x: jnp.sum(quant.fake_quant_activation(x, -1.0, 4.0)))(x)
  np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 0])


def test_activation_names_are_every_materialised_tensor_in_order():
  assert quant.activation_names(ARCH) == [
      "input", "stem", "layers_0_expand", "layers_0_dw", "layers_0_project", "layers_0_add", "layers_1_dw",
      "layers_1_project", "head", "pool", "classifier"]


def test_folded_network_equals_net_in_eval_mode(variables):
  x = jax.random.uniform(jax.random.PRNGKey(4), (5, 8, 8, 1))
  expected = net_eval(variables, x)
  folded = jax.jit(lambda v, x: model.forward_folded(ARCH, model.fold_batchnorm(ARCH, v), x))(variables, x)
  np.testing.assert_allclose(folded, expected, atol=1e-4, rtol=1e-4)


def test_qat_forward_tracks_ranges_and_trains_the_parameters_under_the_fold(variables):
  x = jax.random.uniform(jax.random.PRNGKey(5), (16, 8, 8, 1))
  labels = jnp.arange(16) % 10
  state = quant.init_quant_state(ARCH)
  logits, state1 = qat_forward(variables["params"], variables["batch_stats"], state, x)
  # The first QAT batch sets every range to its observed min/max.
  np.testing.assert_allclose(state1.ranges["input"], [x.min(), x.max()], rtol=1e-6)
  for name in ("stem", "layers_0_expand", "layers_0_dw", "head"):  # after a fused ReLU6
    lo, hi = np.asarray(state1.ranges[name])
    assert 0.0 <= lo < hi <= 6.0, name
  lo, hi = np.asarray(state1.ranges["layers_0_project"])  # linear bottleneck: both signs
  assert lo < 0 < hi
  assert int(state1.initialized) == 1
  # Fake-quant logits stay close to float ones for a well-ranged network.
  float_logits = net_eval(variables, x)
  assert float(jnp.max(jnp.abs(logits - float_logits))) < 0.1 * float(jnp.max(jnp.abs(float_logits)))
  # A second batch moves the ranges by the EMA, not to the new batch's extremes.
  _, state2 = qat_forward(variables["params"], variables["batch_stats"], state1, x * 0.5)
  np.testing.assert_allclose(state2.ranges["input"][1], 0.99 * state1.ranges["input"][1]
                             + 0.01 * 0.5 * state1.ranges["input"][1], rtol=1e-5)

  def loss(params):
    out, _ = quant.qat_forward(ARCH, params, variables["batch_stats"], state1, x)
    return jnp.mean(jax.nn.log_softmax(out)[jnp.arange(16), labels])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  # Gradients reach the conv kernels and the BN affine parameters through the fold.
  for name in ("stem", "layers_0_expand", "layers_1_project"):
    assert float(jnp.abs(grads[name]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads[name]["bn"]["scale"]).sum()) > 0


def test_calibrated_ranges_cover_the_data_and_fake_quant_inference_matches_float(variables):
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(6), (40, 8, 8, 1)))
  ranges = quant.calibrate_ranges(ARCH, variables, images, batch_size=16)
  assert set(ranges) == set(quant.activation_names(ARCH))
  np.testing.assert_allclose(ranges["input"], [images.min(), images.max()], rtol=1e-6)
  float_logits = net_eval(variables, images)
  fq_logits = fake_quant_logits(variables, ranges, images)
  assert np.mean(np.argmax(fq_logits, -1) == np.argmax(float_logits, -1)) >= 0.9
  assert not np.allclose(fq_logits, float_logits, atol=1e-6)  # quantization did happen
  with pytest.raises(quant.QuantError, match="layers_0_add"):
    quant.fake_quant_logits(ARCH, variables, {k: v for k, v in ranges.items() if k != "layers_0_add"}, images)
  assert quant.ranges_to_json({"stem": np.array([0.5, 6.0])}) == {"stem": {"min": 0.0, "max": 6.0}}


def test_pooled_tensor_shares_its_input_range_as_tflite_average_pool_requires(variables):
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (16, 8, 8, 1)))
  names = quant.activation_names(ARCH)
  before_pool = names[names.index("pool") - 1]
  ranges = quant.calibrate_ranges(ARCH, variables, images)
  np.testing.assert_array_equal(ranges["pool"], ranges[before_pool])
  _, state = qat_forward(variables["params"], variables["batch_stats"], quant.init_quant_state(ARCH), images)
  np.testing.assert_array_equal(np.asarray(state.ranges["pool"]), np.asarray(state.ranges[before_pool]))
