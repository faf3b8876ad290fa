"""How a sweep's points run: one after another here, or as a SLURM job array via submitit
(several at once on one host's devices: densenet_jax/parallel.py).

Each point is its train.py command (`sweep.Sweep.command`), its output appended to
DIR/<point>/train.log. A point is done when its results.json exists; its progress is read from
its progress.json.
"""

import os
import shlex
import subprocess
import time
from typing import TYPE_CHECKING, List, Optional, Sequence

from absl import logging

from densenet_jax import records

if TYPE_CHECKING:  # Only for annotations: sweep imports this module.
  from densenet_jax import sweep as sweep_lib  # pylint: disable=g-bad-import-order


def _last_line(log_path: str) -> str:
  """The last non-empty line of a point's log: the error it stopped with."""
  try:
    with open(log_path, errors='replace') as f:
      lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
  except OSError:
    return 'no log'
  return lines[-1][:1000] if lines else 'no output'


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class _Progress:
  """Point i of N, its own step, and the sweep's ETA from the work done so far."""

  def __init__(self, sweep: 'sweep_lib.Sweep'):
    self.sweep = sweep
    self.start = time.time()
    self.start_fraction = self.fraction()

  def point_fraction(self, point: 'sweep_lib.Point') -> float:
    if point.state == 'done':
      return 1.0
    progress = records.read_json(os.path.join(self.sweep.point_workdir(point),
                                              records.PROGRESS))
    if not progress or not progress.get('num_train_steps'):
      return 0.0
    return min(1.0, progress['step'] / progress['num_train_steps'])

  def fraction(self) -> float:
    return sum(self.point_fraction(p) for p in self.sweep.points) / len(self.sweep.points)

  def line(self, point: 'sweep_lib.Point', own: Optional[str] = None) -> str:
    """'Point i/N NAME: OWN; sweep x% done, ETA h:mm:ss'; OWN defaults to the point's step."""
    progress = records.read_json(os.path.join(self.sweep.point_workdir(point),
                                              records.PROGRESS)) or {}
    if own is None and progress.get('num_train_steps'):
      speed = progress.get('train_images_per_second')
      own = (f'step {progress["step"]}/{progress["num_train_steps"]}'
             + (f', {speed:.1f} img/s' if speed else ''))
    own = own or 'starting'
    fraction = self.fraction()
    done_here = fraction - self.start_fraction
    elapsed = time.time() - self.start
    eta = (_duration(elapsed * (1 - fraction) / done_here) if done_here > 0.001 else '?')
    return (f'Point {point.index + 1}/{len(self.sweep.points)} {point.name}: {own}; '
            f'sweep {100 * fraction:.0f}% done, ETA {eta}')


def start_point(command: Sequence[str], log_path: str, header: str = '',
                **popen) -> subprocess.Popen:
  """Starts one point's train.py, its output appended to `log_path` after `header` (lines
  such as the devices it was given) and the command; `popen`: more subprocess.Popen options."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'a') as log:
    log.write(f'\n{header}$ {shlex.join(command)}\n')
    log.flush()
    return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, **popen)


def record_outcome(sweep: 'sweep_lib.Sweep', point: 'sweep_lib.Point', returncode: int,
                   log_path: str, progress: _Progress) -> None:
  """A finished point's state: done (it wrote results.json) or failed with why; saved."""
  if returncode == 0 and sweep.is_done(point):
    point.state = 'done'
    result = records.read_json(os.path.join(sweep.point_workdir(point), records.RESULTS))
    logging.info('%s', progress.line(point, f'done, eval_top1 {result.get("eval_top1")}'))
  else:
    point.state = 'failed'
    point.error = (_last_line(log_path) if returncode else
                   'stopped before finishing (preempted); rerun to resume')
    logging.error('Point %d/%d %s failed: %s', point.index + 1, len(sweep.points),
                  point.name, point.error)
  sweep.save()


def run_local(sweep: 'sweep_lib.Sweep', poll_seconds: float) -> List['sweep_lib.Point']:
  """Runs the unfinished points one after another; returns the failed ones."""
  progress = _Progress(sweep)
  for point in sweep.points:
    if point.state == 'done':
      logging.info('Point %d/%d %s: done already, skipped.', point.index + 1,
                   len(sweep.points), point.name)
      continue
    point.state, point.error = 'running', None
    sweep.save()
    log_path = os.path.join(sweep.point_workdir(point), 'train.log')
    logging.info('Point %d/%d %s: running (log: %s).', point.index + 1, len(sweep.points),
                 point.name, log_path)
    proc = start_point(sweep.command(point), log_path)
    try:
      while True:
        try:
          returncode = proc.wait(timeout=poll_seconds)
          break
        except subprocess.TimeoutExpired:
          logging.info('%s', progress.line(point))
    except BaseException:  # Ctrl-C or SIGTERM: stop the point (it checkpoints), then exit.
      proc.terminate()
      proc.wait()
      point.state = 'interrupted'
      sweep.save()
      raise
    record_outcome(sweep, point, returncode, log_path, progress)
  return [p for p in sweep.points if p.state == 'failed']


def run_slurm(sweep: 'sweep_lib.Sweep', *, cluster: Optional[str] = 'slurm', wait: bool = True,
              **parameters) -> List['sweep_lib.Point']:
  """Submits the unfinished points as one job array through submitit.

  Args:
    sweep: the checked sweep.
    cluster: submitit's cluster ('slurm'; 'local' runs the same jobs as local processes, which
      the tests use).
    wait: wait for every job and record its outcome.
    **parameters: submitit executor parameters (slurm_partition, nodes, gpus_per_node, ...).

  Returns:
    The failed points (only known when waiting).
  """
  import submitit  # pylint: disable=g-import-not-at-top
  todo = [p for p in sweep.points if p.state != 'done']
  if not todo:
    return []
  executor = submitit.AutoExecutor(folder=os.path.join(sweep.workdir, 'submitit', '%j'),
                                   cluster=cluster)
  executor.update_parameters(name=os.path.basename(sweep.workdir), **parameters)
  commands = [sweep.command(p) for p in todo]
  logs = [os.path.join(sweep.point_workdir(p), 'train.log') for p in todo]
  jobs = executor.map_array(_run_point_checked, commands, logs)
  for point, job in zip(todo, jobs):
    point.state, point.job_id, point.error = 'submitted', str(job.job_id), None
    logging.info('Point %d/%d %s: submitted as job %s.', point.index + 1, len(sweep.points),
                 point.name, job.job_id)
  sweep.save()
  if not wait:
    return []
  for point, job, log in zip(todo, jobs, logs):
    try:
      job.result()
      point.state = 'done' if sweep.is_done(point) else 'failed'
      point.error = None if point.state == 'done' else 'stopped before finishing; resubmit'
    except Exception as e:  # pylint: disable=broad-except
      point.state, point.error = 'failed', _last_line(log) or str(e)[-1000:]
    sweep.save()
  return [p for p in sweep.points if p.state == 'failed']


def _run_point_checked(command: Sequence[str], log_path: str) -> None:
  """A job array task: one point's train.py (in every task of a multi-node job)."""
  returncode = start_point(command, log_path).wait()
  if returncode:
    raise RuntimeError(f'train.py exited with status {returncode}: {_last_line(log_path)}')
