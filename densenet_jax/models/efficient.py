"""The memory-efficient mode: what it recomputes in the backward pass instead of storing.

Each layer's concatenation + BN + ReLU + convolution (Pleiss et al., 2017), below; the
transitions, chunk by chunk (`bn_relu_conv1x1_chunked`); the ImageNet stem
(`recomputed_imagenet_stem`).

In a dense block, layer i reads the concatenation of all i earlier feature maps. Plain autodiff
stores, for every layer, that concatenation and its normalised, rectified copy: stored memory
grows quadratically with depth. Here each layer stores only references to the feature maps it
was given (which are shared by all layers of the block, so they cost linear memory in total) and
rebuilds the concatenation, BatchNorm, ReLU and first convolution during the backward pass.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import ops

Array = jax.Array


def _normalize_relu_conv(pieces, mean, var, scale, bias, kernel, *, epsilon, padding, dtype):
  """relu((concat(pieces) - mean) * scale / sqrt(var + eps) + bias) convolved with `kernel`,
  zero-padded by `padding` on every side."""
  x = jnp.concatenate([jnp.asarray(p, jnp.float32) for p in pieces], axis=-1)
  mul = scale * lax.rsqrt(var + epsilon)
  y = nn.relu((x - mean) * mul + bias).astype(dtype)
  if kernel.shape[:2] == (1, 1):
    return ops.pointwise(y, kernel.astype(dtype))
  return ops.conv(y, kernel.astype(dtype), 1, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _recomputed(pieces, mean, var, scale, bias, kernel, epsilon, padding, dtype):
  return _normalize_relu_conv(pieces, mean, var, scale, bias, kernel,
                              epsilon=epsilon, padding=padding, dtype=dtype)


def _recomputed_fwd(pieces, mean, var, scale, bias, kernel, epsilon, padding, dtype):
  out = _normalize_relu_conv(pieces, mean, var, scale, bias, kernel,
                             epsilon=epsilon, padding=padding, dtype=dtype)
  # Residuals: the inputs only. The pieces are the block's own feature maps, alive anyway.
  return out, (pieces, mean, var, scale, bias, kernel)


def _recomputed_bwd(epsilon, padding, dtype, residuals, g):
  pieces, *rest = residuals
  # Make the recomputation depend on the cotangent: adding 0 * g[0] (which XLA may not fold,
  # since 0 * NaN is NaN) gives its inputs values the forward pass never had, so no compiler
  # pass can merge it back into the forward pass or hoist it there. An optimisation barrier
  # does not do this on CPU: XLA's cse_barrier_expander removes barriers before CSE runs.
  zero = ops.zero_after(g)
  pieces = tuple(p + zero.astype(p.dtype) for p in pieces)
  f = functools.partial(_normalize_relu_conv, epsilon=epsilon, padding=padding, dtype=dtype)
  _, vjp = jax.vjp(f, pieces, *rest)
  return vjp(g)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


class _BatchNormVariables(nn.Module):
  """Declares exactly the variables of `nn.BatchNorm` (scale, bias; mean, var) for C features.

  Returns their values (scale, bias, running mean, running var). Given `batch_stats`, a
  (mean, var) pair of batch statistics, it first moves the running averages towards them.
  """

  features: int

  @nn.compact
  def __call__(self, batch_stats=None, momentum=None):
    shape = (self.features,)
    mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), shape)
    var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), shape)
    scale = self.param('scale', nn.initializers.ones, shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, shape, jnp.float32)
    if batch_stats is not None:
      for average, value in zip((mean, var), batch_stats):
        average.value = momentum * average.value + (1 - momentum) * lax.stop_gradient(value)
    return scale, bias, mean.value, var.value


class _ConvKernel(nn.Module):
  """Declares exactly the `kernel` variable of a bias-free `nn.Conv`."""

  shape: Sequence[int]
  kernel_init: Any

  @nn.compact
  def __call__(self):
    return self.param('kernel', self.kernel_init, tuple(self.shape), jnp.float32)


def concat_bn_relu_conv(features: Sequence[Array], *, out_features: int, kernel_size: int,
                        train: bool, epsilon: float, momentum: float, dtype: Any,
                        kernel_init: Any, norm_name: str, conv_name: str,
                        initializing: bool) -> Array:
  """`conv(relu(batch_norm(concatenate(features))))`, recomputed in the backward pass.

  Call it from inside a compact method: the variables are declared in the calling module under
  `norm_name` (scale, bias; mean, var) and `conv_name` (kernel), as `nn.BatchNorm` and a
  bias-free `nn.Conv` would declare them.

  Args:
    features: the feature maps [batch, height, width, c_j] to concatenate on channels.
    out_features: output maps of the convolution.
    kernel_size: square kernel size; the padding is kernel_size // 2 on each side.
    train: batch statistics (and a running-average update) when True, running averages when
      False.
    epsilon, momentum: BatchNorm settings, Flax convention.
    dtype: computation dtype.
    kernel_init: initialiser of the convolution kernel.
    norm_name, conv_name: variable scopes, matching the standard layer's.
    initializing: whether the caller is inside `init` (no running-average update then).

  Returns:
    The convolution's output [batch, height, width, out_features] in `dtype`.
  """
  channels = sum(f.shape[-1] for f in features)
  norm = _BatchNormVariables(channels, name=norm_name)
  scale, bias, ra_mean, ra_var = norm()
  kernel_shape = (kernel_size, kernel_size, channels, out_features)
  kernel = _ConvKernel(kernel_shape, kernel_init, name=conv_name)()
  if train:
    # Per-channel statistics of a concatenation are the concatenation of per-piece statistics,
    # so the concatenated tensor is never built for them. Flax's BatchNorm computes the
    # variance as E[x^2] - E[x]^2 in float32 (its default fast variance); so do we.
    axes = (0, 1, 2)
    pieces32 = [jnp.asarray(f, jnp.float32) for f in features]
    mean = jnp.concatenate([jnp.mean(p, axes) for p in pieces32])
    mean_sq = jnp.concatenate([jnp.mean(lax.square(p), axes) for p in pieces32])
    var = jnp.maximum(0.0, mean_sq - lax.square(mean))
    if not initializing:
      norm((mean, var), momentum)
  else:
    mean, var = ra_mean, ra_var
  return _recomputed(tuple(features), mean, var, scale, bias, kernel,
                     epsilon, kernel_size // 2, dtype)


def _batch_norm_relu(x, scale, bias, mean, var, train: bool, epsilon: float):
  """relu(batch_norm(x)) in float32, and the statistics it used: x's own batch statistics in
  training (as Flax's BatchNorm computes them, E[x^2] - E[x]^2), else the given averages."""
  x32 = x.astype(jnp.float32)
  if train:
    mean = jnp.mean(x32, (0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(lax.square(x32), (0, 1, 2)) - lax.square(mean))
  return nn.relu((x32 - mean) * (scale * lax.rsqrt(var + epsilon)) + bias), (mean, var)


@dataclasses.dataclass(frozen=True)
class _Chunked:
  """What `_chunked_bn_relu_conv` fixes at trace time (hashable, for custom_vjp)."""

  train: bool
  epsilon: float
  pool: bool   # 2x2 average pool between the ReLU and the convolution
  dtype: Any
  chunk: int   # input channels per step


def _bn_relu_conv_chunk(static: _Chunked, x, scale, bias, mean, var, kernel):
  """BN-ReLU-[pool]-Conv1x1 of one chunk of input channels: its share of the output, and the
  chunk's BatchNorm statistics (its batch statistics in training, else the given averages)."""
  h, (mean, var) = _batch_norm_relu(x, scale, bias, mean, var, static.train, static.epsilon)
  h = h.astype(static.dtype)
  if static.pool:
    h = ops.avg_pool2(h)
  return ops.pointwise(h, kernel.astype(static.dtype)).astype(jnp.float32), (mean, var)


def _chunk_inputs(static: _Chunked, c, x, scale, bias, mean, var, kernel):
  """Chunk c of the inputs, and its first channel. Channels it shares with the chunk before
  get zero scale, bias and kernel rows: they add exactly zero, and get zero gradient, here."""
  width = x.shape[-1]
  start = ops.chunk_start(c, static.chunk, width)
  new = ops.chunk_is_new(c, static.chunk, width)
  sl = lambda v, axis: lax.dynamic_slice_in_dim(v, start, static.chunk, axis)
  return (sl(x, 3), jnp.where(new, sl(scale, 0), 0.0), jnp.where(new, sl(bias, 0), 0.0),
          sl(mean, 0), sl(var, 0), jnp.where(new[:, None], sl(kernel, 2), 0.0)), start


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_bn_relu_conv(static: _Chunked, x, scale, bias, mean, var, kernel):
  """conv1x1([pool](relu(batch_norm(x)))) summed over chunks of x's channels; returns it with
  the per-channel BatchNorm statistics used. BatchNorm and ReLU act per channel (batch
  statistics too), so each chunk's share is exact on its own."""
  n, h, w, width = x.shape
  if static.pool:
    h, w = h // 2, w // 2

  def body(c, carry):
    y, mean_out, var_out = carry
    inputs, start = _chunk_inputs(static, c, x, scale, bias, mean, var, kernel)
    y_c, (mean_c, var_c) = _bn_relu_conv_chunk(static, *inputs)
    return (y + y_c, lax.dynamic_update_slice_in_dim(mean_out, mean_c, start, 0),
            lax.dynamic_update_slice_in_dim(var_out, var_c, start, 0))

  init = (jnp.zeros((n, h, w, kernel.shape[-1]), jnp.float32),
          jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.float32))
  y, mean_out, var_out = lax.fori_loop(0, ops.num_chunks(width, static.chunk), body, init)
  return y.astype(static.dtype), (mean_out, var_out)


def _chunked_fwd(static, x, scale, bias, mean, var, kernel):
  # Residuals: the inputs only; x is the dense block's output, which its own backward pass
  # keeps anyway.
  return _chunked_bn_relu_conv(static, x, scale, bias, mean, var, kernel), (
      x, scale, bias, mean, var, kernel)


def _chunked_bwd(static, residuals, cotangents):
  """Recomputes and differentiates chunk by chunk: workspace for one chunk, not for all of x.
  The statistics output is only used for running averages and gets no gradient."""
  x, scale, bias, mean, var, kernel = residuals
  g = cotangents[0].astype(jnp.float32)

  def body(c, carry):
    dx, dscale, dbias, dkernel = carry
    (x_c, scale_c, bias_c, mean_c, var_c, kernel_c), start = _chunk_inputs(
        static, c, x, scale, bias, mean, var, kernel)
    f = lambda xx, s, b, k: _bn_relu_conv_chunk(static, xx, s, b, mean_c, var_c, k)[0]
    _, vjp = jax.vjp(f, x_c, scale_c, bias_c, kernel_c)
    dx_c, dscale_c, dbias_c, dkernel_c = vjp(g)
    return (ops.add_at(dx, dx_c, start, 3), ops.add_at(dscale, dscale_c, start, 0),
            ops.add_at(dbias, dbias_c, start, 0), ops.add_at(dkernel, dkernel_c, start, 2))

  zeros = lambda v: jnp.zeros(v.shape, jnp.float32)
  # The input gradient starts from zeros computed from g. XLA scheduled a constant zero array
  # at the start of the step, and it stayed allocated through the whole forward pass (a block
  # output's size: 258 MiB in DenseNet-BC L=250 at batch 64). As in `_recomputed_bwd`, a NaN g
  # makes the whole gradient NaN, which only happens once training has diverged.
  dx = jnp.full(x.shape, ops.zero_after(g), jnp.float32)
  dx, dscale, dbias, dkernel = lax.fori_loop(
      0, ops.num_chunks(x.shape[-1], static.chunk), body,
      (dx, zeros(scale), zeros(bias), zeros(kernel)))
  return dx.astype(x.dtype), dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(var), dkernel


_chunked_bn_relu_conv.defvjp(_chunked_fwd, _chunked_bwd)


def bn_relu_conv1x1_chunked(x: Array, *, out_features: int, pool: bool, train: bool,
                            epsilon: float, momentum: float, dtype: Any, kernel_init: Any,
                            chunk: int, norm_name: str, conv_name: str,
                            initializing: bool) -> Array:
  """`conv1x1(relu(batch_norm(x)))`, with a 2x2 average pool before the convolution if
  `pool`, computed `chunk` input channels at a time in both passes.

  A transition's input is its whole dense block's output. Autodiff of BN-ReLU-pool-conv holds
  several arrays of that size at once in the backward pass (the centred input, the ReLU's mask,
  the pool's and the normalisation's gradients), on top of the block's own saved buffer and its
  gradient; in the memory-efficient DenseNet-BC-100 (batch 64) four such arrays of the first
  block's width made the train step's peak. Here the backward pass recomputes and
  differentiates one chunk at a time and holds one input-sized array, the input gradient.

  Variables are declared as `concat_bn_relu_conv` declares them: `nn.BatchNorm`'s under
  `norm_name`, a bias-free 1x1 `nn.Conv`'s under `conv_name`.
  """
  channels = x.shape[-1]
  norm = _BatchNormVariables(channels, name=norm_name)
  scale, bias, ra_mean, ra_var = norm()
  kernel = _ConvKernel((1, 1, channels, out_features), kernel_init, name=conv_name)()
  static = _Chunked(train, float(epsilon), pool, jnp.dtype(dtype), min(chunk, channels))
  y, batch_stats = _chunked_bn_relu_conv(static, x, scale, bias, ra_mean, ra_var, kernel)
  if train and not initializing:
    norm(batch_stats, momentum)
  return y


@dataclasses.dataclass(frozen=True)
class _Stem:
  """What `_recomputed_stem` fixes at trace time (hashable, for custom_vjp)."""

  train: bool
  epsilon: float
  dtype: Any


def _stem_forward(static: _Stem, images, kernel, scale, bias, mean, var):
  """7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max pool; returns it and the BN statistics."""
  x = ops.conv(images.astype(static.dtype), kernel.astype(static.dtype), 2, 3)
  h, (mean, var) = _batch_norm_relu(x, scale, bias, mean, var, static.train, static.epsilon)
  return ops.max_pool(h.astype(static.dtype), 3, 2, 1), (mean, var)


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


def recomputed_imagenet_stem(images: Array, *, features: int, train: bool, epsilon: float,
                             momentum: float, dtype: Any, kernel_init: Any, conv_name: str,
                             norm_name: str, initializing: bool) -> Array:
  """The ImageNet stem (7x7/2 convolution, BN, ReLU, 3x3/2 max pool), recomputed from the
  images in the backward pass.

  Its activations are at half the input resolution: at 224x224 each is as large as the whole
  first dense block's output, and autodiff keeps three of them (the convolution's output, the
  pool's input, its padded copy) through the entire backward pass. Recomputing costs one stem
  forward pass per step and keeps only the images. Variables as `nn.Conv` (bias-free, under
  `conv_name`) and `nn.BatchNorm` (under `norm_name`) declare them.
  """
  kernel = _ConvKernel((7, 7, images.shape[-1], features), kernel_init, name=conv_name)()
  norm = _BatchNormVariables(features, name=norm_name)
  scale, bias, ra_mean, ra_var = norm()
  y, batch_stats = _recomputed_stem(_Stem(train, float(epsilon), jnp.dtype(dtype)),
                                    images, kernel, scale, bias, ra_mean, ra_var)
  if train and not initializing:
    norm(batch_stats, momentum)
  return y
