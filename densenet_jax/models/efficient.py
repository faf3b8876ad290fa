"""Memory-efficient concatenation + BN + ReLU + convolution (Pleiss et al., 2017).

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

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import ops

Array = jax.Array


def _normalize_relu_conv(pieces, mean, var, scale, bias, kernel, *, epsilon, padding, dtype):
  """relu((concat(pieces) - mean) * scale / sqrt(var + eps) + bias) convolved with `kernel`."""
  x = jnp.concatenate([jnp.asarray(p, jnp.float32) for p in pieces], axis=-1)
  mul = scale * lax.rsqrt(var + epsilon)
  y = nn.relu((x - mean) * mul + bias).astype(dtype)
  if kernel.shape[:2] == (1, 1):
    return ops.pointwise(y, kernel.astype(dtype))
  return lax.conv_general_dilated(
      y, kernel.astype(dtype), (1, 1), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


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
  zero = 0.0 * g.ravel()[0]
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
  pad = kernel_size // 2
  return _recomputed(tuple(features), mean, var, scale, bias, kernel,
                     epsilon, ((pad, pad), (pad, pad)), dtype)
