"""The ResNets of the papers by name, for `create_model`.

ImageNet models are torchvision's resnet18 ... resnet152. CIFAR models have three stages of n
blocks at 16, 32 and 64 maps after a 3x3 stem; their depth counts every convolution of the
residual branches, the stem's and the classifier:

* `resnet_cifar` (He et al. 2016, section 4.2): basic blocks, parameter-free shortcuts
  (option A), depth = 6n + 2 (resnet110: n = 18);
* `preact_resnet_cifar` ("Identity Mappings"): pre-activation bottleneck blocks (x4 output
  maps), projection shortcuts where the shape changes, depth = 9n + 2 (164: n = 18;
  1001: n = 111).
"""

from typing import Any, Dict, Optional, Tuple

from densenet_jax.models.resnet import ResNet

# ImageNet: name -> (stage_sizes, bottleneck).
IMAGENET_MODELS: Dict[str, Tuple[Tuple[int, ...], bool]] = {
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet101': ((3, 4, 23, 3), True),
    'resnet152': ((3, 8, 36, 3), True),
}

# CIFAR families of free depth: name -> (bottleneck, preactivation, shortcut).
CIFAR_FAMILIES: Dict[str, Tuple[bool, bool, str]] = {
    'resnet_cifar': (False, False, 'zero_pad'),
    'preact_resnet_cifar': (True, True, 'projection'),
}

# The papers' CIFAR models: name -> (family, depth).
CIFAR_MODELS: Dict[str, Tuple[str, int]] = {
    'resnet110': ('resnet_cifar', 110),
    'preact_resnet164': ('preact_resnet_cifar', 164),
    'preact_resnet1001': ('preact_resnet_cifar', 1001),
}

RESNET_NAMES = tuple(IMAGENET_MODELS) + tuple(CIFAR_MODELS) + tuple(CIFAR_FAMILIES)
RESNET_FIELDS = tuple(f for f in ResNet.__dataclass_fields__ if f not in ('parent', 'name'))


def cifar_stage_sizes(depth: int, bottleneck: bool) -> Tuple[int, int, int]:
  """Blocks per stage of a 3-stage CIFAR ResNet of total depth `depth`.

  Raises:
    ValueError: if `depth` cannot be written as 6n + 2 (basic) or 9n + 2 (bottleneck).
  """
  per_block = 3 if bottleneck else 2
  divisor = 3 * per_block
  if (not isinstance(depth, int) or isinstance(depth, bool) or depth < divisor + 2
      or (depth - 2) % divisor):
    kind = 'bottleneck' if bottleneck else 'basic-block'
    raise ValueError(f'depth={depth!r} does not fit a {kind} CIFAR ResNet: expected '
                     f'{divisor}n + 2 for n >= 1 blocks per stage (e.g. {divisor * 18 + 2}).')
  n = (depth - 2) // divisor
  return (n, n, n)


def create_resnet(name: str, depth: Optional[int] = None, **overrides: Any) -> ResNet:
  """The ResNet called `name` (one of `RESNET_NAMES`), with any ResNet field overridden.

  Raises:
    ValueError: for an unknown field, a depth that does not fit, or fields that do not build
      a ResNet.
  """
  unknown = sorted(set(overrides) - set(RESNET_FIELDS))
  if unknown:
    raise ValueError(f'Unknown ResNet field(s) {unknown} for model {name!r}; valid fields: '
                     f'{", ".join(RESNET_FIELDS)}, and depth for CIFAR models.')
  if name in IMAGENET_MODELS:
    if depth is not None:
      raise ValueError(f'depth applies to CIFAR models only; {name!r} is an ImageNet model: '
                       'set stage_sizes instead.')
    stage_sizes, bottleneck = IMAGENET_MODELS[name]
    fields = dict(stage_sizes=stage_sizes, bottleneck=bottleneck, widths=(64, 128, 256, 512),
                  shortcut='projection', stem='imagenet', num_classes=1000)
    return ResNet(**{**fields, **overrides})
  family, default_depth = CIFAR_MODELS.get(name, (name, None))
  depth = default_depth if depth is None else depth
  if depth is None:
    raise ValueError(f'Model {name!r} needs depth=, e.g. create_model({name!r}, depth=56).')
  if 'stage_sizes' in overrides:
    raise ValueError('Give depth, not stage_sizes: depth determines the stage sizes of a '
                     'CIFAR ResNet.')
  bottleneck, preactivation, shortcut = CIFAR_FAMILIES[family]
  bottleneck = overrides.pop('bottleneck', bottleneck)
  fields = dict(stage_sizes=cifar_stage_sizes(depth, bottleneck), bottleneck=bottleneck,
                preactivation=preactivation, shortcut=shortcut, widths=(16, 32, 64),
                stem='cifar', num_classes=10)
  return ResNet(**{**fields, **overrides})
