"""The regressor: NNLS fit, held-out quality, JAX prediction and the differentiable expected energy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgenas import cost as cost_lib
from edgenas import ops as ops_lib
from edgenas import space as space_lib
from edgenas.energy import features as features_lib
from edgenas.energy import lut as lut_lib
from edgenas.energy import platform as platform_lib
from edgenas.energy import regressor

SMALL_SPACE = dict(input_shape=(8, 8, 1), num_classes=10, stem=dict(channels=8, kernel=3, stride=1),
                   stages=[dict(layers=2, channels=8, stride=1), dict(layers=1, channels=16, stride=2)],
                   kernels=[3, 5], expansions=[1, 3])


def _synthetic_rows(theta, rng):
  rows = []
  for h in (4, 8, 16):
    for c_in in (4, 8, 16, 32):
      for c_out in (8, 16, 48):
        for k in (1, 3, 5):
          f = features_lib.cost_features(ops_lib.CONV_2D, h, h, c_in, c_out, k, 1)
          y = float(np.dot(theta, f)) * (1 + 0.01 * rng.standard_normal())
          rows.append(lut_lib.LutRow(ops_lib.CONV_2D, h, h, c_in, c_out, k, 1, 1, y, 0.0, 10, y * 40, "synthetic"))
  return rows


def test_fit_recovers_known_non_negative_coefficients_and_scores_them_held_out():
  theta = np.array([2e-6, 1e-5, 3e-6, 0.02, 4e-6])
  rows = _synthetic_rows(theta, np.random.default_rng(0))
  coefs = regressor.fit(rows)[ops_lib.CONV_2D]
  assert np.all(coefs >= 0)
  np.testing.assert_allclose(coefs[[0, 3, 4]], theta[[0, 3, 4]], rtol=0.15)
  q = regressor.kfold_quality(rows)
  assert q["r2"] > 0.99 and q["mape_pct"] < 3


def test_fit_never_returns_negative_coefficients_even_when_the_data_want_them():
  rows = _synthetic_rows(np.array([2e-6, 0, 0, 0.5, 0]), np.random.default_rng(1))
  # Make cost fall with MACs: an unconstrained fit would give a negative MAC coefficient.
  rows = [lut_lib.LutRow(**{**r.__dict__, "latency_ms_mean": 10.0 / (1 + r.in_c)}) for r in rows]
  assert all(np.all(c >= 0) for c in regressor.fit(rows).values())


def test_host_table_meets_the_held_out_r2_target():
  host = platform_lib.load_platform("host")
  q = regressor.kfold_quality(lut_lib.load_lut(host.lut_path))
  assert q["r2"] >= 0.95, q
  assert host.fit_quality["latency_ms"]["r2"] == pytest.approx(q["r2"], abs=1e-3)


def test_vmapped_prediction_matches_the_op_cost_function():
  platform = platform_lib.load_platform("stm32l4r5_tflm")
  specs = [ops_lib.OpSpec(ops_lib.CONV_2D, 16, 16, 8, 24, 3, 1), ops_lib.OpSpec(ops_lib.DEPTHWISE_CONV_2D, 8, 8, 48,
                                                                                    48, 5, 2),
           ops_lib.OpSpec(ops_lib.CONV_2D, 8, 8, 16, 32, 1, 1), ops_lib.OpSpec(ops_lib.DEPTHWISE_CONV_2D, 8, 8, 32,
                                                                                32, 3, 1),
           ops_lib.OpSpec(ops_lib.ADD, 8, 8, 16, 16), ops_lib.OpSpec(ops_lib.FULLY_CONNECTED, 1, 1, 64, 10)]
  matrix = regressor.coefficient_matrix(platform.coefficients("energy_uj"))
  idx = jnp.array([regressor.regime_index(s.op, s.kernel) for s in specs])
  feats = jnp.array([features_lib.cost_features(s.op, s.in_h, s.in_w, s.in_c, s.out_c, s.kernel, s.stride)
                     for s in specs], jnp.float32)
  batched = jax.jit(jax.vmap(regressor.predict, in_axes=(None, 0, 0)))(matrix, idx, feats)
  op_cost = regressor.op_cost_fn(platform, "energy_uj")
  single = [op_cost(s.op, s.in_h, s.in_w, s.in_c, s.out_c, s.kernel, s.stride) for s in specs]
  np.testing.assert_allclose(np.asarray(batched), np.asarray(single), rtol=1e-5)
  assert all(float(v) > 0 for v in single)


def test_expected_energy_gradient_matches_finite_differences():
  space = space_lib.SearchSpace.from_config(SMALL_SPACE)
  op_cost = regressor.op_cost_fn("stm32l4r5_tflm", "energy_uj")
  slots = space.slots()
  sizes = [len(s.candidates) for s in slots]
  rng = np.random.default_rng(0)
  logits = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]
  gates = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]

  @jax.jit
  def energy(logits, gates):
    probs = [jax.nn.softmax(a) for a in logits]
    fracs = [jax.nn.sigmoid(g) for g in gates]
    return cost_lib.expected_cost(op_cost, space, probs, fracs)

  grad_a, grad_g = jax.grad(energy, argnums=(0, 1))(logits, gates)
  eps = 1e-2
  for which, params, grads in (("logits", logits, grad_a), ("gates", gates, grad_g)):
    for i in range(len(params)):
      for j in range(len(params[i])):
        bump = jnp.zeros_like(params[i]).at[j].set(eps)
        up = [p + bump if k == i else p for k, p in enumerate(params)]
        down = [p - bump if k == i else p for k, p in enumerate(params)]
        args_up = (up, gates) if which == "logits" else (logits, up)
        args_down = (down, gates) if which == "logits" else (logits, down)
        fd = (float(energy(*args_up)) - float(energy(*args_down))) / (2 * eps)
        assert float(grads[i][j]) == pytest.approx(fd, rel=3e-2, abs=1e-2 * max(1.0, abs(fd))), (which, i, j)
  # The gradient is informative: opening more channels of an expanding candidate costs energy.
  assert any(float(g) > 0 for gs in grad_g for g in gs)


def test_expected_energy_of_a_one_hot_supernet_equals_the_derived_network():
  space = space_lib.SearchSpace.from_config(SMALL_SPACE)
  op_cost = regressor.op_cost_fn("stm32l4r5_tflm", "latency_ms")
  choices = [1, 3, 2]
  probs = [jnp.eye(len(s.candidates))[c] for s, c in zip(space.slots(), choices)]
  fracs = [jnp.ones(len(s.candidates)) for s in space.slots()]
  arch = space.architecture(choices, [s.hidden_max(s.candidates[c]) for s, c in zip(space.slots(), choices)])
  expected = float(cost_lib.expected_cost(op_cost, space, probs, fracs))
  assert expected == pytest.approx(float(cost_lib.architecture_cost(op_cost, arch)), rel=1e-4)
