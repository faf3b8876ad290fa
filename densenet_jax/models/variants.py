"""The DenseNets of the paper by name, and `create_model` for them and the ResNets
(resnet_variants.py).

ImageNet models (Table 1 of the paper; densenet161 as torchvision defines it) use the ImageNet
stem, bottleneck layers and compression 0.5. CIFAR/SVHN models (Table 2) are three dense blocks
of equal size after a 3x3 stem; their depth L counts every convolution and the classifier, so:

* DenseNet (no bottleneck, no compression): L = 3n + 4 with n layers per block,
  stem of 16 maps;
* DenseNet-BC (bottleneck, compression 0.5): L = 6n + 4 (two convolutions per layer),
  stem of 2k maps.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

from densenet_jax.models import resnet_variants
from densenet_jax.models.densenet import DenseNet

# ImageNet: name -> (block_sizes, growth_rate, num_init_features).
IMAGENET_MODELS: Dict[str, Tuple[Tuple[int, ...], int, int]] = {
    'densenet121': ((6, 12, 24, 16), 32, 64),
    'densenet161': ((6, 12, 36, 24), 48, 96),
    'densenet169': ((6, 12, 32, 32), 32, 64),
    'densenet201': ((6, 12, 48, 32), 32, 64),
    'densenet264': ((6, 12, 64, 48), 32, 64),
}

# CIFAR/SVHN (Table 2): name -> (depth L, growth_rate k, bc).
CIFAR_MODELS: Dict[str, Tuple[int, int, bool]] = {
    'densenet40_k12': (40, 12, False),
    'densenet100_k12': (100, 12, False),
    'densenet100_k24': (100, 24, False),
    'densenet_bc100_k12': (100, 12, True),
    'densenet_bc250_k24': (250, 24, True),
    'densenet_bc190_k40': (190, 40, True),
}

# Families with free depth and growth rate: `create_model('densenet_bc', depth=L, growth_rate=k)`.
CIFAR_FAMILIES: Dict[str, bool] = {'densenet_cifar': False, 'densenet_bc': True}

DENSENET_NAMES = tuple(IMAGENET_MODELS) + tuple(CIFAR_MODELS) + tuple(CIFAR_FAMILIES)
MODEL_NAMES = DENSENET_NAMES + resnet_variants.RESNET_NAMES
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(DenseNet)
                     if f.name not in ('parent', 'name'))


def cifar_block_sizes(depth: int, bc: bool) -> Tuple[int, int, int]:
  """Layers per dense block of a 3-block CIFAR DenseNet of total depth `depth`.

  Raises:
    ValueError: if `depth` cannot be written as 6n + 4 (DenseNet-BC) or 3n + 4 (DenseNet).
  """
  per_layer = 2 if bc else 1
  divisor = 3 * per_layer
  kind = 'DenseNet-BC' if bc else 'DenseNet (no bottleneck)'
  if (not isinstance(depth, int) or isinstance(depth, bool) or depth < 4 + divisor
      or (depth - 4) % divisor):
    raise ValueError(
        f'depth={depth!r} does not fit {kind}: expected L = {divisor}n + 4 for n >= 1 layers '
        f'per block, i.e. (L - 4) divisible by {divisor} (e.g. {divisor * 16 + 4}).')
  n = (depth - 4) // divisor
  return (n, n, n)


def densenet_cifar(depth: int, growth_rate: int, bc: bool, **overrides: Any) -> DenseNet:
  """A CIFAR/SVHN DenseNet (bc=False) or DenseNet-BC (bc=True) of depth L and growth rate k."""
  fields = dict(
      block_sizes=cifar_block_sizes(depth, bc),
      growth_rate=growth_rate,
      bottleneck=bc,
      compression=0.5 if bc else 1.0,
      num_init_features=2 * growth_rate if bc else 16,
      stem='cifar',
      num_classes=10,
  )
  fields.update(overrides)
  return DenseNet(**fields)


def create_model(name: str, *, depth: Optional[int] = None, **overrides: Any):
  """Returns the DenseNet or ResNet called `name`, with any field overridden.

  Args:
    name: one of `MODEL_NAMES`: an ImageNet model ('densenet121', ...), a CIFAR model of
      Table 2 ('densenet_bc100_k12', ...), or a CIFAR family ('densenet_bc', 'densenet_cifar')
      whose `depth` and `growth_rate` must be given; or a ResNet ('resnet50', 'resnet110',
      'preact_resnet164', the families 'resnet_cifar' and 'preact_resnet_cifar' with `depth`).
    depth: for CIFAR models and families, the depth L; the block sizes follow from it.
    **overrides: any field of the model's class (`DenseNet` or `ResNet`), e.g.
      num_classes=100, growth_rate=24, memory_efficient=True, dtype=jnp.bfloat16.

  Returns:
    An unbound `DenseNet` or `ResNet` module.

  Raises:
    ValueError: for an unknown name or field, or field values that do not build the model.
  """
  if name in resnet_variants.RESNET_NAMES:
    return resnet_variants.create_resnet(name, depth, **overrides)
  unknown = sorted(set(overrides) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f'Unknown DenseNet field(s) {unknown} for model {name!r}; valid fields: '
                     f'{", ".join(MODEL_FIELDS)}, and depth for CIFAR models.')
  if name in IMAGENET_MODELS:
    if depth is not None:
      raise ValueError(f'depth applies to CIFAR models only; {name!r} is an ImageNet model: '
                       'set block_sizes instead.')
    block_sizes, growth_rate, num_init_features = IMAGENET_MODELS[name]
    fields = dict(block_sizes=block_sizes, growth_rate=growth_rate,
                  num_init_features=num_init_features, compression=0.5, bottleneck=True,
                  stem='imagenet', num_classes=1000)
    fields.update(overrides)
    return DenseNet(**fields)
  if name in CIFAR_MODELS:
    default_depth, growth_rate, bc = CIFAR_MODELS[name]
  elif name in CIFAR_FAMILIES:
    bc, default_depth, growth_rate = CIFAR_FAMILIES[name], None, None
    if depth is None or 'growth_rate' not in overrides:
      raise ValueError(f'Model {name!r} needs depth= and growth_rate=, e.g. '
                       f"create_model({name!r}, depth=100, growth_rate=12).")
  else:
    raise ValueError(f'Unknown model name {name!r}; valid names: {", ".join(MODEL_NAMES)}.')
  depth = default_depth if depth is None else depth
  growth_rate = overrides.pop('growth_rate', growth_rate)
  if 'block_sizes' in overrides and depth != default_depth:
    raise ValueError('Give either depth or block_sizes, not both: depth determines the '
                     'block sizes of a CIFAR DenseNet.')
  return densenet_cifar(depth, growth_rate, bc, **overrides)
