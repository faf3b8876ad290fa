"""Runs every point of a sweep config as an ordinary training run, then writes the report.

    python -m densenet_jax.experiments.sweep --config=configs/ablations/growth_compression.py:cpu --workdir=DIR
    python -m densenet_jax.experiments.sweep --config=... --workdir=DIR --launcher=slurm --partition=gpu \
        --nodes=1 --gpus_per_node=8 --time_min=600 --array_parallelism=4
    python -m densenet_jax.experiments.sweep --config=... --workdir=DIR --launcher=print
    python -m densenet_jax.experiments.sweep --config=... --workdir=DIR --parallel=4   # 4 at once here

A sweep config file has `get_config(arg=None)` and `get_sweep(arg=None)`, the latter a list of
points, each a dict from a dotted config field to a value (see densenet_jax/experiments/hyper.py).
Point `p` runs `train.py` with the config file, `--config.FIELD=VALUE` for each of its fields, and
its own workdir DIR/<name>, the name made of the swept values ('growth_rate=12,compression=0.5'). So
every point resumes, writes results.json and TensorBoard events, like any run. `--config.X=Y`
flags given to the sweep apply to every point. `--seeds=N` runs every configuration N times,
with seeds config.seed + 0 .. N-1 ('growth_rate=12,compression=0.5,seed=1'), and the report
gives each configuration's mean and 95 % interval over its seeds.

Every point's config is checked (the same checks as train.py) before the first one starts.
Locally the points run one after another: rerunning the command skips finished points (those
with a results.json), resumes an interrupted one and runs the rest; a failing point is recorded
with its error and the others still run, and the command exits non-zero naming the failures.
`--parallel=N` runs up to N points at once here, each on devices of its own (GPUs, TPU chips or
CPU cores; `--devices_per_point=K`, see densenet_jax/experiments/parallel.py).
DIR/sweep.json records each point's overrides and state (pending, running, done, failed,
interrupted, submitted), and with --parallel the devices it ran on. `--launcher=slurm` submits
the unfinished points as one SLURM job array through submitit; `--launcher=print` prints each
point's train.py command for other launchers. DIR may be on an object store (gs://bucket/sweep):
see docs/object_stores.md.
"""

import os
import shlex
import signal
import sys
from typing import Any, Dict, List

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections.config_flags import config_flags

from densenet_jax.experiments import launchers
from densenet_jax.experiments import parallel
from densenet_jax.experiments import plan
from densenet_jax.runtime import paths
from densenet_jax.runtime import run_guard
from densenet_jax.training import cli
from densenet_jax.training import records

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

def _restore_states(sweep: plan.Sweep) -> None:
  """Carries states recorded by an earlier run of this sweep over; done means results.json."""
  saved = records.read_json(os.path.join(sweep.workdir, plan.SWEEP_JSON)) or {}
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


def _slurm_problem() -> str:
  """Why --launcher=slurm cannot submit from here ('' when it can): checked before anything
  is written, since submitit would only fail at submission, with a traceback."""
  try:
    import submitit  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 'needs submitit (pip install submitit)'
  if submitit.SlurmExecutor.affinity() <= 0:   # submitit's own test: srun on the PATH.
    return ('no SLURM here (srun is not on the PATH): run the sweep on a SLURM login node, or '
            'use --launcher=local or --launcher=print')
  return ''


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
  problem = _slurm_problem() if _LAUNCHER.value == 'slurm' else ''
  if problem:
    sys.exit(f'Sweep flag error: --launcher=slurm: {problem}.')
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
    sweep = plan.build_sweep(config_arg, _CONFIG.value, _WORKDIR.value, common, devices,
                             processes, _SEEDS.value)
  except plan.SweepError as e:
    sys.exit(f'Sweep config error: {e}')
  if _LAUNCHER.value != 'print' and not os.path.isfile(plan.TRAIN_PY):
    sys.exit(f'Sweep error: the points run {plan.TRAIN_PY}, which does not exist: run the sweep '
             'from a checkout of densenet_jax installed with `pip install -e .`.')
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
      from densenet_jax.experiments import report  # pylint: disable=g-import-not-at-top
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
