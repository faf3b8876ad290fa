"""The math of every BatchNorm, activation, convolution and dropout of the DenseNets, written once.

`statistics` and `normalize` (BatchNorm), `pre_activation` (BatchNorm then the activation),
`convolve` and `dropout`; `Spec`, the fields that define a dense layer; and the modules that
declare variables exactly as `nn.BatchNorm`, `nn.Conv` and `nn.Dense` do. The dense layer's
structure (which units, in which order, with which variables) is declared in dense_layer.py;
every path that computes it, and the stem, transitions and ResNets, compute with the functions
here, so a change to the math is made once and reaches all of them.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from densenet_jax.models import ops

Array = jax.Array

# The activation after every BatchNorm of the network (model field `activation`).
ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'gelu': jax.nn.gelu,
}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What defines a dense layer, as the model's fields set it (hashable: fixed at trace time).

  Attributes:
    growth_rate: k, the maps the layer adds.
    bn_size: the bottleneck convolution's output is bn_size * k maps.
    bottleneck: two units (1x1 then 3x3) rather than one 3x3 unit.
    dropout_rate: dropout after each convolution (the paper's placement).
    activation: a key of `ACTIVATIONS`.
    epsilon, momentum: BatchNorm's, Flax convention (momentum 0.9 is torchvision's 0.1).
    dtype: computation dtype; statistics and normalisation are float32.
    se_ratio: squeeze-and-excitation on the layer's new maps, with round(se_ratio * k) hidden
      units (0: none).
  """

  growth_rate: int
  bn_size: int = 4
  bottleneck: bool = True
  dropout_rate: float = 0.0
  activation: str = 'relu'
  epsilon: float = 1e-5
  momentum: float = 0.9
  dtype: Any = jnp.float32
  se_ratio: float = 0.0

  @property
  def first_features(self) -> int:
    """Output maps of the layer's first convolution."""
    return self.bn_size * self.growth_rate if self.bottleneck else self.growth_rate

  @property
  def first_size(self) -> int:
    """Kernel size of the layer's first convolution."""
    return 1 if self.bottleneck else 3


def check_fields(model, fail: Callable[[str, str], None]) -> None:
  """Checks the fields every model of the package shares (`num_classes`, BatchNorm's and the
  computation dtype), calling `fail(field, expected)` on the first bad one."""
  if (not isinstance(model.num_classes, int) or isinstance(model.num_classes, bool)
      or model.num_classes <= 0):
    fail('num_classes', 'a positive integer')
  if not isinstance(model.bn_epsilon, (int, float)) or model.bn_epsilon <= 0:
    fail('bn_epsilon', 'a positive number')
  if not isinstance(model.bn_momentum, (int, float)) or not 0 <= model.bn_momentum < 1:
    fail('bn_momentum', 'a number in [0, 1) (Flax convention: 0.9 is torchvision 0.1)')
  if jnp.dtype(model.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                    jnp.dtype(jnp.float16)):
    fail('dtype', 'float32, bfloat16 or float16')


def moments(x: Array):
  """Per-channel mean and mean of squares over batch and space, in float32."""
  x = x.astype(jnp.float32)
  return jnp.mean(x, (0, 1, 2)), jnp.mean(lax.square(x), (0, 1, 2))


def variance(mean: Array, mean_sq: Array) -> Array:
  """E[x^2] - E[x]^2, as Flax's BatchNorm computes it (its fast variance), never below 0."""
  return jnp.maximum(0.0, mean_sq - lax.square(mean))


def statistics(x: Array):
  """BatchNorm's batch statistics of x: per-channel (mean, variance), float32."""
  mean, mean_sq = moments(x)
  return mean, variance(mean, mean_sq)


def normalize(x: Array, mean, var, scale, bias, epsilon: float) -> Array:
  """BatchNorm with the given statistics, in float32 (as Flax's: (x - mean) * scale /
  sqrt(var + epsilon) + bias). Every BatchNorm of every model normalises here."""
  return (x.astype(jnp.float32) - mean) * (scale * lax.rsqrt(var + epsilon)) + bias


def pre_activation(spec: Spec, x: Array, mean, var, scale, bias) -> Array:
  """The activation of BatchNorm(x), in the computation dtype: what every convolution reads.

  Channels whose scale and bias are zero (padding in the scanned blocks) come out as
  activation(0) = 0 for every activation here, with zero gradient to x.
  """
  return ACTIVATIONS[spec.activation](normalize(x, mean, var, scale, bias, spec.epsilon)).astype(
      spec.dtype)


def norm_factors(spec: Spec, mean, var, scale, bias):
  """(a, b) with BatchNorm(x) = x * a + b per channel: the form the fused call takes."""
  a = scale * lax.rsqrt(var + spec.epsilon)
  return a, bias - mean * a


def convolve(spec: Spec, h: Array, kernel: Array) -> Array:
  """A unit's bias-free, stride-1 'same' convolution (1x1 or 3x3) in the computation dtype.

  The kernel is passed in its own (parameter) dtype: the convolution casts it, and its
  gradient keeps the parameter's dtype (see `ops`)."""
  h = h.astype(spec.dtype)
  if kernel.shape[:2] == (1, 1):
    return ops.pointwise(h, kernel)
  return ops.conv_same(h, kernel)


def dropout(spec: Spec, x: Array, key: Optional[Array]) -> Array:
  """Inverted dropout of x with `key` (none without a key or at rate 0).

  Every path draws a layer's masks from the same keys (`unit_keys`) and the same shapes, so
  for one seed every implementation drops the same values.
  """
  if key is None or spec.dropout_rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - spec.dropout_rate, x.shape)
  return jnp.where(keep, x / (1.0 - spec.dropout_rate), jnp.zeros_like(x))


def block_keys(module: nn.Module, spec: Spec, num_layers: int, train: bool) -> Optional[Array]:
  """[num_layers, 2] raw dropout keys, one per layer of a block (None without dropout).

  Drawn once per block from the module's 'dropout' stream, so unrolled and scanned blocks
  hand every layer the same key. Raw uint32 data, so that a scan can carry them."""
  if not train or spec.dropout_rate == 0:
    return None
  keys = jax.random.split(module.make_rng('dropout'), num_layers)
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.key_data(keys)
  return keys


class BatchNormVariables(nn.Module):
  """Declares exactly the variables of `nn.BatchNorm` (scale, bias; mean, var) for C features,
  so that checkpoints are those of `nn.BatchNorm`.

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


class DenseVariables(nn.Module):
  """Declares exactly the variables of `nn.Dense` (kernel [in, out], bias [out]); returns
  {'kernel', 'bias'}."""

  in_features: int
  out_features: int

  @nn.compact
  def __call__(self):
    shape = (self.in_features, self.out_features)
    return {'kernel': self.param('kernel', nn.initializers.lecun_normal(), shape, jnp.float32),
            'bias': self.param('bias', nn.initializers.zeros, shape[1:], jnp.float32)}


class ConvKernel(nn.Module):
  """Declares exactly the `kernel` variable of a bias-free `nn.Conv`."""

  shape: Sequence[int]
  kernel_init: Any

  @nn.compact
  def __call__(self):
    return {'kernel': self.param('kernel', self.kernel_init, tuple(self.shape), jnp.float32)}


def batch_norm(x: Array, *, momentum: float, train: bool, name: str, initializing: bool):
  """Declares a BatchNorm's variables under `name` (call inside a compact method) and returns
  (mean, var, scale, bias) to normalise x with: x's batch statistics in training (after moving
  the running averages towards them, unless initialising), the running averages otherwise."""
  norm = BatchNormVariables(x.shape[-1], name=name)
  scale, bias, mean, var = norm()
  if train:
    mean, var = statistics(x)
    if not initializing:
      norm((mean, var), momentum)
  return mean, var, scale, bias


def norm_activation(spec: Spec, x: Array, *, train: bool, name: str,
                    initializing: bool) -> Array:
  """`pre_activation` of x with a BatchNorm declared under `name` (call inside compact)."""
  return pre_activation(spec, x, *batch_norm(x, momentum=spec.momentum, train=train, name=name,
                                             initializing=initializing))
