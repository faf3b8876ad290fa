"""Runs every point of a sweep config as an ordinary training run, then writes the report.

    python -m densenet_jax.sweep --config=configs/ablations/growth_compression.py:cpu --workdir=DIR
    python -m densenet_jax.sweep --config=... --workdir=DIR --launcher=slurm --partition=gpu \
        --nodes=1 --gpus_per_node=8 --time_min=600 --array_parallelism=4
    python -m densenet_jax.sweep --config=... --workdir=DIR --launcher=print
    python -m densenet_jax.sweep --config=... --workdir=DIR --parallel=4   # 4 at once here

A sweep config file has `get_config(arg=None)` and `get_sweep(arg=None)`, the latter a list of
points, each a dict from a dotted config field to a value (see densenet_jax/hyper.py). Point
`p` runs `train.py` with the config file, `--config.FIELD=VALUE` for each of its fields, and
its own workdir DIR/<name>, the name made of the swept values ('growth_rate=12,compression=0.5').
So every point resumes, writes results.json and TensorBoard events, like any run. `--config.X=Y`
flags given to the sweep apply to every point. `--seeds=N` runs every configuration N times,
with seeds config.seed + 0 .. N-1 ('growth_rate=12,compression=0.5,seed=1'), and the report
gives each configuration's mean and 95 % interval over its seeds.

Every point's config is checked (the same checks as train.py) before the first one starts.
Locally the points run one after another: rerunning the command skips finished points (those
with a results.json), resumes an interrupted one and runs the rest; a failing point is recorded
with its error and the others still run, and the command exits non-zero naming the failures.
`--parallel=N` runs up to N points at once here, each on devices of its own (GPUs, TPU chips or
CPU cores; `--devices_per_point=K`, see densenet_jax/parallel.py).
DIR/sweep.json records each point's overrides and state (pending, running, done, failed,
interrupted, submitted), and with --parallel the devices it ran on. `--launcher=slurm` submits
the unfinished points as one SLURM job array through submitit; `--launcher=print` prints each
point's train.py command for other launchers. DIR may be on an object store (gs://bucket/sweep):
see docs/object_stores.md.
"""

import dataclasses
import importlib.util
import inspect
import os
import shlex
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections.config_flags import config_flags

from densenet_jax import cli
from densenet_jax import hyper
from densenet_jax import launchers
from densenet_jax import parallel
from densenet_jax import paths
from densenet_jax import records
from densenet_jax import run_guard
from densenet_jax import trainer
from densenet_jax import validation

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Sweep config file, FILE.py[:ARG].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; point p runs in DIR/<name>.')
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', ['local', 'slurm', 'print'],
                              'local: one point after another here; slurm: a job array '
                              'through submitit; print: print the points\' commands.')
_REPORT = flags.DEFINE_bool('report', True, 'Write DIR/results.csv, report.md and figures at '
                            'the end (local and slurm with --wait).')
_POLL = flags.DEFINE_float('poll_seconds', 30.0, 'How often a running point\'s progress is shown.')
_PARTITION = flags.DEFINE_string('partition', None, 'SLURM partition.')
_NODES = flags.DEFINE_integer('nodes', 1, 'SLURM nodes per point.')
_GPUS = flags.DEFINE_integer('gpus_per_node', 0, 'GPUs per node (one process per node).')
_CPUS = flags.DEFINE_integer('cpus_per_task', None, 'CPUs per task (SLURM default if None).')
_TIME = flags.DEFINE_integer('time_min', 24 * 60, 'Time limit of each point, minutes.')
_PARALLEL = flags.DEFINE_integer('array_parallelism', 16, 'Points running at once (SLURM).')
_WAIT = flags.DEFINE_bool('wait', True, 'slurm: wait for the jobs, then write the report.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Runs of every configuration, with seeds config.seed '
                              '+ 0 .. N-1; the report gives their mean and spread.')
_POINTS_AT_ONCE = flags.DEFINE_integer('parallel', 1, 'local: points running at once on this '
                                       'host, each on devices of its own.')
_DEVICES_PER_POINT = flags.DEFINE_integer(
    'devices_per_point', None, 'local: GPUs, TPU chips or CPU cores of each point (default: '
    'the host\'s divided by --parallel).')

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'train.py')
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
  for point in points:
    label = f'Point {point.index + 1} of {len(points)} ({point.name})'
    try:
      trainer.prepare(apply_overrides(config, point.overrides), device_count, process_count)
      parse_train_flags(config_arg, override_args(common) + override_args(point.overrides))
    except (SweepError, validation.ConfigError) as e:
      raise SweepError(f'{label}: {e}') from None
  return Sweep(config_arg, paths.display(paths.resolve(workdir)), points, common, seeds)


def _restore_states(sweep: Sweep) -> None:
  """Carries states recorded by an earlier run of this sweep over; done means results.json."""
  saved = records.read_json(os.path.join(sweep.workdir, SWEEP_JSON)) or {}
  by_name = {p.get('name'): p for p in saved.get('points', [])}
  for point in sweep.points:
    old = by_name.get(point.name, {})
    if sweep.is_done(point):
      point.state, point.devices = 'done', old.get('devices')
    elif old.get('state') in ('failed', 'submitted'):
      point.state, point.error, point.job_id = old['state'], old.get('error'), old.get('job_id')


def slurm_parameters() -> Dict[str, Any]:
  """submitit's executor parameters from the flags."""
  parameters = dict(nodes=_NODES.value, tasks_per_node=1, timeout_min=_TIME.value,
                    slurm_array_parallelism=_PARALLEL.value)
  if _PARTITION.value:
    parameters['slurm_partition'] = _PARTITION.value
  if _GPUS.value:
    parameters['gpus_per_node'] = _GPUS.value
  if _CPUS.value:
    parameters['cpus_per_task'] = _CPUS.value
  return parameters


def _interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f'stopped by {signal.Signals(signum).name}')


def _parallel_slots() -> List[parallel.Slot]:
  """--parallel's slots, or a one-line exit naming the flag, before anything runs."""
  try:
    if _LAUNCHER.value != 'local':
      raise parallel.ParallelError('--parallel and --devices_per_point are for '
                                   f'--launcher=local, not --launcher={_LAUNCHER.value}.')
    slots = parallel.host_slots(_POINTS_AT_ONCE.value, _DEVICES_PER_POINT.value)
  except parallel.ParallelError as e:
    sys.exit(f'Sweep flag error: {e}')
  # The points own the accelerators: on TPU an opened chip is locked to this process, on GPU
  # JAX would preallocate memory. The checks before the points start need no device.
  jax.config.update('jax_platforms', 'cpu')
  return slots


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_flag = flags.FLAGS['config']
  config_arg = config_flags.get_config_filename(config_flag)
  common = config_flags.get_override_values(config_flag)
  slots = None
  if _POINTS_AT_ONCE.value != 1 or _DEVICES_PER_POINT.value is not None:
    slots = _parallel_slots()  # Each point's own devices; this process keeps to the CPU.
    devices, processes = slots[0].jax_devices, 1
  elif _LAUNCHER.value == 'slurm':  # The points' devices, not this host's.
    devices, processes = max(1, _GPUS.value) * _NODES.value, _NODES.value
  elif _LAUNCHER.value == 'print':
    devices, processes = 1, 1
  else:
    devices, processes = jax.device_count(), jax.process_count()
  try:
    sweep = build_sweep(config_arg, _CONFIG.value, _WORKDIR.value, common, devices, processes,
                        _SEEDS.value)
  except SweepError as e:
    sys.exit(f'Sweep config error: {e}')
  if _LAUNCHER.value != 'print' and not os.path.isfile(TRAIN_PY):
    sys.exit(f'Sweep error: the points run {TRAIN_PY}, which does not exist: run the sweep from '
             'a checkout of densenet_jax installed with `pip install -e .`.')
  if _LAUNCHER.value == 'print':
    for point in sweep.points:
      print(shlex.join(['python', 'train.py'] + sweep.command(point)[2:]))
    return
  if not paths.is_remote(sweep.workdir):  # An object store needs no directories.
    os.makedirs(sweep.workdir, exist_ok=True)
  signal.signal(signal.SIGTERM, _interrupt)  # Stop the running point cleanly, as Ctrl-C does.
  try:
    lock = run_guard.WorkdirLock(sweep.workdir)
    lock.acquire()
  except run_guard.WorkdirInUseError as e:
    sys.exit(f'Sweep error: {e}')
  try:
    _restore_states(sweep)
    logging.info('Sweep %s: %d points in %s, %d done already.', sweep.config_arg,
                 len(sweep.points), sweep.workdir,
                 sum(p.state == 'done' for p in sweep.points))
    sweep.save()
    if slots:
      failed = parallel.run_parallel(sweep, slots, _POLL.value)
      write_report = True
    elif _LAUNCHER.value == 'local':
      failed = launchers.run_local(sweep, _POLL.value)
      write_report = True
    else:
      failed = launchers.run_slurm(sweep, wait=_WAIT.value, **slurm_parameters())
      write_report = _WAIT.value
    if _REPORT.value and write_report:
      from densenet_jax import report  # pylint: disable=g-import-not-at-top
      report.write_report(sweep.workdir)
  except KeyboardInterrupt as e:
    sys.exit(f'Sweep {e or "interrupted"}; the running point saved a checkpoint. Run the same '
             'command to go on.')
  finally:
    lock.release()
  if failed:
    sys.exit(f'{len(failed)} of {len(sweep.points)} points failed: '
             + '; '.join(f'{p.name}: {p.error}' for p in failed))
  logging.info('Sweep finished: %d points in %s.', len(sweep.points), sweep.workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)
