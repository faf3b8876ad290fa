"""How a sweep's points run: one after another here, or as a SLURM job array via submitit
(several at once on one host's devices: densenet_jax/experiments/parallel.py).

Each point is its train.py command (`sweep.Sweep.command`), its output appended to
DIR/<point>/train.log (for a gs:// DIR, to a local copy uploaded at every poll: staging.py).
A point is done when its results.json exists; its progress is read from its progress.json.
"""

import os
import shlex
import subprocess
import time
from typing import Callable, List, Optional, Sequence

from absl import logging

from densenet_jax.experiments import plan
from densenet_jax.runtime import paths
from densenet_jax.runtime import staging
from densenet_jax.training import records



def _last_line(log_path: str) -> str:
  """The last non-empty line of a point's log: the error it stopped with."""
  try:  # Local, or the uploaded log of a point that ran elsewhere.
    text = paths.read_bytes(log_path).decode(errors='replace')
  except OSError:
    return 'no log'
  lines = [line.strip() for line in text.splitlines()[-200:] if line.strip()]
  return lines[-1][:1000] if lines else 'no output'


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class _Progress:
  """Point i of N, its own step, and the sweep's ETA from the work done so far."""

  def __init__(self, sweep: plan.Sweep):
    self.sweep = sweep
    self.start = time.time()
    self.start_fraction = self.fraction()

  def point_fraction(self, point: plan.Point) -> float:
    if point.state == 'done':
      return 1.0
    progress = records.read_json(os.path.join(self.sweep.point_workdir(point),
                                              records.PROGRESS))
    if not progress or not progress.get('num_train_steps'):
      return 0.0
    return min(1.0, progress['step'] / progress['num_train_steps'])

  def fraction(self) -> float:
    return sum(self.point_fraction(p) for p in self.sweep.points) / len(self.sweep.points)

  def line(self, point: plan.Point, own: Optional[str] = None) -> str:
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


def record_outcome(sweep: plan.Sweep, point: plan.Point, returncode: int,
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


def _wait(proc: subprocess.Popen, log: staging.PointLog, poll_seconds: float,
          on_poll: Optional[Callable[[], None]] = None) -> int:
  """A point's exit status; its log is uploaded (if remote) every `poll_seconds` meanwhile."""
  while True:
    try:
      return proc.wait(timeout=poll_seconds)
    except subprocess.TimeoutExpired:
      log.upload()
      try:  # Only a display: a failed read of a remote progress.json must not stop the point.
        if on_poll is not None:
          on_poll()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not show the progress (%s: %s).', type(e).__name__, str(e)[:200])


def run_local(sweep: plan.Sweep, poll_seconds: float) -> List[plan.Point]:
  """Runs the unfinished points one after another; returns the failed ones."""
  progress = _Progress(sweep)
  for point in sweep.points:
    if point.state == 'done':
      logging.info('Point %d/%d %s: done already, skipped.', point.index + 1,
                   len(sweep.points), point.name)
      continue
    point.state, point.error = 'running', None
    sweep.save()
    log = staging.PointLog(sweep.point_workdir(point))
    logging.info('Point %d/%d %s: running (log: %s).', point.index + 1, len(sweep.points),
                 point.name, log.path)
    proc = start_point(sweep.command(point), log.local)
    try:
      returncode = _wait(proc, log, poll_seconds,
                         lambda p=point: logging.info('%s', progress.line(p)))
    except BaseException:  # Ctrl-C or SIGTERM: stop the point (it checkpoints), then exit.
      proc.terminate()
      proc.wait()
      log.close()
      point.state = 'interrupted'
      sweep.save()
      raise
    record_outcome(sweep, point, returncode, log.local, progress)
    log.close()
  return [p for p in sweep.points if p.state == 'failed']


def run_slurm(sweep: plan.Sweep, *, cluster: Optional[str] = 'slurm', wait: bool = True,
              log_upload_seconds: float = 30.0, **parameters) -> List[plan.Point]:
  """Submits the unfinished points as one job array through submitit.

  Args:
    sweep: the checked sweep.
    cluster: submitit's cluster ('slurm'; 'local' runs the same jobs as local processes, which
      the tests use).
    wait: wait for every job and record its outcome.
    log_upload_seconds: how often a running point on an object store uploads its log.
    **parameters: submitit executor parameters (slurm_partition, nodes, gpus_per_node, ...).

  Returns:
    The failed points (only known when waiting).
  """
  import submitit  # pylint: disable=g-import-not-at-top
  todo = [p for p in sweep.points if p.state != 'done']
  if not todo:
    return []
  # submitit's pickles and logs need a file system shared with the nodes, not an object store:
  # for a gs:// sweep, ./submitit/<sweep> where the sweep is started.
  folder = (os.path.join('submitit', os.path.basename(staging.cache_dir(sweep.workdir)))
            if paths.is_remote(sweep.workdir) else os.path.join(sweep.workdir, 'submitit'))
  executor = submitit.AutoExecutor(folder=os.path.join(os.path.abspath(folder), '%j'),
                                   cluster=cluster)
  executor.update_parameters(name=os.path.basename(sweep.workdir), **parameters)
  commands = [sweep.command(p) for p in todo]
  point_dirs = [sweep.point_workdir(p) for p in todo]  # Each task keeps its log there.
  jobs = executor.map_array(_run_point_checked, commands, point_dirs,
                            [log_upload_seconds] * len(todo))
  for point, job in zip(todo, jobs):
    point.state, point.job_id, point.error = 'submitted', str(job.job_id), None
    logging.info('Point %d/%d %s: submitted as job %s.', point.index + 1, len(sweep.points),
                 point.name, job.job_id)
  sweep.save()
  if not wait:
    return []
  for point, job, point_dir in zip(todo, jobs, point_dirs):
    try:
      job.result()
      point.state = 'done' if sweep.is_done(point) else 'failed'
      point.error = None if point.state == 'done' else 'stopped before finishing; resubmit'
    except Exception as e:  # pylint: disable=broad-except
      log = os.path.join(point_dir, staging.LOG)
      point.state, point.error = 'failed', _last_line(log) or str(e)[-1000:]
    sweep.save()
  return [p for p in sweep.points if p.state == 'failed']


def _run_point_checked(command: Sequence[str], point_dir: str,
                       log_upload_seconds: float) -> None:
  """A job array task: one point's train.py (in every task of a multi-node job).

  The tasks of a multi-node point append to one local train.log on a shared file system; on
  an object store each uploads its own (train.log for the first, train.task<i>.log).
  """
  name = staging.LOG
  if paths.is_remote(point_dir):
    import submitit  # pylint: disable=g-import-not-at-top
    rank = submitit.JobEnvironment().global_rank
    name = staging.LOG if rank == 0 else f'train.task{rank}.log'
  log = staging.PointLog(point_dir, name)
  try:
    returncode = _wait(start_point(command, log.local), log, log_upload_seconds)
    error = _last_line(log.local)
  finally:
    log.close()
  if returncode:
    raise RuntimeError(f'train.py exited with status {returncode}: {error}')
