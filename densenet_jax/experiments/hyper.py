"""Helpers that sweep config files use to declare their points, in the style of big_vision.

A sweep config file has the usual `get_config(arg=None)` and also `get_sweep(arg=None)`, which
returns a list of points: dicts from a dotted config field to its value. These helpers build
such lists:

    from densenet_jax.experiments import hyper

    def get_sweep(arg=None):
      return hyper.product(
          hyper.sweep('model.growth_rate', [12, 24, 32]),
          hyper.sweep('model.compression', [0.25, 0.5, 0.75, 1.0]))   # 12 points

    hyper.zipped(hyper.sweep('model.depth', [40, 100]),
                 hyper.sweep('model.growth_rate', [12, 24]))          # 2 points, pairwise
"""

import itertools
from typing import Any, Dict, Iterable, List, Sequence

Point = Dict[str, Any]


def sweep(field: str, values: Iterable[Any]) -> List[Point]:
  """One point per value of the dotted config `field`, e.g. sweep('model.depth', [40, 100])."""
  if not isinstance(field, str) or not field or field.startswith('config.'):
    raise ValueError(f'sweep field {field!r}: expected a dotted config field such as '
                     "'model.growth_rate' (without a leading 'config.').")
  return [{field: value} for value in values]


def fixed(**fields: Any) -> List[Point]:
  """A single point setting `fields` (dots written as '__'), to combine with `product`."""
  return [{name.replace('__', '.'): value for name, value in fields.items()}]


def _merge(points: Sequence[Point]) -> Point:
  merged: Point = {}
  for point in points:
    shared = sorted(set(merged) & set(point))
    if shared:
      raise ValueError(f'sweep fields {shared} are set by more than one of the combined lists.')
    merged.update(point)
  return merged


def product(*lists: Sequence[Point]) -> List[Point]:
  """The Cartesian product of point lists; the last list varies fastest."""
  return [_merge(combo) for combo in itertools.product(*lists)]


def zipped(*lists: Sequence[Point]) -> List[Point]:
  """Points combined element by element from lists of equal length."""
  lengths = {len(points) for points in lists}
  if len(lengths) > 1:
    raise ValueError(f'zipped lists must have equal lengths, got {[len(p) for p in lists]}.')
  return [_merge(combo) for combo in zip(*lists)]


def with_seeds(points: List[Point], seeds: int, base_seed: int) -> List[Point]:
  """Each point run `seeds` times, with 'seed' set to base_seed + 0 .. seeds-1.

  The seed changes initialisation, data order, augmentation and dropout. Every configuration's
  first seed comes before any second one, so that a study stopped halfway has every
  configuration at least once. The names are those of a sweep config that sweeps `seed` itself.

  Raises:
    ValueError: for seeds < 1, or seeds > 1 with a sweep config that already sets `seed`.
  """
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: expected 1 or more runs per configuration.')
  if seeds == 1:
    return points
  if any('seed' in p for p in points):
    raise ValueError(f'--seeds={seeds}, but the sweep config already sweeps seed: use one.')
  return [{**p, 'seed': base_seed + i} for i in range(seeds) for p in points]
