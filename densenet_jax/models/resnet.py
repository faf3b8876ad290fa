"""ResNets: residual blocks, stages and the network, beside the DenseNets they are compared with.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016), and "Identity
Mappings in Deep Residual Networks" (ECCV 2016) for the pre-activation blocks. A block *adds* its
input (the shortcut) to what its convolutions compute, where a DenseNet layer concatenates.
Names follow the papers: `bottleneck` (1x1 to `width`, 3x3, 1x1 to 4 * `width` maps),
`preactivation` (BN-ReLU before each convolution, nothing after the addition), `shortcut`
'projection' (option B: a 1x1 convolution where the shape changes, identity elsewhere) or
'zero_pad' (option A: subsample and append zero maps, parameter-free).

The ImageNet models are torchvision's, variable for variable (convert.py imports its weights):
stride on the 3x3 convolution of a bottleneck ("ResNet v1.5"), BatchNorm after every
convolution of the residual and of a projection. The pre-activation CIFAR models put the stride
on the 3x3 as well (the paper's Torch code strides the first 1x1; the parameters are the same),
and where the shape changes the shortcut's projection reads the block's pre-activated input, as
in that code. A pre-activation network's stem has no BN-ReLU (the first block begins with one)
and its head adds a final BN-ReLU.

All images are `[batch, height, width, channels]`.
"""

import dataclasses
from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.models import initializers
from densenet_jax.models import layer
from densenet_jax.models import pooling
from densenet_jax.models.densenet import Conv
from densenet_jax.models.densenet import Conv1x1

Array = jax.Array
Dtype = Any

STEMS = ('imagenet', 'cifar')
SHORTCUTS = ('projection', 'zero_pad')
EXPANSION = 4   # a bottleneck block outputs 4 * width maps


def _batch_norm(x: Array, train: bool, name: str, epsilon: float, momentum: float,
                dtype: Dtype, initializing: bool) -> Array:
  """Every BatchNorm of a ResNet, the DenseNets' own (models/layer.py): `nn.BatchNorm`'s
  variables and math. Call inside a compact method."""
  mean, var, scale, bias = layer.batch_norm(x, momentum=momentum, train=train, name=name,
                                            initializing=initializing)
  return layer.normalize(x, mean, var, scale, bias, epsilon).astype(dtype)


def _conv(x: Array, features: int, size: int, strides: int, dtype: Dtype, name: str) -> Array:
  """A bias-free convolution padded by size // 2 (PyTorch's), through the DenseNet's modules.

  A strided 1x1 convolution reads every `strides`-th pixel and nothing else, so it is computed
  as a 1x1 convolution (a matrix product) of those pixels.
  """
  if size == 1:
    return Conv1x1(features, dtype=dtype, name=name)(x[:, ::strides, ::strides])
  return Conv(features, size, strides, size // 2, dtype=dtype, name=name)(x)


@dataclasses.dataclass(frozen=True)
class Design:
  """What every block of a ResNet shares (the `ResNet` fields of the same names say what each
  means): one value handed down to the stages and blocks, so that a field is added once."""

  bottleneck: bool = False
  preactivation: bool = False
  shortcut: str = 'projection'
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32


class ResidualBlock(nn.Module):
  """One residual block: basic (two 3x3 convolutions) or bottleneck (1x1, 3x3, 1x1), with
  post-activation (conv-BN-ReLU, ReLU after the addition) or pre-activation (BN-ReLU-conv).

  Attributes:
    width: maps of the 3x3 convolutions; the block outputs `width` (basic) or
      4 * `width` (bottleneck) maps.
    strides: stride of the block's 3x3 convolution and of its shortcut.
    design: the network's kind of block, BatchNorm settings and dtype.
  """

  width: int
  strides: int
  design: Design

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    d = self.design

    def norm(y, name):
      return _batch_norm(y, train, name, d.bn_epsilon, d.bn_momentum, d.dtype,
                         self.is_initializing())

    out_features = self.width * EXPANSION if d.bottleneck else self.width
    if d.bottleneck:  # (maps, kernel size, stride) of each convolution
      convs = ((self.width, 1, 1), (self.width, 3, self.strides), (out_features, 1, 1))
    else:
      convs = ((self.width, 3, self.strides), (self.width, 3, 1))
    reshaped = self.strides != 1 or x.shape[-1] != out_features
    shortcut = x
    y = x
    for i, (features, size, strides) in enumerate(convs, 1):
      if d.preactivation:
        y = nn.relu(norm(y, f'norm{i}'))
        if i == 1 and reshaped and d.shortcut == 'projection':
          shortcut = y   # the projection reads the pre-activated input, as the paper's code
      y = _conv(y, features, size, strides, d.dtype, f'conv{i}')
      if not d.preactivation:
        y = norm(y, f'norm{i}')
        y = nn.relu(y) if i < len(convs) else y
    if reshaped and d.shortcut == 'projection':
      shortcut = _conv(shortcut, out_features, 1, self.strides, d.dtype, 'shortcut_conv')
      if not d.preactivation:
        shortcut = norm(shortcut, 'shortcut_norm')
    elif reshaped:  # option A: every strides-th pixel, and zero maps appended
      shortcut = shortcut[:, ::self.strides, ::self.strides]
      shortcut = jnp.pad(shortcut, ((0, 0),) * 3 + ((0, out_features - shortcut.shape[-1]),))
    y = y + shortcut.astype(y.dtype)
    return y if d.preactivation else nn.relu(y)


class Stage(nn.Module):
  """`num_blocks` residual blocks at one resolution; the first may stride and change the maps.

  The blocks after the first are identical in shape, so with `scan_blocks` they run as one
  `nn.scan` whose variables are stacked on a leading axis under `blocks` (block 2 first): the
  train step then holds one block's program and one set of variables per stage whatever the
  depth, and compiles as fast for 111 blocks as for 18. Unrolled, the blocks are `block2` ...
  `blockN`; `stack_blocks` and `unstack_blocks` move checkpoints between the two layouts.
  The block's math is the same module either way.
  """

  num_blocks: int
  width: int
  strides: int
  design: Design
  scan_blocks: bool = True

  def _block(self, strides: int, name: str) -> ResidualBlock:
    return ResidualBlock(self.width, strides, self.design, name=name)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = self._block(self.strides, 'block1')(x, train)
    if scans(self.num_blocks, self.scan_blocks):
      scan = nn.scan(lambda block, carry, _: (block(carry, train), None),
                     variable_axes={'params': 0, 'batch_stats': 0},
                     split_rngs={'params': True}, length=self.num_blocks - 1)
      # The kernels are drawn inside the scan's body, where deferred() cannot replace them.
      with initializers.immediate():
        x, _ = scan(self._block(1, 'blocks'), x, None)
      return x
    for i in range(2, self.num_blocks + 1):
      x = self._block(1, f'block{i}')(x, train)
    return x


def scans(num_blocks: int, scan_blocks: bool) -> bool:
  """Whether a stage of `num_blocks` scans its blocks after the first (two or more of them)."""
  return scan_blocks and num_blocks > 2


def stack_blocks(collection: Dict[str, Any]) -> Dict[str, Any]:
  """One collection ('params' or 'batch_stats') of an unrolled ResNet in the scanned layout:
  each stage's block2 ... blockN stacked on a new leading axis as `blocks`."""
  out = dict(collection)
  for stage, blocks in collection.items():
    if stage.startswith('stage') and 'block3' in blocks:
      rest = [blocks[f'block{i}'] for i in range(2, len(blocks) + 1)]
      out[stage] = {'block1': blocks['block1'],
                    'blocks': jax.tree.map(lambda *v: jnp.stack(v), *rest)}
  return out


def unstack_blocks(collection: Dict[str, Any]) -> Dict[str, Any]:
  """The inverse of `stack_blocks`: each stage's `blocks` as block2 ... blockN."""
  out = dict(collection)
  for stage, blocks in collection.items():
    if stage.startswith('stage') and 'blocks' in blocks:
      count = jax.tree.leaves(blocks['blocks'])[0].shape[0]
      out[stage] = {'block1': blocks['block1'], **{
          f'block{i + 2}': jax.tree.map(lambda v, i=i: v[i], blocks['blocks'])
          for i in range(count)}}
  return out


def to_layout(model: 'ResNet', variables: Dict[str, Any]) -> Dict[str, Any]:
  """`variables` ({'params', 'batch_stats'}, either layout) in `model`'s layout."""
  convert = stack_blocks if model.scan_blocks else unstack_blocks
  return {name: convert(unstack_blocks(collection)) for name, collection in variables.items()}


class ResNet(nn.Module):
  """A ResNet for ImageNet-style or CIFAR-style inputs.

  Attributes:
    stage_sizes: residual blocks in each stage, e.g. (3, 4, 6, 3); every stage after the
      first halves the resolution in its first block.
    widths: maps of each stage's 3x3 convolutions, e.g. (64, 128, 256, 512); the stem has
      widths[0] maps.
    bottleneck: 1x1-3x3-1x1 blocks with 4 * width output maps, else two 3x3 convolutions.
    preactivation: BN-ReLU before every convolution ("Identity Mappings"), a stem without
      BN-ReLU and a final BN-ReLU before the pooling.
    shortcut: 'projection' (a 1x1 convolution where a block changes the shape) or 'zero_pad'
      (the paper's option A for CIFAR: subsample, append zero maps; no parameters).
    stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or 'cifar' (one 3x3 conv, then
      BN-ReLU unless preactivation).
    num_classes: size of the classifier.
    bn_epsilon: BatchNorm epsilon (torchvision 1e-5).
    bn_momentum: BatchNorm running-average decay in Flax's convention (torchvision's 0.1 is
      0.9 here).
    dtype: computation dtype (float32 or bfloat16); parameters are always float32.
    scan_blocks: run each stage's blocks after the first as one scanned loop over their
      stacked variables (compile time independent of depth); False unrolls them, under
      their own names (`to_layout` converts checkpoints).
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)
  bottleneck: bool = False
  preactivation: bool = False
  shortcut: str = 'projection'
  stem: str = 'imagenet'
  num_classes: int = 1000
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  scan_blocks: bool = True

  def __post_init__(self):
    validate_fields(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    """Maps images [batch, height, width, channels] to float32 logits [batch, num_classes]."""
    design = Design(self.bottleneck, self.preactivation, self.shortcut, self.bn_epsilon,
                    self.bn_momentum, self.dtype)

    def norm_relu(y, name):
      return nn.relu(_batch_norm(y, train, name, self.bn_epsilon, self.bn_momentum, self.dtype,
                                 self.is_initializing()))

    x = jnp.asarray(images, self.dtype)
    if self.stem == 'imagenet':
      x = _conv(x, self.widths[0], 7, 2, self.dtype, 'stem_conv')
    else:
      x = _conv(x, self.widths[0], 3, 1, self.dtype, 'stem_conv')
    if not self.preactivation:
      x = norm_relu(x, 'stem_norm')
    if self.stem == 'imagenet':
      x = pooling.max_pool(x, window=3, stride=2, padding=1)
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      x = Stage(num_blocks, width, 1 if i == 0 else 2, design, self.scan_blocks,
                name=f'stage{i + 1}')(x, train)
    if self.preactivation:
      x = norm_relu(x, 'final_norm')
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return jnp.asarray(x, jnp.float32)


def validate_fields(model: ResNet) -> None:
  """Raises ValueError naming the first field of `model` that cannot build a ResNet."""

  def fail(field: str, expected: str):
    raise ValueError(f'ResNet field {field}={getattr(model, field)!r}: expected {expected}.')

  def positive_ints(v):
    return (isinstance(v, (list, tuple)) and v and
            all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v))

  if not positive_ints(model.stage_sizes):
    fail('stage_sizes', 'a non-empty sequence of positive integers, e.g. (3, 4, 6, 3)')
  if not positive_ints(model.widths) or len(model.widths) != len(model.stage_sizes):
    fail('widths', f'{len(model.stage_sizes)} positive integers, one per stage (stage_sizes)')
  for field in ('bottleneck', 'preactivation', 'scan_blocks'):
    if not isinstance(getattr(model, field), bool):
      fail(field, 'True or False')
  if model.shortcut not in SHORTCUTS:
    fail('shortcut', f'one of {SHORTCUTS}')
  if model.shortcut == 'zero_pad' and list(model.widths) != sorted(model.widths):
    fail('widths', "non-decreasing widths with shortcut='zero_pad' (zero maps are appended, "
         'never removed)')
  if model.stem not in STEMS:
    fail('stem', f'one of {STEMS}')
  layer.check_fields(model, fail)


def min_image_size(model: ResNet) -> int:
  """Smallest input height/width that every down-sampling of `model` halves to a whole map
  (1x1 after the last stage). Smaller inputs run, their last stages on 1x1 maps."""
  return 2 ** (len(model.stage_sizes) - 1) * (4 if model.stem == 'imagenet' else 1)


def resnet_macs(model: ResNet, image_size: int, channels: int = 3) -> int:
  """Multiply-accumulates of one image through `model`: every convolution (projections
  included) and the classifier, in the convention of complexity.py."""

  def out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1

  size, stem = image_size, model.widths[0]
  if model.stem == 'imagenet':
    size = out(size, 7, 2, 3)
    macs = 7 * 7 * channels * stem * size * size
    size = out(size, 3, 2, 1)
  else:
    macs = 3 * 3 * channels * stem * size * size
  inputs = stem
  for stage, (num_blocks, width) in enumerate(zip(model.stage_sizes, model.widths)):
    outputs = width * EXPANSION if model.bottleneck else width
    for block in range(num_blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      strided = out(size, 3, stride, 1)
      if model.bottleneck:
        macs += inputs * width * size * size + (9 * width + outputs) * width * strided ** 2
      else:
        macs += 9 * (inputs + width) * width * strided ** 2
      if model.shortcut == 'projection' and (stride != 1 or inputs != outputs):
        macs += inputs * outputs * strided ** 2
      size, inputs = strided, outputs
  return macs + inputs * model.num_classes
