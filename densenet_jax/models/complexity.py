"""Multiply-accumulates of a DenseNet's forward pass per image, the figure papers compare.

`family.gmacs` gives it for any model (ResNets: resnet.resnet_macs, the same convention).

The convention is torchvision's (`_ops` in its weight metadata, in GMACs) and timm's: the
multiply-accumulates of every convolution and of the classifier, nothing for BatchNorm, ReLU,
pooling or concatenation, counted for the network the paper defines (a transition's 1x1
convolution at the resolution before its 2x2 pool, even where we compute it after the pool,
which gives the same result with a quarter of the work). densenet121 at 224x224: 2.83 GMACs.

It is counted from the architecture's fields and the dense layer's declaration (each unit of
dense_layer.structure counts its own), so it costs nothing and needs no compilation.
"""

from densenet_jax.models import dense_layer
from densenet_jax.models.densenet import DenseNet


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


def densenet_macs(model: DenseNet, image_size: int, channels: int = 3) -> int:
  """Multiply-accumulates of one image of `image_size` x `image_size` through `model`."""
  size = image_size
  stem = model.stem_features
  if model.stem == 'imagenet':  # 7x7/2 convolution, then a 3x3/2 max pool.
    size = _conv_out(size, 7, 2, 3)
    macs = 7 * 7 * channels * stem * size * size
    size = _conv_out(size, 3, 2, 1)
  else:  # One 3x3 convolution.
    macs = 3 * 3 * channels * stem * size * size
  k = model.growth_rate
  inputs = model.block_inputs
  units = dense_layer.structure(model.layer_spec)   # each unit counts its own
  for block, num_layers in enumerate(model.block_sizes):
    for layer in range(num_layers):
      macs += dense_layer.macs(units, inputs[block] + layer * k, size * size)
    out = inputs[block] + num_layers * k
    if block + 1 < len(model.block_sizes):
      macs += out * inputs[block + 1] * size * size
      size //= 2
    else:
      macs += out * model.num_classes
  return macs

