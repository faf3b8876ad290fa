"""Starting a run from converted weights (`config.init_checkpoint`), e.g. ImageNet DenseNets.

The directory is what `python -m densenet_jax.tools.convert` writes: `variables/` (params and
batch statistics) and `model.json`. Every variable whose shape matches the config's model is
taken; the classifier may differ in its number of classes (fine-tuning on another dataset) and
then keeps its fresh initialisation, which the log says. Any other difference is an error
naming the first variable and both shapes.
"""

import os
import tempfile
from typing import Any, Dict

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from densenet_jax.models import family
from densenet_jax.runtime import paths
from densenet_jax.training import checkpointing
from densenet_jax.training import staged_checkpoints
from densenet_jax.training import validation


def read_init_checkpoint(directory: str) -> Dict[str, Any]:
  """{'params', 'batch_stats'} as numpy arrays, from a converted-weights directory."""
  path = paths.resolve(directory) / 'variables'  # A local directory or gs://.
  if not path.is_dir():
    raise validation.ConfigError(
        f'config.init_checkpoint={directory!r}: expected a directory written by '
        f'`python -m densenet_jax.tools.convert` (with a variables/ subdirectory); {path} is '
        'missing.')
  if checkpointing.orbax_writes_directly(directory):
    return jax.device_get(ocp.StandardCheckpointer().restore(path))
  with tempfile.TemporaryDirectory() as local:  # s3://: Orbax reads a local copy.
    copy = staged_checkpoints.download_tree(paths.display(path), os.path.join(local, 'variables'))
    return jax.device_get(ocp.StandardCheckpointer().restore(paths.resolve(copy)))


def read_model_json(directory: str) -> Dict[str, Any]:
  return paths.read_json(paths.resolve(directory) / 'model.json') or {}


def _flat(tree) -> Dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(k.key) for k in path): leaf for path, leaf in flat}


def merge(init: Dict[str, Any], params: Any, batch_stats: Any, model) -> Dict[str, Any]:
  """Takes `init`'s arrays into the run's (params, batch_stats) trees, shape by shape.

  Returns:
    {'params': ..., 'batch_stats': ...} with the structure of the run's trees.
  """
  init = family.family_of(model).layout(model, init)   # e.g. a ResNet's unrolled blocks
  kept = []
  merged = {}
  for collection, target in (('params', params), ('batch_stats', batch_stats)):
    source = _flat(init.get(collection, {}))
    leaves = []
    flat_target = jax.tree_util.tree_flatten_with_path(target)
    for path, leaf in flat_target[0]:
      name = '/'.join(str(k.key) for k in path)
      value = source.get(name)
      if value is None:
        raise validation.ConfigError(
            f'config.init_checkpoint has no {collection}/{name}: it is not a {type(model).__name__} '
            'of this architecture (check config.model).')
      if np.shape(value) != leaf.shape:
        if name.startswith('classifier/'):
          kept.append(name)
          leaves.append(leaf)
          continue
        raise validation.ConfigError(
            f'config.init_checkpoint does not match config.model: {collection}/{name} has shape '
            f'{np.shape(value)} there and {leaf.shape} in this model.')
      leaves.append(np.asarray(value, dtype=leaf.dtype))
    merged[collection] = jax.tree_util.tree_unflatten(flat_target[1], leaves)
  if kept:
    logging.warning('Initialised from the checkpoint except the classifier (%s), whose number '
                    'of classes differs (%d here): it starts from scratch.', ', '.join(kept),
                    model.num_classes)
  else:
    logging.info('Initialised every variable from the checkpoint.')
  return merged


def check_model(directory: str, model) -> None:
  """Refuses a model whose fields differ from those the converted weights need (before any
  compilation): e.g. Keras weights compute with BatchNorm epsilon 1.001e-5."""
  meta = read_model_json(directory)
  for field, value in meta.get('overrides', {}).items():
    if getattr(model, field) != value:
      raise validation.ConfigError(
          f'config.model.{field}={getattr(model, field)!r}: the weights in '
          f'config.init_checkpoint={directory!r} come from {meta.get("source")} and compute '
          f'with {field}={value!r}; add --config.model.{field}={value!r}.')
