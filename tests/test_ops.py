"""The hand-written gradients of densenet_jax.models.ops equal autodiff's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from densenet_jax.models import ops
from densenet_jax.models import pooling
from densenet_jax.native import onednn


@pytest.fixture(params=[True, False], ids=['onednn', 'xla'])
def cpu_convolutions(request, on_one_device):   # pylint: disable=unused-argument
  """Runs a test with oneDNN's CPU convolutions (where built) and with XLA's own, traced on one
  device (conftest.py's `on_one_device`)."""
  previous = onednn._state['enabled']
  onednn.set_enabled(request.param)
  yield request.param and onednn.available()
  onednn.set_enabled(previous)


def _vjp(f, x, g):
  y, pullback = jax.vjp(f, x)
  return y, pullback(g)[0]


@pytest.mark.parametrize('size', [8, 9])
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_equals_flax(size, ties):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
  if ties:  # As after a ReLU: many windows whose maximum occurs more than once.
    x = jnp.maximum(x, 0.3)
  reference = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  ours = lambda x: pooling.max_pool(x, window=3, stride=2, padding=1)
  g = jnp.asarray(rng.standard_normal(reference(x).shape), jnp.float32)
  y_ref, dx_ref = _vjp(reference, x, g)
  y, dx = _vjp(ours, x, g)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, dx_ref, atol=1e-6)
  # Every output's gradient lands on exactly one input.
  np.testing.assert_allclose(jnp.sum(dx), jnp.sum(g), rtol=1e-5)


def test_max_pool_keeps_bfloat16():
  """bfloat16 in and out, though computed in float32: the same maxima and gradient as Flax's
  bfloat16 max pool, ties (after a ReLU) included."""
  rng = np.random.default_rng(0)
  x = jnp.maximum(jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.bfloat16), 0.3)
  g = jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.bfloat16)
  y, dx = _vjp(lambda x: pooling.max_pool(x, 3, 2, 1), x, g)
  assert y.dtype == dx.dtype == jnp.bfloat16
  reference = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  y_ref, dx_ref = _vjp(reference, x, g)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32),
                             rtol=1e-2, atol=1e-2)


def _assert_same_vjp(ours, reference, args, g):
  """Outputs and both cotangents of `ours` equal those of `reference` at `args`."""
  y_ref, pullback_ref = jax.vjp(reference, *args)
  y, pullback = jax.vjp(ours, *args)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for mine, theirs in zip(pullback(g), pullback_ref(g)):
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine, theirs, atol=1e-4)


def test_pointwise_gradients_equal_autodiff(cpu_convolutions):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((1, 1, 5, 6)), jnp.float32)
  reference = lambda x, kernel: jnp.einsum('nhwc,co->nhwo', x, kernel[0, 0])
  g = jnp.asarray(rng.standard_normal((2, 3, 4, 6)), jnp.float32)
  _assert_same_vjp(ops.pointwise, reference, (x, kernel), g)


@pytest.mark.parametrize('kernel_size', [1, 3, 5])
def test_conv_same_gradients_equal_autodiff(kernel_size, cpu_convolutions):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 4, 3)), jnp.float32)
  pad = kernel_size // 2

  def reference(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  g = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
  _assert_same_vjp(ops.conv_same, reference, (x, kernel), g)


def test_conv_same_gradients_are_written_out_on_cpu_only(cpu_convolutions):
  """For a CPU the backward pass is oneDNN's (three custom calls, forward included) or else one
  forward convolution and one matrix product; lowered for a GPU it is autodiff's two transposed
  convolutions (cuDNN's gradient kernels)."""
  x = jax.ShapeDtypeStruct((2, 6, 5, 4), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 4, 3), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(ops.conv_same(x, k) ** 2), (0, 1)))

  def program(platform):
    return grad.trace(x, kernel).lower(lowering_platforms=(platform,)).as_text()
  cpu, cuda = program('cpu'), program('cuda')
  if cpu_convolutions:
    assert (cpu.count('stablehlo.convolution'), cpu.count('stablehlo.dot_general')) == (0, 0)
    assert cpu.count('stablehlo.custom_call @densenet_onednn_conv_') == 3
  else:
    assert (cpu.count('stablehlo.convolution'), cpu.count('stablehlo.dot_general')) == (2, 1)
  assert (cuda.count('stablehlo.convolution'), cuda.count('stablehlo.dot_general')) == (3, 0)


@pytest.mark.parametrize('size', [(8, 8), (7, 9)])
def test_avg_pool2_equals_flax(size):
  """Transitions pool with `avg_pool2`; it must be `nn.avg_pool`'s 2x2/2 (odd edges dropped)."""
  x = jax.random.normal(jax.random.key(0), (2, *size, 3))
  np.testing.assert_allclose(pooling.avg_pool2(x), nn.avg_pool(x, (2, 2), strides=(2, 2)),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('width,chunk', [(24, 5), (24, 8), (7, 7), (130, 64)])
def test_chunks_cover_every_channel_once(width, chunk):
  """Chunks stay inside the axis, and the channels each marks as its own cover it exactly once
  (the last chunk may overlap the one before it)."""
  owned = np.zeros(width, int)
  for c in range(int(ops.num_chunks(width, chunk))):
    start = int(ops.chunk_start(c, chunk, width))
    assert 0 <= start and start + chunk <= width
    owned[start:start + chunk] += np.asarray(ops.chunk_is_new(c, chunk, width))
  np.testing.assert_array_equal(owned, 1)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float32'])
def test_slices_on_bits_equal_lax(dtype):
  """ops moves 16-bit floats as their bits; the values are lax's, NaNs and -0.0 included."""
  rng = np.random.default_rng(0)
  total = jnp.asarray(rng.standard_normal((2, 3, 3, 10)), dtype).at[0, 0, 0, 0].set(jnp.nan)
  part = jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32).at[1, 0, 0, 1].set(-0.0)
  same = lambda a, b: np.testing.assert_array_equal(
      np.asarray(lax.bitcast_convert_type(a, jnp.dtype(f'uint{8 * a.dtype.itemsize}'))),
      np.asarray(lax.bitcast_convert_type(b, jnp.dtype(f'uint{8 * b.dtype.itemsize}'))))
  start = jnp.int32(5)   # traced in a jitted loop, as in the scans
  updated = jax.jit(ops.update_slice, static_argnums=3)(total, part, start, 3)
  same(updated, lax.dynamic_update_slice_in_dim(total, part.astype(dtype), 5, 3))
  assert updated.dtype == total.dtype
  same(jax.jit(ops.take_slice, static_argnums=(2, 3))(total, start, 4, 3),
       lax.dynamic_slice_in_dim(total, 5, 4, 3))
  padding = ((0, 0, 0), (1, 2, 1), (0, 0, 0), (0, 3, 0))
  for value in (0.0, -jnp.inf):
    same(ops.pad(total, padding, value), lax.pad(total, jnp.asarray(value, dtype), padding))
  bits = ops.bits(total)
  assert bits.dtype == (jnp.float32 if dtype == 'float32' else jnp.uint16)
  same(ops.from_bits(bits, total.dtype), total)
