"""The dense layer, declared once: its units, their variables and names, their order.

To change the layer (another unit, another normalisation, a wider bottleneck) edit `structure`
here, adding a unit class if none fits; docs/extending.md walks through adding
squeeze-and-excitation. Every way of computing a dense block is derived from this declaration:

* unrolled blocks run `DenseLayer`, which declares the units' variables and applies them;
* the memory-efficient unrolled mode recomputes the first unit from the block's feature maps in
  the backward pass (efficient.recomputed_unit), whatever the unit;
* scanned blocks run the layers as a loop over one feature buffer: the generic path
  (generic_scan.py) applies `apply` to the buffer and differentiates it with `jax.vjp`, for any
  structure whose first unit reads its input channel by channel; the specialised path
  (scanned.py, with oneDNN's fused call on a CPU) is an optimisation written for the paper's
  layer only, and it declares so (`scanned.supports`): any other structure takes the generic
  path. `dispatch.block_path` is the one place that chooses.

The variables keep the names and shapes `nn.BatchNorm`, `nn.Conv` and `nn.Dense` give them,
under `layer{i}/<variable module>`, so every checkpoint and converted weight loads into every path.
"""

import dataclasses
import functools
from typing import Any, ClassVar, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.models import efficient
from densenet_jax.models import layer

Array = jax.Array
# A layer's variables by module and name, params and batch statistics together:
# {'norm1': {'scale', 'bias', 'mean', 'var'}, 'conv1': {'kernel'}, ...}.
Values = Dict[str, Dict[str, Array]]


# ---- What a unit's variables are (each declares exactly one Flax module's variables). ----

@dataclasses.dataclass(frozen=True)
class BatchNorm:
  """`nn.BatchNorm`'s variables for `features` channels: params scale, bias; batch_stats mean,
  var."""
  features: int

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {name: (self.features,) for name in ('scale', 'bias', 'mean', 'var')}

  def declare(self, name: str, kernel_init: Any) -> nn.Module:
    del kernel_init
    return layer.BatchNormVariables(self.features, name=name)


@dataclasses.dataclass(frozen=True)
class Conv:
  """A bias-free `nn.Conv`'s variable: params kernel [size, size, in, out]."""
  shape: Tuple[int, int, int, int]

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {'kernel': tuple(self.shape)}

  def declare(self, name: str, kernel_init: Any) -> nn.Module:
    return layer.ConvKernel(self.shape, kernel_init, name=name)


@dataclasses.dataclass(frozen=True)
class Linear:
  """`nn.Dense`'s variables: params kernel [in, out] (LeCun normal) and bias [out] (zeros)."""
  in_features: int
  out_features: int

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {'kernel': (self.in_features, self.out_features), 'bias': (self.out_features,)}

  def declare(self, name: str, kernel_init: Any) -> nn.Module:
    del kernel_init
    return layer.DenseVariables(self.in_features, self.out_features, name=name)


# ---- Units: what a dense layer is made of. ----

@dataclasses.dataclass(frozen=True)
class NormActConv:
  """BatchNorm, activation, convolution (bias-free, stride 1, 'same'), dropout: the paper's
  unit, math in layer.py. Its variables: `norm` (nn.BatchNorm's) and `conv` (nn.Conv's)."""

  norm: str
  conv: str
  size: int
  features: int
  # It reads its input channel by channel up to the convolution: zero BatchNorm parameters
  # and kernel rows make extra channels contribute exactly nothing (generic_scan.py pads so).
  per_channel_input: ClassVar[bool] = True
  uses_dropout: ClassVar[bool] = True

  def variables(self, in_features: int):
    return {self.norm: BatchNorm(in_features),
            self.conv: Conv((self.size, self.size, in_features, self.features))}

  def out_features(self, in_features: int) -> int:
    del in_features
    return self.features

  def apply(self, spec: layer.Spec, v: Values, x: Array, *, train: bool, key):
    """(output, {norm: batch statistics} in training, else {})."""
    norm = v[self.norm]
    if train:
      mean, var = layer.statistics(x)
      stats = {self.norm: {'mean': mean, 'var': var}}
    else:
      mean, var, stats = norm['mean'], norm['var'], {}
    h = layer.pre_activation(spec, x, mean, var, norm['scale'], norm['bias'])
    return layer.dropout(spec, layer.convolve(spec, h, v[self.conv]['kernel']), key), stats

  def macs(self, in_features: int, positions: int) -> int:
    return self.size * self.size * in_features * self.features * positions


@dataclasses.dataclass(frozen=True)
class SqueezeExcitation:
  """Squeeze-and-excitation (Hu, Shen, Sun, CVPR 2018): each channel scaled by a gate computed
  from every channel's spatial mean, sigmoid(W2 relu(W1 mean + b1) + b2), W1 to `hidden` units.
  Its variables: `name`_reduce and `name`_expand, as `nn.Dense` declares them."""

  name: str
  hidden: int
  # The gate of every channel depends on all channels: it cannot read a padded buffer.
  per_channel_input: ClassVar[bool] = False
  uses_dropout: ClassVar[bool] = False

  def variables(self, in_features: int):
    return {f'{self.name}_reduce': Linear(in_features, self.hidden),
            f'{self.name}_expand': Linear(self.hidden, in_features)}

  def out_features(self, in_features: int) -> int:
    return in_features

  def apply(self, spec: layer.Spec, v: Values, x: Array, *, train: bool, key):
    del train, key
    reduce, expand = v[f'{self.name}_reduce'], v[f'{self.name}_expand']
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    s = jax.nn.relu(s @ reduce['kernel'] + reduce['bias'])
    gate = jax.nn.sigmoid(s @ expand['kernel'] + expand['bias'])
    return (x.astype(jnp.float32) * gate[:, None, None, :]).astype(spec.dtype), {}

  def macs(self, in_features: int, positions: int) -> int:
    del positions   # two matrix products per image, on the pooled vector
    return 2 * in_features * self.hidden


# ---- The dense layer. ----

def structure(spec: layer.Spec) -> Tuple[Any, ...]:
  """The units of a dense layer defined by `spec`, in order: edit here to change the layer.

  Bottleneck (DenseNet-B): BN-act-Conv1x1 to bn_size * k maps, then BN-act-Conv3x3 to k maps;
  without: BN-act-Conv3x3 to k maps. With `se_ratio`, squeeze-and-excitation on the k new maps.
  """
  k = spec.growth_rate
  if spec.bottleneck:
    units = (NormActConv('norm1', 'conv1', 1, spec.bn_size * k),
             NormActConv('norm2', 'conv2', 3, k))
  else:
    units = (NormActConv('norm1', 'conv1', 3, k),)
  if spec.se_ratio:
    units += (SqueezeExcitation('se', max(1, round(spec.se_ratio * k))),)
  return units


def unit_keys(units, key: Optional[Array]):
  """One dropout key per unit (all None without a key): the layer's key split in as many parts
  as it has units, at least two, so every path draws the same masks."""
  if key is None:
    return (None,) * len(units)
  return tuple(jax.random.split(key, max(2, len(units)))[:len(units)])


def declarations(units, in_features: int) -> Dict[str, Any]:
  """Every variable module of a layer of `units` reading `in_features` maps, by name."""
  declared, width = {}, in_features
  for unit in units:
    declared.update(unit.variables(width))
    width = unit.out_features(width)
  return declared


def shapes(units, in_features: int) -> Dict[str, Dict[str, Tuple[int, ...]]]:
  """The shapes of a layer's variables (the `Values` tree, as shapes)."""
  return {name: d.shapes() for name, d in declarations(units, in_features).items()}


def macs(units, in_features: int, positions: int) -> int:
  """Multiply-accumulates of one image through one layer (`positions`: height * width)."""
  total, width = 0, in_features
  for unit in units:
    total += unit.macs(width, positions)
    width = unit.out_features(width)
  return total


def apply(spec: layer.Spec, units, v: Values, x, *, train: bool, key=None, first=None):
  """The layer on its input x: (its new maps, the BatchNorms' batch statistics in training).

  Pure: running averages are read from `v` (in evaluation) and moved by the caller (`update`).
  `first(unit, v, x, key)`, where given, computes the first unit instead of `unit.apply`: the
  memory-efficient mode's recomputation, for which x is the block's list of feature maps.
  """
  stats = {}
  for i, (unit, unit_key) in enumerate(zip(units, unit_keys(units, key))):
    if i == 0 and first is not None:
      x, unit_stats = first(unit, v, x, unit_key)
    else:
      x, unit_stats = unit.apply(spec, v, x, train=train, key=unit_key)
    stats.update(unit_stats)
  return x, stats


def declare(units, in_features: int, kernel_init: Any) -> Dict[str, nn.Module]:
  """Declares a layer's variables (`declarations`) in the module whose compact method calls
  this, one child module each, under the names `nn.BatchNorm`, `nn.Conv` and `nn.Dense` would
  have; returns them for `read` and `update`."""
  return {name: declared.declare(name, kernel_init)
          for name, declared in declarations(units, in_features).items()}


def read(modules: Dict[str, nn.Module]) -> Values:
  """The values of the variables `declare` made."""
  values = {}
  for name, module in modules.items():
    if isinstance(module, layer.BatchNormVariables):
      scale, bias, mean, var = module()
      values[name] = {'scale': scale, 'bias': bias, 'mean': mean, 'var': var}
    else:
      values[name] = module()
  return values


def update(modules: Dict[str, nn.Module], batch_stats, momentum: float) -> None:
  """Moves the running averages of the BatchNorms towards their batch statistics
  ({name: {'mean', 'var'}}, as `apply` returns them)."""
  for name, stats in batch_stats.items():
    modules[name]((stats['mean'], stats['var']), momentum)


class LayerVariables(nn.Module):
  """A dense layer's variables, declared as `DenseLayer` declares them (for the scanned blocks,
  which apply the layer themselves). Called without `batch_stats` it returns their values;
  with them it moves the running averages (`update`)."""

  units: Tuple[Any, ...]
  in_features: int
  kernel_init: Any

  @nn.compact
  def __call__(self, batch_stats=None, momentum: float = 0.9) -> Values:
    modules = declare(self.units, self.in_features, self.kernel_init)
    if batch_stats is not None:
      update(modules, batch_stats, momentum)
    return read(modules)


class DenseLayer(nn.Module):
  """One unrolled dense layer: the units of `structure(spec)` on the concatenation of its
  block's earlier feature maps, which it takes as a list. `memory_efficient` recomputes the
  first unit from that list in the backward pass instead of storing the concatenation and what
  is made of it (Pleiss et al., "Memory-Efficient Implementation of DenseNets"; efficient.py)."""

  spec: layer.Spec
  memory_efficient: bool = False
  kernel_init: Any = None

  @nn.compact
  def __call__(self, features, train: bool, key=None) -> Array:
    """`key`: the layer's raw dropout key (`layer.block_keys`), None without dropout."""
    units = structure(self.spec)
    modules = declare(units, sum(f.shape[-1] for f in features), self.kernel_init)
    if self.memory_efficient:
      x, first = tuple(features), functools.partial(efficient.recomputed_unit, self.spec,
                                                     train=train)
    else:
      x, first = jnp.concatenate(features, axis=-1), None
    y, stats = apply(self.spec, units, read(modules), x, train=train, key=key, first=first)
    if train and not self.is_initializing():
      update(modules, jax.lax.stop_gradient(stats), self.spec.momentum)
    return y
