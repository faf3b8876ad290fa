"""Scanned, memory-efficient dense blocks for any layer that dense_layer.py declares.

A block owns one feature buffer [batch, height, width, in + num_layers * k] (per segment, as in
scanned.py): layer i reads the buffer and writes its k new maps after the first `in + i * k`
channels. Its variables, declared with their own shapes (`dense_layer.LayerVariables`), are
zero-padded on the axes that follow the layer's input width (found from the declaration itself,
`_input_axes`) to the buffer's width and stacked, so that one `lax.scan` body runs every layer
with `dense_layer.apply`, the very definition the unrolled layer runs. That is exact for a layer
whose first unit reads its input channel by channel up to its first contraction
(`per_channel_input`: BatchNorm, activation, convolution): a channel with zero scale, bias and
kernel rows contributes exactly zero, and gets zero gradient.

Each segment is a `jax.custom_vjp`. The forward pass keeps the buffer only at the segment's end
(every layer's input is a prefix of it: the channels after it meet zero parameters); the
backward pass is a reverse scan that recomputes each layer from that buffer and differentiates
`dense_layer.apply` with `jax.vjp`. So memory stays linear in depth and compile time flat for
any layer, and no derivative is written by hand. What it costs against the specialised path of
the paper's layer (scanned.py): every layer works on the segment's whole width rather than its
own (its statistics, normalisation and first convolution), and recomputes the whole layer in
the backward pass (docs/performance.md, "Generic and specialised layers").
"""

import dataclasses
import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import dense_layer
from densenet_jax.models import layer
from densenet_jax.models import ops
from densenet_jax.models import scanned

Array = jax.Array
_CHANNELS = 3


def supports(units) -> bool:
  """Whether a layer of `units` can read a padded buffer: its first unit reads its input
  channel by channel (other layers are unrolled)."""
  return bool(units) and units[0].per_channel_input


@dataclasses.dataclass(frozen=True)
class _Static:
  """What a segment fixes at trace time (hashable, for custom_vjp)."""

  spec: layer.Spec
  units: Tuple[Any, ...]
  first_offset: int   # channel where the segment's first layer writes
  train: bool


def _layer(static: _Static, buf, v, key):
  """The layer on the buffer: (its k new maps, its BatchNorms' batch statistics)."""
  if not static.train or static.spec.dropout_rate == 0:
    key = None
  y, stats = dense_layer.apply(static.spec, static.units, v, buf, train=static.train, key=key)
  return y.astype(buf.dtype), stats


def _forward(static: _Static, buf, stacked, keys):
  k = static.spec.growth_rate
  dtype = buf.dtype

  def body(carry, xs):
    # The buffer is carried as its bits (ops.bits), so that its update is in place.
    buf = ops.from_bits(carry, dtype)
    j, v, key = xs
    y, stats = _layer(static, buf, v, key)
    buf = ops.update_slice(buf, y, static.first_offset + j * k, _CHANNELS)
    return ops.bits(buf), stats

  carry, stats = lax.scan(body, ops.bits(buf), (jnp.arange(keys.shape[0]), stacked, keys))
  return ops.from_bits(carry, dtype), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _segment(static, buf, stacked, keys):
  return _forward(static, buf, stacked, keys)


def _segment_fwd(static, buf, stacked, keys):
  buf_out, stats = _forward(static, buf, stacked, keys)
  return (buf_out, stats), (buf_out, stacked, keys)


def _segment_bwd(static, residuals, cotangents):
  """Reverse scan: each layer recomputed from the final buffer and differentiated by jax.vjp.
  The batch statistics output only moves running averages: no gradient."""
  buf_f, stacked, keys = residuals
  d_buf = cotangents[0].astype(jnp.float32)
  k = static.spec.growth_rate
  # Depend on the cotangent, so that no pass merges the recomputation into the forward pass
  # (efficient.py explains why).
  buf_r = buf_f + ops.zero_after(d_buf).astype(buf_f.dtype)

  def body(d_buf, xs):
    j, v, key = xs
    d_y = lax.dynamic_slice_in_dim(d_buf, static.first_offset + j * k, k, _CHANNELS)
    _, vjp = jax.vjp(lambda b, vv: _layer(static, b, vv, key)[0], buf_r, v)
    d_b, d_v = vjp(d_y.astype(buf_f.dtype))
    return d_buf + d_b.astype(jnp.float32), d_v

  d_buf, d_stacked = lax.scan(body, d_buf, (jnp.arange(keys.shape[0]), stacked, keys),
                              reverse=True)
  # Channels from first_offset on were written by this segment: the input's values there did
  # not reach the output.
  keep = jnp.arange(buf_f.shape[-1]) < static.first_offset
  return jnp.where(keep, d_buf, 0.0).astype(buf_f.dtype), d_stacked, None


_segment.defvjp(_segment_fwd, _segment_bwd)


def _input_axes(units, in_features: int):
  """For each variable of a layer, the axes whose size follows the layer's input width."""
  at, more = dense_layer.shapes(units, in_features), dense_layer.shapes(units, in_features + 1)
  return {module: {name: tuple(i for i, (a, b) in enumerate(zip(shape, more[module][name]))
                               if a != b) for name, shape in variables.items()}
          for module, variables in at.items()}


def _padded(v, axes, extra: int):
  """A layer's variable values zero-padded by `extra` on their input axes."""
  def pad(x, x_axes):
    return jnp.pad(x, [(0, extra if i in x_axes else 0) for i in range(x.ndim)])
  return {module: {name: pad(x, axes[module][name]) for name, x in variables.items()}
          for module, variables in v.items()}


def _unpadded(stats, j: int, shapes):
  """Layer j's batch statistics, cut from the stacked, padded ones to its own shapes."""
  return {module: {name: x[(j,) + tuple(slice(0, n) for n in shapes[module][name])]
                   for name, x in variables.items()}
          for module, variables in stats.items()}


def scanned_block(module: nn.Module, x: Array, spec: layer.Spec, keys: Optional[Array], *,
                  num_layers: int, kernel_init: Any, num_segments: int, train: bool) -> Array:
  """A dense block's output (input and all layers' maps, concatenated) computed by scans of
  `dense_layer.apply`. Call from inside `module`'s compact method: the variables are declared in
  it as `layer{i}` submodules, exactly as the unrolled block declares them. `keys`: the layers'
  raw dropout keys (`layer.block_keys`), None without dropout."""
  units = dense_layer.structure(spec)
  in_features, k = x.shape[-1], spec.growth_rate
  layers = [dense_layer.LayerVariables(units, in_features + i * k, kernel_init,
                                       name=f'layer{i + 1}') for i in range(num_layers)]
  values = [layer_vars() for layer_vars in layers]
  if keys is None:
    keys = jnp.zeros((num_layers, 2), jnp.uint32)   # unused: no dropout
  buf = x.astype(spec.dtype)
  for start, end in scanned.segment_bounds(in_features, k, num_layers, num_segments):
    width = in_features + end * k
    buf = ops.pad(buf, ((0, 0, 0),) * 3 + ((0, width - buf.shape[-1], 0),))
    padded = [_padded(values[i], _input_axes(units, in_features + i * k),
                      width - in_features - i * k) for i in range(start, end)]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *padded)
    static = _Static(spec, tuple(units), in_features + start * k, train)
    buf, stats = _segment(static, buf, stacked, keys[start:end])
    if train and not module.is_initializing():
      stats = lax.stop_gradient(stats)
      for j, i in enumerate(range(start, end)):
        layers[i](_unpadded(stats, j, dense_layer.shapes(units, in_features + i * k)),
                  spec.momentum)
  return buf
