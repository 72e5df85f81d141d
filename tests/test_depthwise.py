"""The shifted depthwise conv against lax's grouped conv: values, gradients, and the transformations the search uses."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgenas.nn import depthwise
from edgenas.nn.depthwise import DepthwiseError, depthwise_conv

TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(shape, k, seed=0):
  kx, kk = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, shape, jnp.float32)
  kernel = jax.random.normal(kk, (k, k, shape[-1]), jnp.float32)
  return x, kernel


@functools.partial(jax.jit, static_argnums=(2, 3))
def _vjp_both(x, kernel, stride, impl):
  """Output and (dx, dkernel) for a random cotangent; jitted so each case compiles once instead of op by op."""
  y, pullback = jax.vjp(lambda a, b: depthwise_conv(a, b, stride, impl), x, kernel)
  cotangent = jax.random.normal(jax.random.PRNGKey(7), y.shape, y.dtype)
  return y, pullback(cotangent)


# Odd and even sizes in one map (stride 2 on an even size pads one more pixel after than before, on an odd size
# the same on both sides), each kernel size, both strides.
@pytest.mark.parametrize("k, stride, hw", [(3, 1, (7, 8)), (3, 2, (7, 8)), (5, 2, (8, 5)), (7, 1, (8, 7)), (7, 2, (7, 8))])
def test_shift_matches_lax_values_and_gradients(k, stride, hw):
  x, kernel = _inputs((2, *hw, 3), k)
  y_shift, (dx_shift, dk_shift) = _vjp_both(x, kernel, stride, "shift")
  y_lax, (dx_lax, dk_lax) = _vjp_both(x, kernel, stride, "lax")
  assert y_shift.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), 3)
  np.testing.assert_allclose(y_shift, y_lax, **TOL)
  np.testing.assert_allclose(dx_shift, dx_lax, **TOL)
  np.testing.assert_allclose(dk_shift, dk_lax, **TOL)


# Non-square kernels and strides (DS-CNN's 10x4 stem geometry, time-only downsampling on a 49x10 MFCC map).
@pytest.mark.parametrize("kernel_hw, stride, hw", [((3, 1), 1, (7, 6)), ((5, 3), (2, 1), (9, 10)),
                                                   ((10, 4), (2, 2), (49, 10)), ((1, 3), (1, 2), (6, 7))])
def test_shift_matches_lax_on_non_square_kernels_and_strides(kernel_hw, stride, hw):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *hw, 3))
  kernel = jax.random.normal(jax.random.PRNGKey(2), (*kernel_hw, 3))
  y_shift, (dx_shift, dk_shift) = _vjp_both(x, kernel, stride, "shift")
  y_lax, (dx_lax, dk_lax) = _vjp_both(x, kernel, stride, "lax")
  sh, sw = (stride, stride) if isinstance(stride, int) else stride
  assert y_shift.shape == (2, -(-hw[0] // sh), -(-hw[1] // sw), 3)
  assert dk_shift.shape == kernel.shape
  np.testing.assert_allclose(y_shift, y_lax, **TOL)
  np.testing.assert_allclose(dx_shift, dx_lax, **TOL)
  np.testing.assert_allclose(dk_shift, dk_lax, **TOL)


def test_chunked_kernel_gradient_matches_lax(monkeypatch):
  # Large maps take the chunked (lax.scan) kernel-gradient path; a budget of two output images sends this tiny
  # batch of six there, in three chunks.
  x, kernel = _inputs((6, 9, 10, 4), 3, seed=1)
  monkeypatch.setattr(depthwise, "_CHUNK_BYTES", 2 * 5 * 5 * 4 * 4)  # output 5 x 5 x 4 float32 at stride 2
  _, (dx_shift, dk_shift) = _vjp_both(x, kernel, 2, "shift")
  _, (dx_lax, dk_lax) = _vjp_both(x, kernel, 2, "lax")
  np.testing.assert_allclose(dx_shift, dx_lax, **TOL)
  np.testing.assert_allclose(dk_shift, dk_lax, **TOL)
  kernel_grad_jaxpr = jax.make_jaxpr(jax.grad(lambda b: jnp.sum(depthwise_conv(x, b, 2, "shift"))))(kernel)
  assert str(kernel_grad_jaxpr).count("scan[") == 2  # chunks around taps, not taps alone


def test_jit_and_vmap_over_a_population_of_kernels():
  x, _ = _inputs((2, 6, 6, 4), 3)
  kernels = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 3, 4))

  def loss(kernel, impl):
    return jnp.sum(jnp.tanh(depthwise_conv(x, kernel, 2, impl)) ** 2)

  population_grad = jax.jit(jax.vmap(jax.value_and_grad(lambda kern: loss(kern, "shift"))))
  values, grads = population_grad(kernels)
  for member in range(kernels.shape[0]):
    value_lax, grad_lax = jax.value_and_grad(lambda kern: loss(kern, "lax"))(kernels[member])
    np.testing.assert_allclose(values[member], value_lax, **TOL)
    np.testing.assert_allclose(grads[member], grad_lax, **TOL)


def test_hessian_vector_product_through_custom_vjp_matches_lax():
  # Second-order DARTS differentiates the weight gradient forward (jax.jvp of jax.grad).
  x, kernel = _inputs((2, 5, 6, 3), 3, seed=2)
  tangent_x, tangent_k = _inputs((2, 5, 6, 3), 3, seed=5)

  def hvp(impl):
    grad = jax.grad(lambda a, b: jnp.sum(jnp.sin(depthwise_conv(a, b, 2, impl))), argnums=(0, 1))
    return jax.jit(lambda a, b: jax.jvp(grad, (a, b), (tangent_x, tangent_k)))(x, kernel)

  (grad_shift, hvp_shift), (grad_lax, hvp_lax) = hvp("shift"), hvp("lax")
  for got, want in zip(jax.tree.leaves((grad_shift, hvp_shift)), jax.tree.leaves((grad_lax, hvp_lax))):
    np.testing.assert_allclose(got, want, **TOL)
  assert float(jnp.abs(hvp_shift[1]).max()) > 0.0  # the kernel block of the HVP is not trivially zero


def test_shift_path_has_no_grouped_convolution():
  # The point of "shift" on CPU: neither the forward nor the gradient is a (slow) grouped conv on XLA:CPU.
  x, kernel = _inputs((2, 6, 6, 4), 3)
  jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(depthwise_conv(a, b, 2, "shift")), argnums=(0, 1)))(x, kernel)
  assert "conv_general_dilated" not in str(jaxpr)
  jaxpr_lax = jax.make_jaxpr(lambda a, b: depthwise_conv(a, b, 2, "lax"))(x, kernel)
  assert "conv_general_dilated" in str(jaxpr_lax)


def test_hwio_kernel_layout_is_accepted_and_keeps_its_shape():
  x, kernel = _inputs((1, 5, 5, 3), 3)
  kernel_hwio = kernel.reshape(3, 3, 1, 3)
  np.testing.assert_allclose(depthwise_conv(x, kernel_hwio, 1, "shift"), depthwise_conv(x, kernel, 1, "lax"), **TOL)
  grad = jax.grad(lambda b: jnp.sum(depthwise_conv(x, b, 1, "shift")))(kernel_hwio)
  assert grad.shape == (3, 3, 1, 3)


def test_auto_picks_shift_on_cpu_and_the_environment_overrides_it(monkeypatch):
  monkeypatch.delenv(depthwise.IMPL_ENV_VAR, raising=False)
  assert jax.default_backend() == "cpu"
  assert depthwise.resolve_impl("auto") == "shift"
  assert depthwise.resolve_impl("lax") == "lax"
  monkeypatch.setenv(depthwise.IMPL_ENV_VAR, "lax")
  assert depthwise.resolve_impl("auto") == "lax"
  assert depthwise.resolve_impl("shift") == "shift"  # an explicit choice wins over the environment
  monkeypatch.setenv(depthwise.IMPL_ENV_VAR, "cudnn")
  with pytest.raises(DepthwiseError, match=depthwise.IMPL_ENV_VAR):
    depthwise.resolve_impl("auto")


@pytest.mark.parametrize("x_shape, kernel_shape, stride, impl, message", [
    ((5, 5, 3), (3, 3, 3), 1, "shift", "x must be NHWC"),
    ((1, 5, 5, 3), (3, 3, 4), 1, "shift", "kernel has 4 channels but x has 3"),
    ((1, 5, 5, 3), (0, 5, 3), 1, "shift", "kh, kw >= 1"),
    ((1, 5, 5, 3), (3, 3, 2, 3), 1, "shift", r"\(kh, kw, C\) or \(kh, kw, 1, C\)"),
    ((1, 5, 5, 3), (3, 3, 3), (2, 0), "shift", r"an \(sh, sw\) pair"),
    ((1, 5, 5, 3), (3, 3, 3), 0, "shift", "stride must be a positive int"),
    ((1, 5, 5, 3), (3, 3, 3), 1, "winograd", "impl='winograd' is unknown"),
])
def test_bad_arguments_raise_a_clear_error(x_shape, kernel_shape, stride, impl, message):
  with pytest.raises(DepthwiseError, match=message):
    depthwise_conv(jnp.zeros(x_shape), jnp.zeros(kernel_shape), stride, impl)


def test_chunked_kernel_gradient_accepts_a_batch_sharded_over_devices():
  """Data-parallel training shards the batch; the chunked path must not scan over the sharded axis."""
  import subprocess
  import sys
  import textwrap
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from edgenas.nn import depthwise
      depthwise._CHUNK_BYTES = 2 * 6 * 6 * 4 * 4  # two output images per chunk: the chunked path
      from edgenas import parallel
      mesh = parallel.make_mesh()  # the mesh training uses
      rng = np.random.default_rng(0)
      x = jax.device_put(jnp.asarray(rng.standard_normal((8, 6, 6, 4)), jnp.float32), NamedSharding(mesh, P("batch")))
      k = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)
      grad = lambda impl: jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(depthwise.depthwise_conv(x, k, 1, impl)))))(k)
      np.testing.assert_allclose(grad("shift"), grad("lax"), rtol=1e-4, atol=1e-5)
      print("ok")
  """)
  env = dict(__import__("os").environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
