"""Pooling: the transitions' 2x2 average pool and the ImageNet stem's 3x3/2 max pool.

Both are written out rather than left to Flax's reduce-window ops: the average pool as a reshape
and a mean, and the max pool with a written-out gradient (why: at `max_pool`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2 of NHWC input, as `nn.avg_pool(x, (2, 2), (2, 2))`
  (an odd last row or column is dropped), written as a reshape and a mean."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return jnp.mean(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _window_views(x_padded: jax.Array, window: int, stride: int, out_h: int, out_w: int):
  """Yields ((i, j), view) for each window offset: the strided [batch, out_h, out_w, c] view."""
  for i in range(window):
    for j in range(window):
      yield (i, j), lax.slice(
          x_padded, (0, i, j, 0),
          (x_padded.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1,
           x_padded.shape[3]),
          (1, stride, stride, 1))


def _max_pool_geometry(x, window, stride, padding):
  out_h = (x.shape[1] + 2 * padding - window) // stride + 1
  out_w = (x.shape[2] + 2 * padding - window) // stride + 1
  pad = ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0))
  x_padded = lax.pad(x, jnp.array(-jnp.inf, x.dtype), pad)
  return x_padded, out_h, out_w


def _max_pool(x, window, stride, padding):
  # In float32, exact for bfloat16 inputs: see _max_pool_bwd.
  x_padded, out_h, out_w = _max_pool_geometry(x.astype(jnp.float32), window, stride, padding)
  views = [view for _, view in _window_views(x_padded, window, stride, out_h, out_w)]
  y = views[0]
  for view in views[1:]:
    y = jnp.maximum(y, view)
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """Max pooling over square windows of NHWC input, padded with -inf (as `nn.max_pool`).

  The gradient goes to the first maximum of each window in row-major order, which is what
  autodiff of `lax.reduce_window` gives, but written as a few elementwise passes: XLA:CPU lowers
  autodiff's version to a variadic reduce-window over index arrays, as slow as the whole stem
  convolution in densenet121's train step.
  """
  return _max_pool(x, window, stride, padding)


def _max_pool_fwd(x, window, stride, padding):
  y = _max_pool(x, window, stride, padding)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, g):
  # Compared in float32: XLA:CPU widens bfloat16 operations to float32 and rounds the result
  # back after each, and this fusion reads every window offset's view several times
  # (densenet121's memory-efficient step spent 10x as long here in bfloat16). Maxima and
  # comparisons of bfloat16 values are exact in float32.
  dtype = residuals[0].dtype
  x, y = (v.astype(jnp.float32) for v in residuals)
  g = g.astype(jnp.float32)
  x_padded, out_h, out_w = _max_pool_geometry(x, window, stride, padding)
  taken = jnp.zeros(y.shape, bool)
  dx_padded = jnp.zeros(x_padded.shape, g.dtype)
  zero = jnp.array(0, g.dtype)
  for (i, j), view in _window_views(x_padded, window, stride, out_h, out_w):
    chosen = (view == y) & ~taken
    taken = taken | chosen
    # Place this offset's share back at rows i, i+stride, ... and columns j, j+stride, ...
    dx_padded = dx_padded + lax.pad(
        jnp.where(chosen, g, zero), zero,
        ((0, 0, 0),
         (i, x_padded.shape[1] - i - stride * (out_h - 1) - 1, stride - 1),
         (j, x_padded.shape[2] - j - stride * (out_w - 1) - 1, stride - 1),
         (0, 0, 0)))
  dx = dx_padded[:, padding:padding + x.shape[1], padding:padding + x.shape[2]]
  return (dx.astype(dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
