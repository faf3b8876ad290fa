"""oneDNN convolutions on the CPU (densenet_jax/native): built, used, and equal to XLA's.

The `use_onednn` fixture is conftest.py's; the handlers' operand checks are tested in
test_onednn_operands.py.
"""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from densenet_jax.models import ops
from densenet_jax.native import build
from densenet_jax.native import onednn

# requirements.txt installs oneDNN on x86-64 Linux; there it must be in use, not silently off.
_EXPECTED = sys.platform == 'linux' and platform.machine() == 'x86_64'


@pytest.mark.skipif(not _EXPECTED, reason='oneDNN is installed on x86-64 Linux only')
def test_available_where_installed():
  onednn.set_enabled(True)
  assert onednn.available(), onednn._state['reason']


def _conv(x, kernel, stride=1, padding=None):
  pad = kernel.shape[0] // 2 if padding is None else padding
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# Batches of 1 and 3 split unevenly (or not at all) over the thread pool's threads; the last two
# are strided like the ImageNet stem (7x7/2, padding 3), one with an odd input size.
@pytest.mark.parametrize('batch,height,width,cin,cout,size,stride,padding', [
    (1, 5, 7, 4, 3, 3, 1, 1), (3, 6, 5, 8, 5, 3, 1, 1), (4, 9, 9, 16, 8, 1, 1, 0),
    (2, 6, 6, 3, 2, 5, 1, 2), (2, 16, 16, 3, 8, 7, 2, 3), (3, 15, 13, 3, 4, 7, 2, 3)])
def test_values_and_gradients_equal_xla(use_onednn, batch, height, width, cin, cout, size,
                                        stride, padding):
  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.standard_normal((batch, height, width, cin)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((size, size, cin, cout)), jnp.float32)
  y_ref, pullback = jax.vjp(lambda x, k: _conv(x, k, stride, padding), x, kernel)
  g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
  dx_ref, dk_ref = pullback(g)
  y = jax.jit(onednn.conv_forward, static_argnums=(2, 3))(x, kernel, stride, padding)
  dx = jax.jit(onednn.conv_backward_data, static_argnums=(2, 3, 4))(
      g, kernel, x.shape, stride, padding)
  dk = jax.jit(onednn.conv_backward_weights, static_argnums=(2, 3, 4))(
      x, g, kernel.shape, stride, padding)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)
  # ops.conv: the same through its custom gradient, and oneDNN's in the program.
  y2, pullback2 = jax.vjp(lambda x, k: ops.conv(x, k, stride, padding), x, kernel)
  np.testing.assert_allclose(y2, y_ref, rtol=1e-5, atol=1e-5)
  for ours, theirs in zip(pullback2(g), (dx_ref, dk_ref)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
  assert 'forward' in _custom_calls(lambda x, k: ops.conv(x, k, stride, padding), x, kernel)


@pytest.fixture
def use_bfloat16(use_onednn):
  if jnp.dtype(jnp.bfloat16) not in onednn.dtypes():
    pytest.skip('this CPU has no bfloat16 instructions: bfloat16 convolutions stay XLA\'s')


# bfloat16 keeps 8 significant bits: one rounding of a result is within 2**-8 of it.
_BF16_RTOL = 2.0**-7


def _close_to_bfloat16_rounding(ours, theirs, scale=None):
  """ours and theirs differ by at most a couple of bfloat16 roundings of values of theirs's
  size (sums of products of bfloat16 numbers, each rounded once at the end)."""
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  scale = float(np.max(np.abs(theirs))) if scale is None else scale
  np.testing.assert_allclose(ours, theirs, rtol=_BF16_RTOL, atol=_BF16_RTOL * scale)


@pytest.mark.parametrize('batch,height,width,cin,cout,size,stride,padding', [
    (1, 5, 7, 4, 3, 3, 1, 1), (3, 6, 5, 8, 5, 3, 1, 1), (4, 9, 9, 16, 8, 1, 1, 0),
    (3, 15, 13, 3, 4, 7, 2, 3), (2, 12, 12, 64, 32, 3, 1, 1)])
def test_bfloat16_values_and_gradients_equal_xla(use_bfloat16, batch, height, width, cin, cout,
                                                 size, stride, padding):
  """bfloat16 activations and kernels: the output and input gradient in bfloat16 agree with
  XLA's bfloat16 convolutions to bfloat16 rounding, and the kernel gradient comes back in
  float32, equal to float32 sums over the same bfloat16 values (not rounded to bfloat16)."""
  rng = np.random.default_rng(batch + cin)
  x = jnp.asarray(rng.standard_normal((batch, height, width, cin)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((size, size, cin, cout)), jnp.bfloat16)
  y_xla, pullback_xla = jax.vjp(lambda x, k: _conv(x, k, stride, padding), x, kernel)
  g = jnp.asarray(rng.standard_normal(y_xla.shape), jnp.bfloat16)
  dx_xla, dk_xla = pullback_xla(g)
  # The same bfloat16 values, every product and sum in float32.
  wide = lambda v: v.astype(jnp.float32)
  y_f32, pullback_f32 = jax.vjp(lambda x, k: _conv(x, k, stride, padding), wide(x),
                                wide(kernel))
  dx_f32, dk_f32 = pullback_f32(wide(g))

  y = jax.jit(onednn.conv_forward, static_argnums=(2, 3))(x, kernel, stride, padding)
  dx = jax.jit(onednn.conv_backward_data, static_argnums=(2, 3, 4))(
      g, kernel, x.shape, stride, padding)
  dk = jax.jit(onednn.conv_backward_weights, static_argnums=(2, 3, 4))(
      x, g, kernel.shape, stride, padding)
  assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  for ours, xla, exact in ((y, y_xla, y_f32), (dx, dx_xla, dx_f32)):
    _close_to_bfloat16_rounding(ours, xla)
    _close_to_bfloat16_rounding(ours, exact)
  _close_to_bfloat16_rounding(dk, dk_xla)
  np.testing.assert_allclose(dk, dk_f32, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dk_f32))))

  # ops.conv with a float32 kernel, as the models pass their parameters: computed in bfloat16,
  # through oneDNN, and the kernel's gradient float32 from oneDNN's float32 sums.
  kernel32 = wide(kernel)
  conv = lambda x, k: ops.conv(x, k, stride, padding)

  def value_and_gradients(x, k):
    y, pullback = jax.vjp(conv, x, k)
    return y, pullback(g)

  assert _custom_calls(value_and_gradients, x, kernel32) == [
      'backward_data', 'backward_weights', 'forward']
  y2, pullback2 = jax.vjp(conv, x, kernel32)
  dx2, dk2 = pullback2(g)
  assert (y2.dtype, dx2.dtype, dk2.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  np.testing.assert_array_equal(y2, y)
  np.testing.assert_array_equal(dx2, dx)
  np.testing.assert_allclose(dk2, dk_f32, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(dk_f32))))


def _custom_calls(f, *args):
  text = jax.jit(f).lower(*args).as_text()
  return sorted(set(t for t in ('forward', 'backward_data', 'backward_weights')
                    if f'densenet_onednn_conv_{t}' in text))


def test_ops_take_the_onednn_path_in_a_scan(use_onednn):
  """ops.conv_same and ops.pointwise, as the scanned blocks call them: all three oneDNN
  operations in the program, and the same loss gradient as with XLA's convolutions."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 6)), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((4, 3, 3, 6, 6)) * 0.3, jnp.float32)
  mixes = jnp.asarray(rng.standard_normal((4, 1, 1, 6, 6)) * 0.3, jnp.float32)

  def loss(x, kernels, mixes):
    def body(h, p):
      return jax.nn.relu(ops.pointwise(ops.conv_same(h, p[0]), p[1])), None
    return jnp.sum(lax.scan(body, x, (kernels, mixes))[0] ** 2)

  grad = jax.grad(loss, (0, 1, 2))
  assert _custom_calls(grad, x, kernels, mixes) == [
      'backward_data', 'backward_weights', 'forward']
  ours = jax.jit(grad)(x, kernels, mixes)
  onednn.set_enabled(False)
  assert _custom_calls(grad, x, kernels, mixes) == []
  reference = jax.jit(grad)(x, kernels, mixes)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_element_types_are_dispatched_where_declared(use_onednn, monkeypatch):
  """float32 always takes oneDNN, bfloat16 exactly where `onednn.dtypes` says the CPU runs it
  natively (else XLA's convolutions), float16 and mixed types never."""
  def calls(x_dtype, kernel_dtype=None):
    x = jax.ShapeDtypeStruct((2, 4, 4, 3), x_dtype)
    kernel = jax.ShapeDtypeStruct((3, 3, 3, 2), kernel_dtype or x_dtype)
    return _custom_calls(ops.conv_same, x, kernel)

  assert calls(jnp.float32) == ['forward']
  assert calls(jnp.float16) == []
  assert calls(jnp.bfloat16, jnp.float32) == (
      ['forward'] if jnp.dtype(jnp.bfloat16) in onednn.dtypes() else [])
  assert not onednn.usable(jnp.zeros(2, jnp.bfloat16), jnp.zeros(2, jnp.float32))
  # A CPU without bfloat16 instructions (as the library would report it).
  monkeypatch.setitem(onednn._state, 'bfloat16', False)
  jax.clear_caches()
  try:
    assert onednn.dtypes() == {jnp.dtype(jnp.float32)}
    assert calls(jnp.bfloat16) == []
    assert calls(jnp.float32) == ['forward']
  finally:
    monkeypatch.undo()
    jax.clear_caches()


def test_missing_onednn_is_named_and_falls_back(monkeypatch, tmp_path):
  monkeypatch.setenv('DENSENET_JAX_ONEDNN_ROOT', str(tmp_path))
  monkeypatch.setattr(sys, 'prefix', str(tmp_path / 'venv'))
  with pytest.raises(FileNotFoundError, match=r'include/oneapi/dnnl/dnnl.hpp.*'
                                              r'pip install onednn-cpu-gomp'):
    build.build()
  # available() turns the failure into XLA's convolutions, with the reason kept.
  monkeypatch.setattr(onednn, '_state', {'enabled': True, 'loaded': None, 'reason': None})
  assert not onednn.available()
  assert 'dnnl.hpp' in onednn._state['reason']
  x = jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 3, 2), jnp.float32)
  assert _custom_calls(ops.conv_same, x, kernel) == []
  jax.clear_caches()   # the traces above used the fallback


def test_bad_compiler_is_named(monkeypatch, tmp_path):
  if not onednn.available():
    pytest.skip('no oneDNN here')
  monkeypatch.setenv('DENSENET_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler-xyz')
  with pytest.raises(FileNotFoundError, match='no-such-compiler-xyz'):
    build.build()


def test_build_cache_is_keyed_and_trusted_only_when_private(monkeypatch, tmp_path):
  if not onednn.available():
    pytest.skip('no oneDNN here')
  root = build._onednn_root()  # pylint: disable=protected-access
  key = build.cache_key('g++', root)
  monkeypatch.setattr(build, '_compiler_version', lambda compiler: 'g++ (Other) 99.1')
  assert build.cache_key('g++', root) != key  # Another compiler version: another library.
  monkeypatch.undo()

  # Compiling is replaced by an empty file: what matters here is where build() puts it.
  monkeypatch.setattr(build, '_compile', lambda command, tmp, compiler: None)
  monkeypatch.setattr(build, '_private_dir', [])
  shared = tmp_path / 'shared'
  shared.mkdir()
  planted = shared / f'onednn_conv-{key}.so'
  planted.write_bytes(b'not ours')
  planted.chmod(0o666)
  assert 'writable by other users' in build.untrusted(planted)
  monkeypatch.setenv('DENSENET_JAX_CACHE', str(shared))
  built = build.build()
  assert built.parent != shared and built.name == planted.name
  assert build.untrusted(built) is None and oct(built.parent.stat().st_mode & 0o777) == '0o700'
  # A cache directory that cannot be created falls back to the private directory too.
  monkeypatch.setattr(build, '_private_dir', [])
  (tmp_path / 'a_file').write_text('')
  monkeypatch.setenv('DENSENET_JAX_CACHE', str(tmp_path / 'a_file' / 'cache'))
  assert build.build().parent.name.startswith('densenet_jax-')


def test_pointwise_accumulate_adds_in_place(use_onednn):
  """ops.pointwise_accumulate: acc + the 1x1 convolution, through oneDNN's sum post-op on the
  CPU, in a loop as the scanned layers sum their chunks; gradients as for the sum."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, 5, 6, 8)), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((4, 1, 1, 8, 7)), jnp.float32)
  acc = jnp.asarray(rng.standard_normal((3, 5, 6, 7)), jnp.float32)

  def summed(acc, x, kernels):
    return lax.fori_loop(0, 4, lambda i, a: ops.pointwise_accumulate(a, x * i, kernels[i]), acc)

  reference = acc + sum(jnp.einsum('nhwc,co->nhwo', x * i, kernels[i, 0, 0]) for i in range(4))
  assert 'densenet_onednn_conv_forward_accumulate' in jax.jit(summed).lower(
      acc, x, kernels).as_text()
  np.testing.assert_allclose(jax.jit(summed)(acc, x, kernels), reference, rtol=1e-5, atol=1e-4)
  # acc is still intact after the aliased call (XLA copies it when it is used again).
  total = jax.jit(lambda a, x, k: ops.pointwise_accumulate(a, x, k) + a)(acc, x, kernels[1])
  np.testing.assert_allclose(total, 2 * acc + jnp.einsum('nhwc,co->nhwo', x, kernels[1, 0, 0]),
                             rtol=1e-5, atol=1e-4)
  loss = lambda a, x, k: jnp.sum(ops.pointwise_accumulate(a, x, k) ** 2)
  ref_loss = lambda a, x, k: jnp.sum((a + jnp.einsum('nhwc,co->nhwo', x, k[0, 0])) ** 2)
  for ours, theirs in zip(jax.grad(loss, (0, 1, 2))(acc, x, kernels[2]),
                          jax.grad(ref_loss, (0, 1, 2))(acc, x, kernels[2])):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)


def _bottleneck_reference(x, a, b, kernels, width, offset):
  h = jax.nn.relu(x[..., :width] * a[:width] + b[:width])
  return jnp.einsum('nhwc,co->nhwo', h, kernels[0, 0, offset:offset + width])


# Rows (3 * 5 * 7) split unevenly over the thread pool; widths from one channel to the whole
# buffer, kernels starting inside the flat array or at its start; a float32 and a bfloat16
# buffer (read as float32: the same values, so the same float32 tolerance).
@pytest.mark.parametrize('width,offset,dtype', [
    (24, 10, jnp.float32), (40, 60, jnp.float32), (1, 0, jnp.float32),
    (24, 10, jnp.bfloat16), (40, 60, jnp.bfloat16)])
def test_bottleneck_values_and_gradients_equal_reference(use_onednn, width, offset, dtype):
  """bottleneck.cc: a scanned layer's BN-ReLU-Conv1x1 on the first `width` channels of its
  buffer, with traced width and offset, and its gradients, added in place to the ones given."""
  rng = np.random.default_rng(width)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  x, a, b, kernels = normal(3, 5, 7, 40), normal(40), normal(40), normal(1, 1, 100, 16)
  x = x.astype(dtype)
  assert onednn.bottleneck_usable(x)
  forward = jax.jit(onednn.bottleneck_forward)
  y = forward(x, a, b, kernels, width, offset)
  assert y.dtype == jnp.float32
  y_ref, pullback = jax.vjp(
      lambda x, a, b, k: _bottleneck_reference(x, a, b, k, width, offset),
      x.astype(jnp.float32), a, b, kernels)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  dy, dx0, dk0 = normal(*y.shape), normal(*x.shape), normal(*kernels.shape)
  dx, dk, da, db = jax.jit(onednn.bottleneck_backward)(x, a, b, kernels, width, offset, dy,
                                                       dx0, dk0)
  dx_ref, da_ref, db_ref, dk_ref = pullback(dy)
  np.testing.assert_allclose(dx, dx0 + dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dk, dk0 + dk_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(da, da_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-4)
  # Channels past `width` and kernel rows outside the layer's are left as they were.
  np.testing.assert_array_equal(dx[..., width:], dx0[..., width:])
  np.testing.assert_array_equal(dk[:, :, :offset], dk0[:, :, :offset])
  np.testing.assert_array_equal(da[width:], 0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_scanned_bottleneck_layers_take_the_fused_path(use_onednn, dtype):
  """A scanned DenseNet-BC's train step (float32 or bfloat16) runs each layer's first
  BN-ReLU-Conv1x1 through bottleneck.cc (forward and backward) and its other convolutions
  through oneDNN where `onednn.dtypes` has the dtype, and without oneDNN through XLA's chunks;
  the models' equality tests (tests/test_models.py) check its values against the unrolled
  layers'."""
  from densenet_jax.models import create_model   # pylint: disable=g-import-not-at-top
  model = create_model('densenet_bc', depth=16, growth_rate=4, num_classes=3, dtype=dtype)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def text():
    def loss(params, batch_stats, x):
      logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.sum(logits.astype(jnp.float32))
    return jax.jit(jax.grad(loss)).lower(variables['params'], variables['batch_stats'],
                                         x).as_text()

  program = text()
  assert 'densenet_onednn_bottleneck_forward' in program
  assert 'densenet_onednn_bottleneck_backward' in program
  convolutions = ('densenet_onednn_conv_forward', 'densenet_onednn_conv_backward_data',
                  'densenet_onednn_conv_backward_weights')
  native = jnp.dtype(dtype) in onednn.dtypes()
  assert all((name in program) == native for name in convolutions)
  onednn.set_enabled(False)
  assert 'densenet_onednn' not in text()
