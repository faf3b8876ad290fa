"""A sweep's plan: its points, each checked and named, with its train.py command and workdir.

The sweep command (densenet_jax/experiments/sweep.py) builds one `Sweep` from a sweep config
file; the launchers (launchers.py, parallel.py) run its points. Every point is checked with the
same checks as train.py before the first one starts, so a bad point stops the sweep in one line
instead of failing hours later.
"""

import dataclasses
import importlib.util
import inspect
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import flags
from ml_collections.config_flags import config_flags

from densenet_jax.experiments import hyper
from densenet_jax.runtime import paths
from densenet_jax.training import records
from densenet_jax.training import validation

# train.py of the checkout this package runs from (densenet_jax/experiments/plan.py -> root).
TRAIN_PY = os.path.normpath(os.path.join(os.path.abspath(__file__), *[os.pardir] * 3,
                                         'train.py'))
SWEEP_JSON = 'sweep.json'


class SweepError(ValueError):
  """A sweep config that cannot run: named point, field and what was expected."""


@dataclasses.dataclass
class Point:
  """One run of the sweep."""
  index: int
  name: str
  overrides: Dict[str, Any]
  state: str = 'pending'
  error: Optional[str] = None
  job_id: Optional[str] = None
  devices: Optional[Dict[str, Any]] = None  # The slot it ran in, with --parallel.

  def record(self) -> Dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def split_config_arg(config_arg: str):
  """'FILE.py:ARG' -> ('FILE.py', 'ARG'); 'FILE.py' -> ('FILE.py', None)."""
  path, sep, arg = config_arg.partition(':')
  return path, (arg if sep else None)


def _call(function, arg):
  """Calls get_config / get_sweep with ARG if given (as ml_collections' config flags do)."""
  if arg is None and not inspect.signature(function).parameters:
    return function()
  return function(arg) if arg is not None else function()


def _load_module(config_arg: str):
  path, arg = split_config_arg(config_arg)
  if not os.path.isfile(path):
    raise SweepError(f'--config={config_arg}: no such file {path!r}.')
  spec = importlib.util.spec_from_file_location('densenet_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, path, arg


def load_config(config_arg: str):
  """get_config(ARG) of a config file 'FILE.py:ARG', as --config=FILE.py:ARG gives it."""
  module, _, arg = _load_module(config_arg)
  return _call(module.get_config, arg)


def load_points(config_arg: str) -> List[Dict[str, Any]]:
  """The points of a sweep config file; clear errors for a file that is not one."""
  module, path, arg = _load_module(config_arg)
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{path} has no get_sweep(arg=None): not a sweep config (see '
                     'configs/ablations/).')
  points = _call(module.get_sweep, arg)
  if (not isinstance(points, (list, tuple)) or not points
      or not all(isinstance(p, dict) for p in points)):
    raise SweepError(f'{path}: get_sweep({arg!r}) must return a non-empty list of dicts from '
                     f'a dotted config field to a value, got {type(points).__name__}.')
  return [dict(p) for p in points]


def _format_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return '-'.join(_format_value(v) for v in value)
  return str(value).replace('/', '_').replace(' ', '')


def point_names(points: Sequence[Dict[str, Any]]) -> List[str]:
  """Readable, unique names from the swept values: 'growth_rate=12,compression=0.5'.

  A field is named by its last component unless two swept fields share it; fields whose value
  is the same in every point are left out of the names.
  """
  fields = list(dict.fromkeys(f for p in points for f in p))
  varying = [f for f in fields if len({repr(p.get(f)) for p in points}) > 1] or fields
  short = [f.rsplit('.', 1)[-1] for f in varying]
  labels = [s if short.count(s) == 1 else f for s, f in zip(short, varying)]
  names = [','.join(f'{label}={_format_value(p[f])}' for label, f in zip(labels, varying)
                    if f in p) for p in points]
  if len(set(names)) != len(names):
    duplicates = sorted({n for n in names if names.count(n) > 1})
    raise SweepError(f'The sweep has repeated points: {duplicates}.')
  return names


def apply_overrides(config, overrides: Dict[str, Any]):
  """A copy of `config` with each dotted field set; a field that does not exist or a value of the
  wrong type raises SweepError naming it."""
  config = config.copy_and_resolve_references()
  for field, value in overrides.items():
    *path, last = field.split('.')
    node = config
    try:
      for part in path:
        node = node[part]
      if last not in node:
        raise KeyError(last)
      node[last] = tuple(value) if isinstance(value, list) else value
    except (KeyError, AttributeError, TypeError) as e:
      problem = 'no such field' if isinstance(e, (KeyError, AttributeError)) else e
      raise SweepError(f'config.{field}={value!r}: {problem}.') from None
  return config


def override_args(overrides: Dict[str, Any]) -> List[str]:
  """The train.py flags that set `overrides` ({'model.depth': 40} -> --config.model.depth=40)."""
  args = []
  for field, value in overrides.items():
    if isinstance(value, (tuple, list)):
      value = '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
    args.append(f'--config.{field}={value}')
  return args


def parse_train_flags(config_arg: str, args: Sequence[str]):
  """The config train.py builds from `--config=config_arg` and `args`, parsed as train.py's
  flags parse them: a value the check accepts but the flags cannot express (None for a typed
  field) fails here, before any point runs, not in the point's own process.

  Raises:
    SweepError: with the flags' message.
  """
  argv = ['train.py', f'--config={config_arg}', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    raise SweepError(f'train.py cannot take these flags: {e}') from None
  return values.config


@dataclasses.dataclass
class Sweep:
  """A sweep config's points, checked, with their commands and workdirs under `workdir`."""
  config_arg: str
  workdir: str
  points: List[Point]
  common: Dict[str, Any]
  seeds: int = 1

  def point_workdir(self, point: Point) -> str:
    return os.path.join(self.workdir, point.name)  # Also 'gs://bucket/sweep/<name>'.

  def command(self, point: Point) -> List[str]:
    return [sys.executable, TRAIN_PY, f'--config={self.config_arg}',
            f'--workdir={self.point_workdir(point)}', *override_args(self.common),
            *override_args(point.overrides)]

  def is_done(self, point: Point) -> bool:
    return (paths.resolve(self.point_workdir(point)) / records.RESULTS).exists()

  def save(self) -> None:
    """DIR/sweep.json, written whole."""
    records.write_json(os.path.join(self.workdir, SWEEP_JSON), {
        'config': self.config_arg, 'common_overrides': self.common, 'seeds': self.seeds,
        'points': [p.record() for p in self.points]})


def build_sweep(config_arg: str, config, workdir: str, common: Dict[str, Any],
                device_count: int, process_count: int, seeds: int = 1) -> Sweep:
  """Loads the sweep's points and checks every one before any runs.

  Args:
    config_arg: the config file and argument, 'FILE.py:ARG'.
    config: its get_config(ARG), with the `common` overrides applied.
    workdir: the sweep directory.
    common: dotted field -> value given to the sweep for every point.
    device_count, process_count: of the runs the points will be (not of this process when the
      points run elsewhere).
    seeds: runs of every configuration (`hyper.with_seeds`).

  Raises:
    SweepError: naming the first point that cannot run, and why.
  """
  try:
    raw = hyper.with_seeds(load_points(config_arg), seeds, config.seed)
  except ValueError as e:
    raise SweepError(str(e)) from None
  points = [Point(i, name, overrides) for i, (name, overrides)
            in enumerate(zip(point_names(raw), raw))]
  # Here, not at the top: the trainer loads TensorFlow (seconds), which the sweep's flag checks
  # before this point, and the launchers, do not need.
  from densenet_jax.training import trainer  # pylint: disable=g-import-not-at-top
  for point in points:
    label = f'Point {point.index + 1} of {len(points)} ({point.name})'
    try:
      trainer.prepare(apply_overrides(config, point.overrides), device_count, process_count)
      parse_train_flags(config_arg, override_args(common) + override_args(point.overrides))
    except (SweepError, validation.ConfigError) as e:
      raise SweepError(f'{label}: {e}') from None
  return Sweep(config_arg, paths.display(paths.resolve(workdir)), points, common, seeds)
