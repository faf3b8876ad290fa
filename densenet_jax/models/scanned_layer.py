"""One dense layer of a scanned block (scanned.py), forward and backward, on the block's buffer.

A layer reads the first `in_width` channels of its segment's pre-allocated buffer and returns
its k new maps. `in_width` is traced (the scan's layer index sets it), so XLA cannot slice
exactly that many channels. On a CPU with oneDNN, a bottleneck layer's first BN-ReLU-Conv1x1 is
one fused call that takes `in_width` as an operand (densenet_jax/native/bottleneck.cc): it reads
exactly the layer's channels and does the BatchNorm-ReLU, the matrix product and, backward, the
gradients' elementwise work and reductions on blocks of rows held in cache. Elsewhere (GPUs,
TPUs, bfloat16, layers without bottleneck, no oneDNN) the layer reads the buffer in chunks of
`Static.chunk` channels, as many as its own input fills, so its work follows its own width
rather than the buffer's (up to the last chunk's padding), and its backward pass (`first_bwd`,
written out chunk by chunk) needs workspace for one chunk. The segment's scans in scanned.py
call these once per layer; the padded BatchNorm parameters and the flat kernel layout they index
are described there.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import ops
from densenet_jax.native import onednn


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything about a segment that is fixed at trace time (hashable, for custom_vjp)."""

  first_offset: int   # channel where the segment's first layer writes
  growth_rate: int
  bottleneck: bool
  train: bool
  epsilon: float
  dropout_rate: float
  dtype: Any
  save_bottleneck: bool   # keep each layer's 1x1 output for the backward pass
  chunk: int   # input channels per step of a layer's first convolution (`first`)


def _dropout(x, rate, key):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def batch_stats(x):
  """Per-channel mean and mean of squares over batch and space, in float32."""
  x = x.astype(jnp.float32)
  return jnp.mean(x, (0, 1, 2)), jnp.mean(lax.square(x), (0, 1, 2))


def _keys(static: Static, key):
  """Dropout keys of a layer's two convolutions (unused without dropout)."""
  if static.dropout_rate > 0 and static.train:
    return jax.random.split(key)
  return key, key


def _norm_relu(x, mean, var, scale, bias, epsilon, dtype):
  # jax.nn.relu has gradient 0 at 0, so padded channels (pre-activation exactly 0, since their
  # scale and bias are 0) get exactly zero gradient.
  mul = scale * lax.rsqrt(var + epsilon)
  return jax.nn.relu((x.astype(jnp.float32) - mean) * mul + bias).astype(dtype)


def _chunk_start(static: Static, c, width):
  """First channel of chunk c of a `width`-channel buffer (see `ops.chunk_start`)."""
  return ops.chunk_start(c, static.chunk, width)


def _chunk(static: Static, x, c, width):
  """Chunk c of x's last (channel) axis, `width` long."""
  return lax.dynamic_slice_in_dim(x, _chunk_start(static, c, width), static.chunk, x.ndim - 1)


def kernel_offset(static: Static, j):
  """Where layer j of a segment starts in the segment's flat first-convolution kernel: the
  input widths of the layers before it, first_offset + i * k for i < j, summed."""
  return j * static.first_offset + static.growth_rate * (j * (j - 1) // 2)


def _chunk_params(static: Static, p, kernels, j, c, in_width):
  """Chunk c of layer j's first BatchNorm and convolution parameters (`kernels`: the segment's
  flat kernel, `scanned._flat_kernels`). Channels that the chunk shares with the chunk before
  it, and channels past the layer's `in_width` inputs, get zero scale, bias and kernel rows: the
  former are counted (and get their gradients) in the chunk before, and both contribute exactly
  zero.
  """
  width = p['scale1'].shape[0]
  start = _chunk_start(static, c, width)
  own = (ops.chunk_is_new(c, static.chunk, width) &
         (start + jnp.arange(static.chunk) < in_width))
  sl = lambda v, axis: lax.dynamic_slice_in_dim(v, start, static.chunk, axis)
  rows = lax.dynamic_slice_in_dim(kernels, kernel_offset(static, j) + start, static.chunk, 2)
  return {'scale1': jnp.where(own, sl(p['scale1'], 0), 0.0),
          'bias1': jnp.where(own, sl(p['bias1'], 0), 0.0),
          'mean1': sl(p['mean1'], 0), 'var1': sl(p['var1'], 0),
          'kernel1': jnp.where(own[:, None], rows, 0.0)}


def _first_chunk(static: Static, buf_c, mean_c, meansq_c, pc, acc=None):
  """BN-ReLU-Conv of one chunk of input channels: its share of the layer's first convolution,
  added to `acc` (the chunks before) where given."""
  if static.train:
    mean1, var1 = mean_c, jnp.maximum(0.0, meansq_c - lax.square(mean_c))
  else:
    mean1, var1 = pc['mean1'], pc['var1']
  h = _norm_relu(buf_c, mean1, var1, pc['scale1'], pc['bias1'], static.epsilon, static.dtype)
  kernel = pc['kernel1'].astype(static.dtype)
  if acc is not None and static.bottleneck and static.dtype == jnp.float32:
    return ops.pointwise_accumulate(acc, h, kernel)
  y = ops.pointwise(h, kernel) if static.bottleneck else ops.conv_same(h, kernel)
  y = y.astype(jnp.float32)
  return y if acc is None else acc + y


def first(static: Static, buf, mean, meansq, p, kernels, j, in_width):
  """BN-ReLU-Conv1x1 of bottleneck layer j (BN-ReLU-Conv3x3 without bottleneck) on the layer's
  `in_width` input channels, the buffer's first ones; returns (output, BN statistics).

  The input is read by oneDNN's fused call, or else in chunks of `static.chunk` channels, as
  many as hold `in_width` (see the module's docstring), so a layer does the work of its own
  width rather than of the padded segment's, and the backward pass (`first_bwd`) needs
  workspace for one chunk at most, not for the whole buffer. `p` holds one layer's
  BatchNorm parameters padded to the buffer width and its dropout key, `kernels` the segment's
  flat kernel; `mean`/`meansq` are the buffer's per-channel batch statistics (used in training;
  running averages in `p` otherwise).
  """
  mean1, var1 = _statistics1(static, mean, meansq, p)
  y = lax.platform_dependent(
      buf, mean, meansq, p, kernels, j, in_width,
      cpu=functools.partial(_first_cpu, static), default=functools.partial(_first_chunks, static))
  if static.dropout_rate > 0 and static.train:
    y = _dropout(y, static.dropout_rate, _keys(static, p['key'])[0])
  return y.astype(static.dtype), {'mean1': mean1, 'var1': var1}


def _statistics1(static: Static, mean, meansq, p):
  """Mean and variance that the first BatchNorm normalises with: the buffer's batch statistics
  in training, the running averages otherwise."""
  if static.train:
    return mean, jnp.maximum(0.0, meansq - lax.square(mean))
  return p['mean1'], p['var1']


def _fused(static: Static, buf) -> bool:
  """Whether the layer's first BN-ReLU-Conv1x1 can be oneDNN's fused call (bottleneck.cc): a
  1x1 convolution, float32, on a CPU with oneDNN built."""
  return static.bottleneck and onednn.bottleneck_usable(buf)


def _norm_factors(static: Static, mean1, var1, scale, bias):
  """(a, b) with BatchNorm-ReLU = relu(x * a + b): the fused call's per-channel factors."""
  mul = scale * lax.rsqrt(var1 + static.epsilon)
  return mul, bias - mean1 * mul


def _first_cpu(static: Static, buf, mean, meansq, p, kernels, j, in_width):
  if not _fused(static, buf):
    return _first_chunks(static, buf, mean, meansq, p, kernels, j, in_width)
  a, b = _norm_factors(static, *_statistics1(static, mean, meansq, p), p['scale1'], p['bias1'])
  return onednn.bottleneck_forward(buf, a, b, kernels, in_width, kernel_offset(static, j))


def _first_chunks(static: Static, buf, mean, meansq, p, kernels, j, in_width):
  """The layer's first BN-ReLU-Conv, chunk by chunk (see `first`), before dropout."""
  width = buf.shape[-1]

  def body(c, y):
    chunk = lambda x: _chunk(static, x, c, width)
    return _first_chunk(static, chunk(buf), chunk(mean), chunk(meansq),
                        _chunk_params(static, p, kernels, j, c, in_width), acc=y)

  # The first chunk starts the sum (no array of zeros to add to); the loop adds the others.
  first_chunk = lambda x: _chunk(static, x, 0, width)
  y = _first_chunk(static, first_chunk(buf), first_chunk(mean), first_chunk(meansq),
                   _chunk_params(static, p, kernels, j, 0, in_width))
  return lax.fori_loop(1, ops.num_chunks(in_width, static.chunk), body, y)


def first_bwd(static: Static, buf, mean, meansq, p, kernels, j, in_width, d_y, carry):
  """Gradients of `first` for output gradient `d_y` (fused, or chunk by chunk). `carry` holds
  the reverse scan's gradients of the buffer, its statistics and the flat kernel, (d_buf,
  d_mean, d_meansq, d_kernels); this layer's parts are added to them, and they are returned with
  the gradients of the first BatchNorm's scale and bias."""
  if static.dropout_rate > 0 and static.train:
    _, vjp = jax.vjp(lambda y: _dropout(y, static.dropout_rate, _keys(static, p['key'])[0]),
                     jnp.zeros(d_y.shape, jnp.float32))
    d_y = vjp(d_y.astype(jnp.float32))[0]
  d_y = d_y.astype(jnp.float32)
  return lax.platform_dependent(
      buf, mean, meansq, p, kernels, j, in_width, d_y, tuple(carry),
      cpu=functools.partial(_first_bwd_cpu, static),
      default=functools.partial(_first_bwd_chunks, static))


def _first_bwd_cpu(static: Static, buf, mean, meansq, p, kernels, j, in_width, d_y, carry):
  """`first_bwd` through oneDNN's fused call: the per-channel factors' gradients it returns
  are taken back to the statistics, scale and bias by autodiff of `_norm_factors`."""
  if not _fused(static, buf):
    return _first_bwd_chunks(static, buf, mean, meansq, p, kernels, j, in_width, d_y, carry)
  d_buf, d_mean, d_meansq, d_kernels = carry

  def factors(mean, meansq, scale, bias):
    return _norm_factors(static, *_statistics1(static, mean, meansq, p), scale, bias)

  (a, b), vjp = jax.vjp(factors, mean, meansq, p['scale1'], p['bias1'])
  d_buf, d_kernels, d_a, d_b = onednn.bottleneck_backward(
      buf, a, b, kernels, in_width, kernel_offset(static, j), d_y, d_buf, d_kernels)
  dm, dmsq, d_scale, d_bias = vjp((d_a, d_b))
  return ((d_buf, d_mean + dm, d_meansq + dmsq, d_kernels),
          {'scale1': d_scale, 'bias1': d_bias})


def _first_bwd_chunks(static: Static, buf, mean, meansq, p, kernels, j, in_width, d_y, carry):
  """`first_bwd` chunk by chunk, after dropout's gradient."""
  width = buf.shape[-1]

  def body(c, carry):
    d_buf, d_mean, d_meansq, d_kernels, d_scale, d_bias = carry
    pc = _chunk_params(static, p, kernels, j, c, in_width)
    chunk_fn = lambda b, m, msq, s, bi, kk: _first_chunk(
        static, b, m, msq, {**pc, 'scale1': s, 'bias1': bi, 'kernel1': kk})
    chunk = lambda x: _chunk(static, x, c, width)
    _, vjp = jax.vjp(chunk_fn, chunk(buf), chunk(mean), chunk(meansq), pc['scale1'],
                     pc['bias1'], pc['kernel1'])
    # Zero for the chunk's channels that are not its own (their parameters are zero here).
    db, dm, dmsq, ds, dbi, dk = vjp(d_y)
    start = _chunk_start(static, c, width)
    add = lambda total, part, axis=-1: ops.add_at(total, part, start, axis)
    d_kernels = ops.add_at(d_kernels, dk, kernel_offset(static, j) + start, 2)
    return (add(d_buf, db), add(d_mean, dm), add(d_meansq, dmsq), d_kernels, add(d_scale, ds),
            add(d_bias, dbi))

  zeros = lambda v: jnp.zeros(v.shape, jnp.float32)
  carry = (*carry, zeros(p['scale1']), zeros(p['bias1']))
  *carry, d_scale, d_bias = lax.fori_loop(
      0, ops.num_chunks(in_width, static.chunk), body, tuple(carry))
  return tuple(carry), {'scale1': d_scale, 'bias1': d_bias}


def second(static: Static, y, p):
  """BN-ReLU-Conv3x3 of a bottleneck layer on its 1x1 convolution's output `y`."""
  if static.train:
    m, msq = batch_stats(y)
    mean2, var2 = m, jnp.maximum(0.0, msq - lax.square(m))
  else:
    mean2, var2 = p['mean2'], p['var2']
  h = _norm_relu(y, mean2, var2, p['scale2'], p['bias2'], static.epsilon, static.dtype)
  out = ops.conv_same(h, p['kernel2'].astype(static.dtype))
  if static.dropout_rate > 0 and static.train:
    out = _dropout(out, static.dropout_rate, _keys(static, p['key'])[1])
  return out.astype(static.dtype), {'mean2': mean2, 'var2': var2}


def layer(static: Static, buf, mean, meansq, p, kernels, j, in_width):
  """Dense layer j on the buffer: (its k new maps, its 1x1 output or None, BN statistics)."""
  y, stats = first(static, buf, mean, meansq, p, kernels, j, in_width)
  if not static.bottleneck:
    return y, None, stats
  out, stats2 = second(static, y, p)
  return out, y, {**stats, **stats2}
