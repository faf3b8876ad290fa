"""The memory-efficient mode: what it recomputes in the backward pass instead of storing.

Each layer's concatenation and first unit (Pleiss et al., 2017; any unit of
dense_layer.structure, BN + activation + convolution in the paper's layer), below; the
transitions, chunk by chunk (`chunked_transition`); the ImageNet stem
(`recomputed_imagenet_stem`). The math is models/layer.py's; only what is kept differs.

In a dense block, layer i reads the concatenation of all i earlier feature maps. Plain autodiff
stores, for every layer, that concatenation and its normalised, rectified copy: stored memory
grows quadratically with depth. Here each layer stores only references to the feature maps it
was given (which are shared by all layers of the block, so they cost linear memory in total) and
rebuilds the concatenation and its first unit during the backward pass, differentiating the
unit's own definition with `jax.vjp`.

Why not `nn.remat`/`jax.checkpoint`: XLA:CPU removes the optimisation barriers that
`jax.checkpoint` inserts (its `cse_barrier_expander` pass) before common-subexpression
elimination, which then merges the recomputation back into the forward pass: the plain
checkpoint saves nothing there (measured: the same temporary memory with every policy). A
`jax.custom_vjp` whose backward recomputation depends on the incoming cotangent cannot be merged
into or hoisted to the forward pass by any compiler pass. One consequence: a NaN or infinite
cotangent makes this layer's whole input gradient NaN, which only happens once training has
diverged (and the trainer stops on a non-finite loss).

The variables are declared under the same names and shapes as `nn.BatchNorm` and `nn.Conv`, so
a checkpoint of the standard model restores into the memory-efficient one and vice versa.
"""

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import layer
from densenet_jax.models import ops
from densenet_jax.models import policy
from densenet_jax.models import pooling

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Unit:
  """What `_recomputed` fixes at trace time (hashable, for custom_vjp)."""

  spec: layer.Spec
  unit: Any   # a unit of dense_layer.structure
  train: bool


def _unit_on_pieces(static: _Unit, pieces, v, key):
  """The unit on the concatenation of `pieces`: (output, batch statistics)."""
  return static.unit.apply(static.spec, v, jnp.concatenate(pieces, axis=-1), train=static.train,
                           key=key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recomputed(static, pieces, v, key):
  return _unit_on_pieces(static, pieces, v, key)


def _recomputed_fwd(static, pieces, v, key):
  # Residuals: the inputs only. The pieces are the block's own feature maps, alive anyway.
  return _unit_on_pieces(static, pieces, v, key), (pieces, v, key)


def _recomputed_bwd(static, residuals, cotangents):
  """Recomputes the unit and differentiates it with `jax.vjp`: any unit, no written
  derivative. The batch statistics output only moves running averages: no gradient."""
  pieces, v, key = residuals
  g = cotangents[0]
  # Make the recomputation depend on the cotangent: adding 0 * g[0] (which XLA may not fold,
  # since 0 * NaN is NaN) gives its inputs values the forward pass never had, so no compiler
  # pass can merge it back into the forward pass or hoist it there. An optimisation barrier
  # does not do this on CPU: XLA's cse_barrier_expander removes barriers before CSE runs.
  zero = ops.zero_after(g)
  pieces = tuple(p + zero.astype(p.dtype) for p in pieces)
  _, vjp = jax.vjp(lambda p, vv: _unit_on_pieces(static, p, vv, key)[0], pieces, v)
  d_pieces, d_v = vjp(g)
  return d_pieces, d_v, None


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def recomputed_unit(spec: layer.Spec, unit, v, features: Sequence[Array], key, *,
                    train: bool):
  """A dense layer's first unit on the concatenation of `features` (the block's earlier feature
  maps, [batch, height, width, c_j]), recomputed in the backward pass: (output, batch
  statistics), as `unit.apply` gives them. `v`: the layer's variable values (dense_layer.Values).
  """
  return _recomputed(_Unit(spec, unit, train), tuple(features), v, key)


def _pre_activation(spec: layer.Spec, x, scale, bias, mean, var, train: bool):
  """`layer.pre_activation` of x, and the statistics it used: x's own batch statistics in
  training, else the given averages."""
  if train:
    mean, var = layer.statistics(x)
  return layer.pre_activation(spec, x, mean, var, scale, bias), (mean, var)


@dataclasses.dataclass(frozen=True)
class _Chunked:
  """What `_chunked_transition` fixes at trace time (hashable, for custom_vjp)."""

  spec: layer.Spec
  train: bool
  pool: bool   # 2x2 average pool between the activation and the convolution
  chunks: policy.Chunks   # input channels per step, for each platform
  chunk: int = 0   # this platform's (`_on`)


def _on(static: _Chunked, platform: str) -> _Chunked:
  return dataclasses.replace(static, chunk=static.chunks.on(platform))


def _per_platform(f, static: _Chunked, *args):
  """f(static, *args) with the chunk of the platform the step is lowered for."""
  return lax.platform_dependent(*args, cpu=functools.partial(f, _on(static, 'cpu')),
                                default=functools.partial(f, _on(static, 'default')))


def _transition_chunk(static: _Chunked, x, scale, bias, mean, var, kernel):
  """BN-act-[pool]-Conv1x1 of one chunk of input channels: its share of the output, and the
  chunk's BatchNorm statistics (its batch statistics in training, else the given averages)."""
  h, (mean, var) = _pre_activation(static.spec, x, scale, bias, mean, var, static.train)
  if static.pool:
    h = pooling.avg_pool2(h)
  return layer.convolve(static.spec, h, kernel).astype(jnp.float32), (mean, var)


def _chunk_inputs(static: _Chunked, c, x, scale, bias, mean, var, kernel):
  """Chunk c of the inputs, and its first channel. Channels it shares with the chunk before
  get zero scale, bias and kernel rows: they add exactly zero, and get zero gradient, here."""
  width = x.shape[-1]
  start = ops.chunk_start(c, static.chunk, width)
  new = ops.chunk_is_new(c, static.chunk, width)
  sl = lambda v, axis: lax.dynamic_slice_in_dim(v, start, static.chunk, axis)
  x_c = ops.take_slice(x, start, static.chunk, 3)   # on the bits of a bfloat16 x
  return (x_c, jnp.where(new, sl(scale, 0), 0.0), jnp.where(new, sl(bias, 0), 0.0),
          sl(mean, 0), sl(var, 0), jnp.where(new[:, None], sl(kernel, 2), 0.0)), start


def _transition_forward(static: _Chunked, x, scale, bias, mean, var, kernel):
  """The sum over chunks of x's channels, with the per-channel statistics used."""
  n, h, w, width = x.shape
  if static.pool:
    h, w = h // 2, w // 2

  def body(c, carry):
    y, mean_out, var_out = carry
    inputs, start = _chunk_inputs(static, c, x, scale, bias, mean, var, kernel)
    y_c, (mean_c, var_c) = _transition_chunk(static, *inputs)
    return (y + y_c, lax.dynamic_update_slice_in_dim(mean_out, mean_c, start, 0),
            lax.dynamic_update_slice_in_dim(var_out, var_c, start, 0))

  init = (jnp.zeros((n, h, w, kernel.shape[-1]), jnp.float32),
          jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.float32))
  y, mean_out, var_out = lax.fori_loop(0, ops.num_chunks(width, static.chunk), body, init)
  return y.astype(static.spec.dtype), (mean_out, var_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_transition(static: _Chunked, x, scale, bias, mean, var, kernel):
  """conv1x1([pool](pre_activation(x))) summed over chunks of x's channels; returns it with
  the per-channel BatchNorm statistics used. BatchNorm and the activation act per channel
  (batch statistics too), so each chunk's share is exact on its own."""
  return _per_platform(_transition_forward, static, x, scale, bias, mean, var, kernel)


def _chunked_fwd(static, x, scale, bias, mean, var, kernel):
  # Residuals: the inputs only; x is the dense block's output, which its own backward pass
  # keeps anyway.
  return _chunked_transition(static, x, scale, bias, mean, var, kernel), (
      x, scale, bias, mean, var, kernel)


def _transition_backward(static, x, scale, bias, mean, var, kernel, g):
  """Recomputes and differentiates chunk by chunk: workspace for one chunk, not for all of x."""

  def body(c, carry):
    dx, dscale, dbias, dkernel = carry
    (x_c, scale_c, bias_c, mean_c, var_c, kernel_c), start = _chunk_inputs(
        static, c, x, scale, bias, mean, var, kernel)
    f = lambda xx, s, b, k: _transition_chunk(static, xx, s, b, mean_c, var_c, k)[0]
    _, vjp = jax.vjp(f, x_c, scale_c, bias_c, kernel_c)
    dx_c, dscale_c, dbias_c, dkernel_c = vjp(g)
    return (ops.add_at(dx, dx_c, start, 3), ops.add_at(dscale, dscale_c, start, 0),
            ops.add_at(dbias, dbias_c, start, 0), ops.add_at(dkernel, dkernel_c, start, 2))

  zeros = lambda v: jnp.zeros(v.shape, jnp.float32)
  # The input gradient starts from zeros computed from g. XLA scheduled a constant zero array
  # at the start of the step, and it stayed allocated through the whole forward pass (a block
  # output's size, the largest arrays of the step). As in `_recomputed_bwd`, a NaN g
  # makes the whole gradient NaN, which only happens once training has diverged.
  dx = jnp.full(x.shape, ops.zero_after(g), jnp.float32)
  return lax.fori_loop(0, ops.num_chunks(x.shape[-1], static.chunk), body,
                       (dx, zeros(scale), zeros(bias), zeros(kernel)))


def _chunked_bwd(static, residuals, cotangents):
  """The statistics output is only used for running averages and gets no gradient."""
  x, scale, bias, mean, var, kernel = residuals
  g = cotangents[0].astype(jnp.float32)
  dx, dscale, dbias, dkernel = _per_platform(_transition_backward, static, x, scale, bias,
                                             mean, var, kernel, g)
  return dx.astype(x.dtype), dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(var), dkernel


_chunked_transition.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_transition(spec: layer.Spec, x: Array, *, out_features: int, pool: bool,
                       train: bool, kernel_init: Any, chunks: policy.Chunks, norm_name: str,
                       conv_name: str, initializing: bool) -> Array:
  """A transition's `conv1x1(pre_activation(x))`, with a 2x2 average pool before the
  convolution if `pool`, computed chunk by chunk of input channels in both passes.

  A transition's input is its whole dense block's output. Autodiff of BN-act-pool-conv holds
  several arrays of that size at once in the backward pass (the centred input, the
  activation's mask, the pool's and the normalisation's gradients), on top of the block's own
  saved buffer and its gradient; in the memory-efficient DenseNet-BC-100 (batch 64) four such
  arrays of the first block's width made the train step's peak. Here the backward pass
  recomputes and differentiates one chunk at a time and holds one input-sized array, the input
  gradient.

  Variables are declared as `layer.unit` declares them: `nn.BatchNorm`'s under `norm_name`, a
  bias-free 1x1 `nn.Conv`'s under `conv_name`.
  """
  channels = x.shape[-1]
  norm = layer.BatchNormVariables(channels, name=norm_name)
  scale, bias, ra_mean, ra_var = norm()
  kernel = layer.ConvKernel((1, 1, channels, out_features), kernel_init, name=conv_name)()['kernel']
  static = _Chunked(spec, train, pool, chunks.at_most(channels))
  y, batch_stats = _chunked_transition(static, x, scale, bias, ra_mean, ra_var, kernel)
  if train and not initializing:
    norm(batch_stats, spec.momentum)
  return y


@dataclasses.dataclass(frozen=True)
class _Stem:
  """What `_recomputed_stem` fixes at trace time (hashable, for custom_vjp)."""

  spec: layer.Spec
  train: bool


def _stem_forward(static: _Stem, images, kernel, scale, bias, mean, var):
  """7x7/2 convolution, BatchNorm, activation, 3x3/2 max pool; returns it and the BN
  statistics."""
  dtype = static.spec.dtype
  x = ops.conv(images.astype(dtype), kernel, 2, 3)   # the kernel is cast there (see ops)
  h, (mean, var) = _pre_activation(static.spec, x, scale, bias, mean, var, static.train)
  return pooling.max_pool(h, 3, 2, 1), (mean, var)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recomputed_stem(static: _Stem, images, kernel, scale, bias, mean, var):
  return _stem_forward(static, images, kernel, scale, bias, mean, var)


def _recomputed_stem_fwd(static, *inputs):
  # Residuals: the inputs only, the images being 1/16 the size of one stem activation.
  return _stem_forward(static, *inputs), inputs


def _recomputed_stem_bwd(static, residuals, cotangents):
  images, kernel, scale, bias, mean, var = residuals
  g = cotangents[0]
  # Depend on the cotangent, as in `_recomputed_bwd`, so that no pass merges the
  # recomputation back into the forward pass.
  images = images + ops.zero_after(g).astype(images.dtype)
  f = lambda im, k, s, b: _stem_forward(static, im, k, s, b, mean, var)[0]
  _, vjp = jax.vjp(f, images, kernel, scale, bias)
  return (*vjp(g), jnp.zeros_like(mean), jnp.zeros_like(var))


_recomputed_stem.defvjp(_recomputed_stem_fwd, _recomputed_stem_bwd)


def recomputed_imagenet_stem(spec: layer.Spec, images: Array, *, features: int, train: bool,
                             kernel_init: Any, conv_name: str, norm_name: str,
                             initializing: bool) -> Array:
  """The ImageNet stem (7x7/2 convolution, BN, activation, 3x3/2 max pool), recomputed from
  the images in the backward pass.

  Its activations are at half the input resolution: at 224x224 each is as large as the whole
  first dense block's output, and autodiff keeps three of them (the convolution's output, the
  pool's input, its padded copy) through the entire backward pass. Recomputing costs one stem
  forward pass per step and keeps only the images. Variables as `nn.Conv` (bias-free, under
  `conv_name`) and `nn.BatchNorm` (under `norm_name`) declare them.
  """
  kernel = layer.ConvKernel((7, 7, images.shape[-1], features), kernel_init,
                            name=conv_name)()['kernel']
  norm = layer.BatchNormVariables(features, name=norm_name)
  scale, bias, ra_mean, ra_var = norm()
  y, batch_stats = _recomputed_stem(_Stem(spec, train), images, kernel, scale, bias, ra_mean,
                                    ra_var)
  if train and not initializing:
    norm(batch_stats, spec.momentum)
  return y
