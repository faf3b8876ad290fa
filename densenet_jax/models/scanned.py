"""The specialised scanned dense block: loops over one pre-allocated feature buffer, written
for the paper's layer only (`computes`; any other layer takes generic_scan.py, chosen in
dispatch.py). docs/design.md, "Scanned dense blocks", says why each choice was made.

An unrolled dense block puts every layer into the compiled program separately, so compile time
grows with depth, and every layer rebuilds the growing concatenation of its block, a copy whose
total size grows quadratically with depth.

Here a block owns one buffer [batch, height, width, in + num_layers * k]: layer i reads the
first `in + i * k` channels and writes its k new maps in place after them. Layers of a block then
differ only in how many channels they read, so `lax.scan` runs all of them as one compiled loop
body: their first BatchNorm's parameters are zero-padded to the buffer's width and stacked, and
their first convolution kernels, whose input widths differ, are laid end to end in one flat
array that each layer slices at its own offset (`_flat_kernels`). Zero scale and bias, and
masked kernel rows, make unwritten and later channels contribute exactly nothing. The stored
parameters keep the paper's exact shapes and names, identical to the unrolled block's, and
checkpoints move freely between the two. The layer's math is models/layer.py's, as for the
unrolled layers; scanned_layer.py holds one layer's forward and backward pass on the buffer
(reading it in chunks, or through oneDNN's fused call where that applies).

A block can also be split into *segments*, each a scan over a buffer only as wide as its own last
layer needs; the split points minimise the padded width summed over layers (`segment_bounds`).
Each segment adds a saved buffer and a compiled loop, so one segment per block is the default.

Each segment is a `jax.custom_vjp`. Autodiff of a scan would store the whole buffer once per
layer (quadratic memory); here the forward pass saves the buffer only at the segment's end (every
earlier layer's input is a prefix of it) and the backward pass is a reverse scan that recomputes
each layer's first BatchNorm and activation from that buffer. The standard mode also saves each
layer's 1x1 convolution output (4k maps a layer, linear in depth) so that the backward pass does
not redo that convolution; the memory-efficient mode recomputes the whole layer instead. The
BatchNorm statistics of a buffer channel never change once written, so they are carried along
as per-channel mean and mean of squares instead of being recomputed over the whole buffer.
"""

import functools
from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import dense_layer
from densenet_jax.models import layer
from densenet_jax.models import ops
from densenet_jax.models import policy
from densenet_jax.models import scanned_layer

Array = jax.Array
_CHANNELS = 3


def segment_bounds(in_features: int, growth_rate: int, num_layers: int,
                   num_segments: int) -> List[Tuple[int, int]]:
  """Splits layers [0, num_layers) into at most `num_segments` contiguous [start, end) runs.

  Every layer of a run is padded to the input width of the run's last layer, so the cost of a
  run is (end - start) * (in_features + (end - 1) * growth_rate); the split minimises the total
  by dynamic programming (at most a few hundred layers, so this is instant).
  """
  num_segments = max(1, min(num_segments, num_layers))

  def cost(start, end):
    return (end - start) * (in_features + (end - 1) * growth_rate)

  inf = float('inf')
  # best[s][e]: minimal cost of layers [0, e) in s runs; choice[s][e]: start of the last run.
  best = [[inf] * (num_layers + 1) for _ in range(num_segments + 1)]
  choice = [[0] * (num_layers + 1) for _ in range(num_segments + 1)]
  best[0][0] = 0
  for s in range(1, num_segments + 1):
    for e in range(1, num_layers + 1):
      for start in range(s - 1, e):
        c = best[s - 1][start] + cost(start, e)
        if c < best[s][e]:
          best[s][e], choice[s][e] = c, start
  s = min(range(1, num_segments + 1), key=lambda s: best[s][num_layers])
  bounds, end = [], num_layers
  while s > 0:
    start = choice[s][end]
    bounds.append((start, end))
    end, s = start, s - 1
  return bounds[::-1]


def _forward(static: scanned_layer.Static, buf, mean, meansq, params, kernels, keys):
  """Runs the segment's layers in a scan. Returns the filled buffer, its statistics, each
  layer's BatchNorm batch statistics (stacked) and, when `static.save_bottleneck`, each layer's
  1x1 convolution output (stacked; else None)."""
  k = static.spec.growth_rate
  dtype = buf.dtype

  def body(carry, xs):
    # The buffer is carried as its bits (ops.bits), so that its update is in place.
    buf, mean, meansq = carry
    buf = ops.from_bits(buf, dtype)
    j, p, key = xs
    offset = static.first_offset + j * k
    piece, y, stats = scanned_layer.layer_forward(static, buf, mean, meansq, dict(p, key=key),
                                                  kernels, j, offset)
    buf = ops.update_slice(buf, piece, offset, _CHANNELS)
    if static.train:
      m, msq = layer.moments(piece.astype(buf.dtype))
      mean = lax.dynamic_update_slice_in_dim(mean, m, offset, 0)
      meansq = lax.dynamic_update_slice_in_dim(meansq, msq, offset, 0)
    # The 1x1 outputs are stacked as bits too.
    saved = ops.bits(y) if static.save_bottleneck else None
    return (ops.bits(buf), mean, meansq), (stats, saved)

  num_layers = keys.shape[0]
  (buf, mean, meansq), (stats, saved) = lax.scan(
      body, (ops.bits(buf), mean, meansq), (jnp.arange(num_layers), params, keys))
  return ops.from_bits(buf, dtype), mean, meansq, stats, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _segment(static, buf, mean, meansq, params, kernels, keys):
  return _forward(static, buf, mean, meansq, params, kernels, keys)[:4]


def _segment_fwd(static, buf, mean, meansq, params, kernels, keys):
  buf_out, mean_out, meansq_out, stats, saved = _forward(static, buf, mean, meansq, params,
                                                         kernels, keys)
  residuals = (buf_out, mean_out, meansq_out, params, kernels, keys, saved)
  return (buf_out, mean_out, meansq_out, stats), residuals


def _segment_bwd(static, residuals, cotangents):
  """Reverse scan: each layer is recomputed from the final buffer, whose first channels are
  exactly that layer's input (later channels meet zero BatchNorm parameters and masked kernel
  rows). With saved 1x1 outputs only the elementwise BN-ReLU before the 1x1 convolution is
  recomputed."""
  buf_f, mean_f, meansq_f, params, kernels, keys, saved = residuals
  d_buf, d_mean, d_meansq, _ = cotangents   # per-layer BN statistics are not differentiated
  k = static.spec.growth_rate
  count = buf_f.shape[0] * buf_f.shape[1] * buf_f.shape[2]
  d_buf = d_buf.astype(jnp.float32)
  # From the cotangent, not a constant, which XLA would schedule at the step's start.
  d_kernels = jnp.full(kernels.shape, ops.zero_after(d_mean), jnp.float32)

  def body(carry, xs):
    d_buf, d_mean, d_meansq, d_kernels = carry
    j, p, key, y = xs
    if y is not None:
      y = ops.from_bits(y, static.spec.dtype)
    lp = dict(p, key=key)   # the layer's parameters and its dropout key
    offset = static.first_offset + j * k
    # Gradient of this layer's output: from later layers (and the block's output), plus the
    # part that reached it through the BatchNorm statistics of its channels.
    d_piece = lax.dynamic_slice_in_dim(d_buf, offset, k, _CHANNELS)
    if static.train:
      piece = ops.take_slice(buf_f, offset, k, _CHANNELS).astype(jnp.float32)
      d_piece += (lax.dynamic_slice_in_dim(d_mean, offset, k, 0)
                  + 2.0 * piece * lax.dynamic_slice_in_dim(d_meansq, offset, k, 0)) / count
    d_piece = d_piece.astype(static.spec.dtype)
    dp = jax.tree.map(jnp.zeros_like, p)
    if static.spec.bottleneck:
      if y is None:   # memory-efficient: recompute the 1x1 output
        y = scanned_layer.first(static, buf_f, mean_f, meansq_f, lp, kernels, j, offset)[0]
      second_names = ('scale2', 'bias2', 'kernel2')
      _, vjp_second = jax.vjp(
          lambda yy, pp: scanned_layer.second(static, yy, {**lp, **pp})[0], y,
          {n: p[n] for n in second_names})
      d_y, dp_second = vjp_second(d_piece)
      dp.update(dp_second)
    else:
      d_y = d_piece
    carry, dp_first = scanned_layer.first_bwd(static, buf_f, mean_f, meansq_f, lp, kernels, j,
                                              offset, d_y, (d_buf, d_mean, d_meansq, d_kernels))
    dp.update({n: v.astype(p[n].dtype) for n, v in dp_first.items()})
    return carry, dp

  num_layers = keys.shape[0]
  (d_buf, d_mean, d_meansq, d_kernels), d_params = lax.scan(
      body, (d_buf, d_mean, d_meansq, d_kernels), (jnp.arange(num_layers), params, keys, saved),
      reverse=True)
  # Channels from first_offset on were overwritten by this segment: the input's values there
  # did not reach the output.
  width = buf_f.shape[-1]
  keep = jnp.arange(width) < static.first_offset
  d_buf = jnp.where(keep, d_buf, 0.0).astype(buf_f.dtype)
  d_mean = jnp.where(keep, d_mean, 0.0)
  d_meansq = jnp.where(keep, d_meansq, 0.0)
  return d_buf, d_mean, d_meansq, d_params, d_kernels.astype(kernels.dtype), None


_segment.defvjp(_segment_fwd, _segment_bwd)


def computes(spec: layer.Spec):
  """The layer structure this path is written for (dense_layer.structure of the paper's layer):
  BN-act-Conv1x1 to bn_size * k maps then BN-act-Conv3x3 to k maps, or one BN-act-Conv3x3.
  Its hand-written backward pass, carried statistics, chunks and oneDNN's fused call compute
  exactly this and nothing else."""
  k = spec.growth_rate
  if spec.bottleneck:
    return (dense_layer.NormActConv('norm1', 'conv1', 1, spec.bn_size * k),
            dense_layer.NormActConv('norm2', 'conv2', 3, k))
  return (dense_layer.NormActConv('norm1', 'conv1', 3, k),)


def supports(spec: layer.Spec, units) -> bool:
  """Whether this path computes a layer of `units` (any other takes generic_scan.py)."""
  return tuple(units) == computes(spec)


def _flat(v, bottleneck: bool):
  """A layer's variable values (dense_layer.Values) under the names this path indexes:
  scale1, bias1, mean1, var1, kernel1 (and ...2 with bottleneck)."""
  out = {}
  for n in ('1', '2') if bottleneck else ('1',):
    out.update({name + n: v['norm' + n][name] for name in ('scale', 'bias', 'mean', 'var')})
    out['kernel' + n] = v['conv' + n]['kernel']
  return out


def _nested(stats):
  """This path's per-layer batch statistics (mean1, var1, ...) as dense_layer.update takes
  them."""
  return {'norm' + n: {'mean': stats['mean' + n], 'var': stats['var' + n]}
          for n in ('1', '2') if 'mean' + n in stats}


def _padded(p, width):
  """One layer's parameters and running statistics without its first kernel (`_flat_kernels`
  holds it), those of its first BatchNorm zero-padded on input channels to `width`."""
  extra = width - p['scale1'].shape[0]
  out = {}
  for name, v in p.items():
    if name in ('scale1', 'bias1', 'mean1'):
      v = jnp.pad(v, (0, extra))
    elif name == 'var1':
      v = jnp.pad(v, (0, extra), constant_values=1.0)
    elif name == 'kernel1':
      continue
    out[name] = v
  return out


def _flat_kernels(kernels, width):
  """The first convolution kernels of a segment's layers, [h, w, in_i, out] with growing in_i,
  as one [h, w, sum of in_i + k, out] array (`scanned_layer.kernel_offset`: where each starts).

  Zero-padded to the buffer's `width` and stacked, they would take about twice their own
  memory, and so would their gradient (the last layer's width against the average). The k
  zero rows at the end keep every chunk's slice inside the array: a layer's
  chunks read up to `width` channels from its start, k past the last layer's own inputs.
  """
  extra = width - kernels[-1].shape[2]
  pad = jnp.zeros(kernels[-1].shape[:2] + (extra, kernels[-1].shape[3]), kernels[-1].dtype)
  return jnp.concatenate(list(kernels) + [pad], axis=2)


def scanned_block(module: nn.Module, x: Array, spec: layer.Spec, keys: Optional[Array], *,
                  num_layers: int, kernel_init: Any, num_segments: int, memory_efficient: bool,
                  train: bool, chunks: policy.Chunks) -> Array:
  """A dense block's output (input and all layers' maps, concatenated) computed by scans.

  Call from inside `module`'s compact method: the variables are declared in it as `layer{i}`
  submodules, exactly as the unrolled `DenseBlock` declares them. `keys`: the layers' raw
  dropout keys (`layer.block_keys`), None without dropout.
  """
  in_features = x.shape[-1]
  k = spec.growth_rate
  units = computes(spec)
  layers = [dense_layer.LayerVariables(units, in_features + i * k, kernel_init,
                                       name=f'layer{i + 1}') for i in range(num_layers)]
  variables = [_flat(layer_vars(), spec.bottleneck) for layer_vars in layers]
  initializing = module.is_initializing()
  if keys is None:
    keys = jnp.zeros((num_layers, 2), jnp.uint32)   # unused: no dropout
  buf = x.astype(spec.dtype)
  mean = meansq = None
  if train:
    mean, meansq = layer.moments(buf)
  for start, end in segment_bounds(in_features, k, num_layers, num_segments):
    width = in_features + end * k
    extra = width - buf.shape[-1]
    buf = ops.pad(buf, ((0, 0, 0),) * 3 + ((0, extra, 0),))
    if train:
      mean, meansq = jnp.pad(mean, (0, extra)), jnp.pad(meansq, (0, extra))
    else:
      mean = meansq = jnp.zeros((width,), jnp.float32)
    # Every layer of the segment reads the whole segment buffer: pad its first BatchNorm to it,
    # and lay the first kernels end to end.
    layer_params = [_padded(variables[i], width) for i in range(start, end)]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *layer_params)
    kernels = _flat_kernels([variables[i]['kernel1'] for i in range(start, end)], width)
    static = scanned_layer.Static(spec, in_features + start * k, train,
                                  save_bottleneck=spec.bottleneck and not memory_efficient,
                                  chunks=chunks.at_most(width))
    buf, mean, meansq, stats = _segment(static, buf, mean, meansq, stacked, kernels,
                                        keys[start:end])
    if train and not initializing:
      stats = jax.lax.stop_gradient(stats)
      for j, i in enumerate(range(start, end)):
        width_i = in_features + i * k   # stats of norm1 are padded to the segment's width
        layers[i](_nested({name: (v[j, :width_i] if name.endswith('1') else v[j])
                           for name, v in stats.items()}), spec.momentum)
  return buf
