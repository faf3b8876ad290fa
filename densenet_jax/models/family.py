"""What the trainer, its checks, records and summaries ask of a model, for each family.

A run needs a few facts about its network beyond `apply`: its multiply-accumulates per image
(the `gmacs` of results.json and the report), the smallest input it can take (validation),
which fields only change *how* it is computed (dtype, scanning, recomputation), which a
checkpoint need not agree on, and how to bring variables saved in another layout of the same
network (a ResNet's unrolled or scanned blocks) into the model's. Each family answers them in
`FAMILIES`; `family_of` is the one place that tells the families apart.
"""

import dataclasses
from typing import Any, Callable, Dict, Tuple

from densenet_jax.models import complexity
from densenet_jax.models import densenet
from densenet_jax.models import dispatch
from densenet_jax.models import resnet


@dataclasses.dataclass(frozen=True)
class Family:
  """How to answer a run's questions about one class of network."""
  module: type
  # (model, image_size, channels) -> multiply-accumulates of one image's forward pass.
  macs: Callable[[Any, int, int], int]
  # model -> smallest input height and width.
  min_image_size: Callable[[Any], int]
  # Fields that change how the network is computed, not the network nor its variables.
  computation_fields: Tuple[str, ...]
  # (model, {'params', 'batch_stats'}) -> the same variables in the model's layout.
  layout: Callable[[Any, Dict[str, Any]], Dict[str, Any]] = lambda model, variables: variables
  # (model, platform) -> one line per block: which implementation computes it there.
  blocks: Callable[[Any, str], Tuple[str, ...]] = lambda model, platform: ()


FAMILIES = (
    Family(densenet.DenseNet, complexity.densenet_macs, densenet.min_image_size,
           ('dtype', 'memory_efficient', 'scan_segments', 'scan_chunk', 'specialised'),
           blocks=dispatch.describe),
    # scan_blocks is not among them: it stacks the blocks' variables (resnet.to_layout).
    Family(resnet.ResNet, resnet.resnet_macs, resnet.min_image_size, ('dtype',),
           resnet.to_layout),
)


def family_of(model) -> Family:
  for family in FAMILIES:
    if isinstance(model, family.module):
      return family
  raise TypeError(f'{type(model).__name__} is not a model of densenet_jax.models '
                  f'({", ".join(f.module.__name__ for f in FAMILIES)}).')


def gmacs(model, image_size: int, channels: int = 3) -> float:
  """Multiply-accumulates per image in units of 10^9, as torchvision and timm publish them."""
  return family_of(model).macs(model, image_size, channels) / 1e9


def min_image_size(model) -> int:
  """Smallest input height/width that survives every down-sampling of `model`."""
  return family_of(model).min_image_size(model)


def architecture(model) -> Dict[str, Any]:
  """The fields that define `model`'s network, by name (not those in `computation_fields`)."""
  left_out = ('parent', 'name') + family_of(model).computation_fields
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in left_out}


def block_paths(model, platform: str) -> Tuple[str, ...]:
  """How each block of `model` is computed when lowered for `platform` (models/dispatch.py),
  one line each; empty for families with one implementation."""
  return family_of(model).blocks(model, platform)
