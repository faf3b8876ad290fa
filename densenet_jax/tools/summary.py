"""Prints a model's stages, output shapes and parameter counts without running it.

    python -m densenet_jax.tools.summary --model=densenet121
    python -m densenet_jax.tools.summary --model=densenet_bc --depth=250 --growth_rate=24
    python -m densenet_jax.tools.summary --model=preact_resnet_cifar --depth=164
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.models import create_model
from densenet_jax.models import family

_MODEL = flags.DEFINE_string('model', 'densenet121', 'A create_model name.')
_DEPTH = flags.DEFINE_integer('depth', None, 'Depth L, for CIFAR models.')
_GROWTH = flags.DEFINE_integer('growth_rate', None, 'Growth rate k override.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Input size (224 ImageNet, 32 CIFAR).')


def _stage_order(name: str):
  """Forward order: stem, block1, transition1, block2, ... (a ResNet's stage1, stage2, ...),
  final_norm, classifier."""
  for prefix, rank in (('stem', 0), ('block', 1), ('transition', 1), ('stage', 1),
                       ('final', 2), ('classifier', 3)):
    if name.startswith(prefix):
      index = name[len(prefix):]
      return (rank, int(index) if index.isdigit() else 0, prefix == 'transition', name)
  return (4, 0, False, name)


def _output_shape(entry) -> str:
  """The shape of a stage's output activations; a module that returns something else (a
  BatchNorm that hands its statistics to a fused call) shows '-'."""
  outputs = (entry or {}).get('__call__', ())
  shapes = [tuple(x.shape) for x in jax.tree.leaves(outputs) if len(x.shape) >= 2]
  return str(shapes[0]) if shapes else '-'


def summarize(model, image_size: int) -> str:
  """A markdown table: one row per stage (stem, blocks, transitions, head) of `model`."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, images)
  outputs = state['intermediates']
  params = variables['params']
  lines = ['| stage | output [batch, height, width, channels] | parameters |', '|---|---|---|']
  total = 0
  for name in sorted(params, key=_stage_order):
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[name]))
    total += n
    lines.append(f'| {name} | {_output_shape(outputs.get(name))} | {n:,} |')
  lines.append(f'| **total** | logits {(1, model.num_classes)} | **{total:,}** |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:   # `summary densenet169` would otherwise show --model's default.
    raise SystemExit(f'summary: unexpected arguments {argv[1:]}: name the model with '
                     '--model=NAME.')
  overrides = {}
  if _DEPTH.value is not None:
    overrides['depth'] = _DEPTH.value
  if _GROWTH.value is not None:
    overrides['growth_rate'] = _GROWTH.value
  try:
    model = create_model(_MODEL.value, **overrides)
  except (ValueError, TypeError) as e:
    raise SystemExit(f'summary: --model={_MODEL.value}: {e}') from None
  size = _IMAGE_SIZE.value
  if size is None:
    size = 224 if model.stem == 'imagenet' else 32
  smallest = family.min_image_size(model)
  if size < smallest:   # Shapes of zero, not an error, further down.
    raise SystemExit(f'summary: --image_size={size}: {_MODEL.value} needs at least {smallest} '
                     f'pixels (it halves the resolution {smallest.bit_length() - 1} times).')
  print(f'{_MODEL.value}: {model}\n')
  print(summarize(model, size))
  print(f'\n{family.gmacs(model, size):.3f} GMACs per {size}x{size} image '
        '(multiply-accumulates of the convolutions and the classifier, forward).')
  platforms = dict.fromkeys((jax.default_backend(), 'gpu', 'tpu'))
  if family.block_paths(model, 'cpu'):
    print('\nHow each block is computed (densenet_jax/models/dispatch.py):')
    for platform in platforms:
      for line in family.block_paths(model, platform):
        print(f'  {platform} {line}')


if __name__ == '__main__':
  app.run(main)
