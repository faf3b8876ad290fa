"""One dense layer of a scanned block (scanned.py), forward and backward, on the block's buffer.

A layer reads the first `in_width` channels of its segment's pre-allocated buffer and returns
its k new maps. `in_width` is traced (the scan's layer index sets it), so XLA cannot slice
exactly that many channels. On a CPU with oneDNN, a bottleneck layer's first BN-ReLU-Conv1x1 is
one fused call that takes `in_width` as an operand (densenet_jax/native/bottleneck.cc): it reads
exactly the layer's channels and does the BatchNorm-ReLU, the matrix product and, backward, the
gradients' elementwise work and reductions on blocks of rows held in cache; a bfloat16 buffer
is read as float32 there. Elsewhere (GPUs, TPUs, layers without bottleneck, other activations,
no oneDNN) the layer reads the buffer in chunks of `Static.chunk` channels, as many as its own
input fills, so its work follows its own width rather than the buffer's (up to the last
chunk's padding), and its backward pass (`first_bwd`, written out chunk by chunk) needs
workspace for one chunk. The segment's scans in scanned.py
call these once per layer; the padded BatchNorm parameters and the flat kernel layout they index
are described there.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import layer
from densenet_jax.models import ops
from densenet_jax.models import policy
from densenet_jax.native import onednn


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything about a segment that is fixed at trace time (hashable, for custom_vjp)."""

  spec: layer.Spec   # the layer's definition
  first_offset: int   # channel where the segment's first layer writes
  train: bool
  save_bottleneck: bool   # keep each layer's 1x1 output for the backward pass
  chunks: policy.Chunks   # input channels per step of a layer's first convolution (`first`)
  chunk: int = 0   # the chunk of the platform being lowered for (`_on`)


def _on(static: Static, platform: str) -> Static:
  return dataclasses.replace(static, chunk=static.chunks.on(platform))


def _keys(static: Static, key):
  """Dropout keys of a layer's two units ((None, None) without dropout), drawn as
  dense_layer.unit_keys draws them."""
  if static.spec.dropout_rate > 0 and static.train:
    first, second = jax.random.split(key)
    return first, second
  return None, None


def _chunk_start(static: Static, c, width):
  """First channel of chunk c of a `width`-channel buffer (see `ops.chunk_start`)."""
  return ops.chunk_start(c, static.chunk, width)


def _chunk(static: Static, x, c, width):
  """Chunk c of x's last (channel) axis, `width` long."""
  return ops.take_slice(x, _chunk_start(static, c, width), static.chunk, x.ndim - 1)


def kernel_offset(static: Static, j):
  """Where layer j of a segment starts in the segment's flat first-convolution kernel: the
  input widths of the layers before it, first_offset + i * k for i < j, summed."""
  return j * static.first_offset + static.spec.growth_rate * (j * (j - 1) // 2)


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
  """BN-act-Conv of one chunk of input channels: its share of the layer's first convolution,
  added to `acc` (the chunks before) where given."""
  spec = static.spec
  mean1, var1 = _statistics1(static, mean_c, meansq_c, pc)
  h = layer.pre_activation(spec, buf_c, mean1, var1, pc['scale1'], pc['bias1'])
  if acc is not None and spec.bottleneck and spec.dtype == jnp.float32:
    # The same 1x1 convolution, added into acc's buffer as oneDNN writes it.
    return ops.pointwise_accumulate(acc, h, pc['kernel1'])
  y = layer.convolve(spec, h, pc['kernel1']).astype(jnp.float32)
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
      cpu=functools.partial(_first_cpu, _on(static, 'cpu')),
      default=functools.partial(_first_chunks, _on(static, 'default')))
  y = layer.dropout(static.spec, y, _keys(static, p['key'])[0])
  return y.astype(static.spec.dtype), {'mean1': mean1, 'var1': var1}


def _statistics1(static: Static, mean, meansq, p):
  """Mean and variance that the first BatchNorm normalises with: the buffer's batch statistics
  in training, the running averages otherwise."""
  if static.train:
    return mean, layer.variance(mean, meansq)
  return p['mean1'], p['var1']


def _first_cpu(static: Static, buf, mean, meansq, p, kernels, j, in_width):
  if not policy.fused_bottleneck(static.spec, buf):
    return _first_chunks(static, buf, mean, meansq, p, kernels, j, in_width)
  a, b = layer.norm_factors(static.spec, *_statistics1(static, mean, meansq, p), p['scale1'],
                            p['bias1'])
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
  key = _keys(static, p['key'])[0]
  if key is not None:
    _, vjp = jax.vjp(lambda y: layer.dropout(static.spec, y, key),
                     jnp.zeros(d_y.shape, jnp.float32))
    d_y = vjp(d_y.astype(jnp.float32))[0]
  d_y = d_y.astype(jnp.float32)
  return lax.platform_dependent(
      buf, mean, meansq, p, kernels, j, in_width, d_y, tuple(carry),
      cpu=functools.partial(_first_bwd_cpu, _on(static, 'cpu')),
      default=functools.partial(_first_bwd_chunks, _on(static, 'default')))


def _first_bwd_cpu(static: Static, buf, mean, meansq, p, kernels, j, in_width, d_y, carry):
  """`first_bwd` through oneDNN's fused call: the per-channel factors' gradients it returns
  are taken back to the statistics, scale and bias by autodiff of `_norm_factors`."""
  if not policy.fused_bottleneck(static.spec, buf):
    return _first_bwd_chunks(static, buf, mean, meansq, p, kernels, j, in_width, d_y, carry)
  d_buf, d_mean, d_meansq, d_kernels = carry

  def factors(mean, meansq, scale, bias):
    return layer.norm_factors(static.spec, *_statistics1(static, mean, meansq, p), scale, bias)

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
  """The second unit of a bottleneck layer (BN-act-Conv3x3, dropout) on its first unit's
  output `y`; returns it and the BatchNorm statistics used."""
  spec = static.spec
  if static.train:
    mean2, var2 = layer.statistics(y)
  else:
    mean2, var2 = p['mean2'], p['var2']
  h = layer.pre_activation(spec, y, mean2, var2, p['scale2'], p['bias2'])
  out = layer.dropout(spec, layer.convolve(spec, h, p['kernel2']), _keys(static, p['key'])[1])
  return out.astype(spec.dtype), {'mean2': mean2, 'var2': var2}


def layer_forward(static: Static, buf, mean, meansq, p, kernels, j, in_width):
  """Dense layer j on the buffer: (its k new maps, its 1x1 output or None, BN statistics)."""
  y, stats = first(static, buf, mean, meansq, p, kernels, j, in_width)
  if not static.spec.bottleneck:
    return y, None, stats
  out, stats2 = second(static, y, p)
  return out, y, {**stats, **stats2}
