"""DenseNet building blocks: dense layers, dense blocks, transitions and the network.

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks" (CVPR 2017).
Every layer of a dense block receives the feature maps of all preceding layers of the block,
*concatenated* (never added), and contributes `growth_rate` new maps. Names follow the paper:
`growth_rate` (k), `bottleneck` and `bn_size` (the "-B" variant: a 1x1 convolution to
`bn_size * k` maps before each 3x3 convolution), `compression` (theta, the "-C" variant).

All images are `[batch, height, width, channels]`.
"""

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.models import dense_layer
from densenet_jax.models import dispatch
from densenet_jax.models import efficient
from densenet_jax.models import generic_scan
from densenet_jax.models import initializers
from densenet_jax.models import layer
from densenet_jax.models import ops
from densenet_jax.models import policy
from densenet_jax.models import pooling
from densenet_jax.models import scanned

Array = jax.Array
Dtype = Any

STEMS = ('imagenet', 'cifar')

# He normal with fan_out, as the paper's Torch code; see initializers.py.
conv_kernel_init = initializers.conv_kernel_init


class Conv1x1(nn.Module):
  """A bias-free 1x1 convolution computed as a matrix product over the channels (`ops.pointwise`,
  oneDNN's on a CPU). The kernel has `nn.Conv`'s name and shape [1, 1, in, out], so checkpoints
  are those of a convolution."""

  features: int
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    return ops.pointwise(x.astype(self.dtype), kernel)   # cast there; see ops


class Conv(nn.Module):
  """A bias-free square convolution with symmetric zero padding, through `ops.conv` (oneDNN's
  on a CPU). Its kernel has `nn.Conv`'s name and shape [size, size, in, out], so checkpoints
  are those of an `nn.Conv`."""

  features: int
  size: int
  strides: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', conv_kernel_init,
                        (self.size, self.size, x.shape[-1], self.features), jnp.float32)
    return ops.conv(x.astype(self.dtype), kernel, self.strides, self.padding)   # as above


class DenseBlock(nn.Module):
  """`num_layers` dense layers; each sees the concatenation of the block input and all earlier
  layers' outputs. Returns that concatenation, with `in + num_layers * growth_rate` maps.

  The layer is dense_layer.py's; `dispatch.block_path` chooses how the block computes it: unrolled
  `DenseLayer`s, or loops over one feature buffer (the specialised scanned.py for the paper's
  layer, generic_scan.py for any other), with the same variables, math and dropout masks.
  `chunks`: the execution policy's chunk sizes (policy.py).
  """

  spec: layer.Spec
  num_layers: int
  memory_efficient: bool = False
  scan_segments: int = 0
  specialised: bool = True
  chunks: policy.Chunks = policy.Chunks(64, 64)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    keys = layer.block_keys(self, self.spec, self.num_layers, train)
    path = dispatch.block_path(self.spec, scan_segments=self.scan_segments,
                            specialised=self.specialised)
    if path == dispatch.SPECIALISED:
      return scanned.scanned_block(
          self, x, self.spec, keys, num_layers=self.num_layers, kernel_init=conv_kernel_init,
          num_segments=self.scan_segments, memory_efficient=self.memory_efficient, train=train,
          chunks=self.chunks)
    if path == dispatch.GENERIC:
      return generic_scan.scanned_block(
          self, x, self.spec, keys, num_layers=self.num_layers, kernel_init=conv_kernel_init,
          num_segments=self.scan_segments, train=train)
    features = [x]
    for i in range(self.num_layers):
      y = dense_layer.DenseLayer(self.spec, self.memory_efficient, conv_kernel_init,
                                 name=f'layer{i + 1}')(
                                     features, train, None if keys is None else keys[i])
      features.append(y)
    return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
  """Between dense blocks: BN-act-Conv1x1 to `out_features` maps, then 2x2 average pooling.

  The memory-efficient mode runs BN-act-Conv1x1 chunk by chunk of input channels and
  recomputes it in the backward pass (`efficient.chunked_transition`); same variables.
  """

  spec: layer.Spec
  out_features: int
  memory_efficient: bool = False
  chunks: policy.Chunks = policy.Chunks(64, 64)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    spec = self.spec
    dropout = train and spec.dropout_rate > 0
    # A 1x1 convolution and an average pool commute. Pooling first runs the convolution on a
    # quarter of the positions and leaves its gradient a quarter-size input to keep. Dropout
    # acts on the convolution's full-resolution output, as in the paper, so it pools last.
    pool_first = not dropout
    if self.memory_efficient:
      y = efficient.chunked_transition(
          spec, x, out_features=self.out_features, pool=pool_first, train=train,
          kernel_init=conv_kernel_init, chunks=self.chunks, norm_name='norm', conv_name='conv',
          initializing=self.is_initializing())
    else:
      x = layer.norm_activation(spec, x, train=train, name='norm',
                                initializing=self.is_initializing())
      y = Conv1x1(self.out_features, dtype=spec.dtype, name='conv')(
          pooling.avg_pool2(x) if pool_first else x)
    if pool_first:
      return y
    return pooling.avg_pool2(layer.dropout(spec, y, self.make_rng('dropout')))


class DenseNet(nn.Module):
  """A DenseNet for ImageNet-style or CIFAR-style inputs.

  Attributes:
    block_sizes: number of dense layers in each dense block, e.g. (6, 12, 24, 16).
    growth_rate: k, maps added by each dense layer.
    bn_size: bottleneck width multiplier (the paper uses 4, i.e. 4k maps).
    compression: theta in (0, 1]; a transition outputs floor(theta * C) maps.
    bottleneck: use BN-ReLU-Conv1x1 before each 3x3 convolution (DenseNet-B).
    num_init_features: maps produced by the stem; None means 2 * growth_rate.
    stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or 'cifar' (one 3x3 conv).
    dropout_rate: dropout after every convolution except the stem's, as in the paper.
    activation: what follows every BatchNorm: 'relu' (the paper's), 'silu' or 'gelu'
      (layer.ACTIVATIONS).
    se_ratio: squeeze-and-excitation on each dense layer's k new maps, with
      max(1, round(se_ratio * k)) hidden units; 0 (the paper's layer) turns it off.
    num_classes: size of the classifier.
    bn_epsilon: BatchNorm epsilon (torchvision 1e-5, Keras 1.001e-5).
    bn_momentum: BatchNorm running-average decay in Flax's convention (torchvision's
      momentum 0.1 is 0.9 here).
    dtype: computation dtype (float32 or bfloat16); parameters are always float32.
    memory_efficient: recompute each layer's concatenation, BN, ReLU and first convolution
      in the backward pass so that stored activations grow linearly with depth.
    scan_segments: run each dense block as at most this many scanned loops over one feature
      buffer (scanned.py); 0 unrolls every layer. Same variables either way.
    scan_chunk: input channels per step of a scanned layer's first convolution (scanned.py)
      and of a memory-efficient transition (efficient.chunked_transition); None picks
      it for the platform and the model's layer widths (`policy.scan_chunk`).
    specialised: let scanned blocks of the paper's layer take the path written for it
      (scanned.py); False sends them to the generic path every layer can take
      (generic_scan.py), to measure what an unusual layer costs. Same results either way.
  """

  block_sizes: Sequence[int]
  growth_rate: int
  bn_size: int = 4
  compression: float = 1.0
  bottleneck: bool = True
  num_init_features: Optional[int] = None
  stem: str = 'imagenet'
  dropout_rate: float = 0.0
  activation: str = 'relu'
  se_ratio: float = 0.0
  num_classes: int = 1000
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  memory_efficient: bool = False
  scan_segments: int = 1
  scan_chunk: Optional[int] = None
  specialised: bool = True

  def __post_init__(self):
    validate_fields(self)
    super().__post_init__()

  def chunk_for(self, platform: str, block: int = 0) -> int:
    """Input channels per step of a scanned layer's first convolution in dense block `block`
    (0-based) and the transition after it, on `platform`: `scan_chunk` where set, else the
    execution policy's choice (policy.scan_chunk)."""
    return policy.scan_chunk(self, platform, block)

  @property
  def block_inputs(self) -> Tuple[int, ...]:
    """Input channels of each dense block: the stem's maps, then each transition's."""
    inputs = [self.stem_features]
    for num_layers in self.block_sizes[:-1]:
      inputs.append(int(self.compression * (inputs[-1] + num_layers * self.growth_rate)))
    return tuple(inputs)

  @property
  def stem_features(self) -> int:
    if self.num_init_features is not None:
      return self.num_init_features
    return 2 * self.growth_rate

  @property
  def layer_spec(self) -> layer.Spec:
    """The definition of this network's dense layers (and its BN-activation everywhere)."""
    return layer.Spec(self.growth_rate, self.bn_size, self.bottleneck, float(self.dropout_rate),
                      self.activation, float(self.bn_epsilon), float(self.bn_momentum),
                      jnp.dtype(self.dtype), float(self.se_ratio))

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    """Maps images [batch, height, width, channels] to float32 logits [batch, num_classes]."""
    spec, initializing = self.layer_spec, self.is_initializing()
    x = jnp.asarray(images, self.dtype)
    if self.stem == 'imagenet' and self.memory_efficient:
      x = efficient.recomputed_imagenet_stem(
          spec, x, features=self.stem_features, train=train, kernel_init=conv_kernel_init,
          conv_name='stem_conv', norm_name='stem_norm', initializing=initializing)
    elif self.stem == 'imagenet':
      x = Conv(self.stem_features, 7, strides=2, padding=3, dtype=self.dtype,
               name='stem_conv')(x)
      x = layer.norm_activation(spec, x, train=train, name='stem_norm',
                                initializing=initializing)
      x = pooling.max_pool(x, window=3, stride=2, padding=1)
    else:
      x = Conv(self.stem_features, 3, padding=1, dtype=self.dtype, name='stem_conv')(x)
    for i, num_layers in enumerate(self.block_sizes):
      chunks = policy.chunks(self, i)   # the block's and its transition's
      x = DenseBlock(spec, num_layers, memory_efficient=self.memory_efficient,
                     scan_segments=self.scan_segments, specialised=self.specialised,
                     chunks=chunks, name=f'block{i + 1}')(
                         x, train)
      if i + 1 < len(self.block_sizes):
        x = Transition(spec, self.block_inputs[i + 1], memory_efficient=self.memory_efficient,
                       chunks=chunks, name=f'transition{i + 1}')(x, train)
    x = layer.norm_activation(spec, x, train=train, name='final_norm', initializing=initializing)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, bias_init=nn.initializers.zeros, dtype=self.dtype,
                 name='classifier')(x)
    return jnp.asarray(x, jnp.float32)


def validate_fields(model: DenseNet) -> None:
  """Raises ValueError naming the first field of `model` that cannot build a DenseNet."""

  def fail(field: str, expected: str):
    raise ValueError(
        f'DenseNet field {field}={getattr(model, field)!r}: expected {expected}.')

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  sizes = model.block_sizes
  if (not isinstance(sizes, (list, tuple)) or not sizes
      or not all(is_int(n) and n > 0 for n in sizes)):
    fail('block_sizes', 'a non-empty sequence of positive integers, e.g. (6, 12, 24, 16)')
  if not is_int(model.growth_rate) or model.growth_rate <= 0:
    fail('growth_rate', 'a positive integer')
  if not is_int(model.bn_size) or model.bn_size <= 0:
    fail('bn_size', 'a positive integer')
  if not isinstance(model.compression, (int, float)) or not 0 < model.compression <= 1:
    fail('compression', 'a number in (0, 1]')
  if model.num_init_features is not None and (
      not is_int(model.num_init_features) or model.num_init_features <= 0):
    fail('num_init_features', 'a positive integer or None (for 2 * growth_rate)')
  if model.stem not in STEMS:
    fail('stem', f'one of {STEMS}')
  if not isinstance(model.dropout_rate, (int, float)) or not 0 <= model.dropout_rate < 1:
    fail('dropout_rate', 'a number in [0, 1)')
  if model.activation not in layer.ACTIVATIONS:
    fail('activation', f'one of {tuple(layer.ACTIVATIONS)}')
  if (not isinstance(model.se_ratio, (int, float)) or isinstance(model.se_ratio, bool)
      or not 0 <= model.se_ratio <= 1):
    fail('se_ratio', 'a number in [0, 1] (0: no squeeze-and-excitation)')
  if not isinstance(model.specialised, bool):
    fail('specialised', 'True or False')
  if not is_int(model.scan_segments) or model.scan_segments < 0:
    fail('scan_segments', 'a non-negative integer (0: unrolled layers)')
  if model.scan_chunk is not None and (not is_int(model.scan_chunk) or model.scan_chunk <= 0):
    fail('scan_chunk', 'a positive integer or None (chosen from the layer widths)')
  layer.check_fields(model, fail)
  for i, channels in enumerate(model.block_inputs[1:]):
    if channels == 0:
      fail('compression', f'a value that leaves transition {i + 1} at least one feature map')


def min_image_size(model: DenseNet) -> int:
  """Smallest input height/width that survives every down-sampling of `model` (1x1 at the end)."""
  factor = 2 ** (len(model.block_sizes) - 1)
  if model.stem == 'imagenet':
    factor *= 4
  return factor
