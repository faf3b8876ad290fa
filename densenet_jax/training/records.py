"""The files a run writes for people and tools beside its checkpoints, and how to read them.

WORKDIR/results.json: the final step, evaluation metrics, training time, the whole config and
what produced it (`provenance`: code, libraries, hardware, command, start and end), written when
a run finishes (or an eval_only run evaluates). WORKDIR/progress.json: the step reached, the
training time so far and the same provenance, rewritten at every log point; a sweep shows it for
a running point, and a resumed run adds its time to the earlier sessions' and keeps their code
in `earlier_sessions`, so that a run resumed on other code says so.
"""

from typing import Any, Dict, Optional

import jax

from densenet_jax.runtime import leases
from densenet_jax.runtime import paths
from densenet_jax.runtime import provenance

RESULTS = 'results.json'
PROGRESS = 'progress.json'


read_json = paths.read_json
# What is kept of an earlier session's provenance in a resumed run's records.
_SESSION_FIELDS = ('commit', 'dirty', 'diff_hash', 'host', 'started')


def write_json(path: paths.PathLike, record: Dict[str, Any]) -> None:
  """Writes `record` to `path` (local or gs://) whole or not at all (process 0 only)."""
  if jax.process_index() != 0:
    return
  leases.check_held()  # A holder thawed after losing its workdir writes nothing more.
  paths.write_json(path, record)


def write_results(workdir: str, step: int, eval_metrics: Dict[str, float], config,
                  timer: Optional['TrainTimer'] = None,
                  run_provenance: Optional[Dict[str, Any]] = None) -> None:
  """WORKDIR/results.json: the run's final step, metrics, training time, config and provenance
  (the timer's, or `run_provenance` for a run with no training), with the time it finished."""
  timing = {**timer.summary(), **timer.run} if timer is not None else {}
  if timer is not None and timer.earlier_sessions:
    timing['earlier_sessions'] = timer.earlier_sessions
  record = {'step': step, **eval_metrics, **timing, 'config': config.to_dict()}
  if run_provenance is not None:
    record['provenance'] = run_provenance
  if record.get('provenance'):
    record['provenance'] = {**record['provenance'], 'finished': provenance.now()}
  write_json(paths.resolve(workdir) / RESULTS, record)


class TrainTimer:
  """Wall time spent training, over every session of a run, kept in WORKDIR/progress.json.

  `train_seconds` counts the time between log points, evaluations excluded, compilation and
  input included: what the run cost. `train_images_per_second` leaves out each session's first
  interval (compilation), so it is the steady speed. A sweep reads the same file to show a
  running point's progress.
  """

  def __init__(self, workdir: str, num_train_steps: int, global_batch: int,
               run: Dict[str, Any]):
    """`run`: what describes the run beside its time (model, params, steps per epoch...,
    'provenance': this session's `provenance.describe()`)."""
    self.path = paths.resolve(workdir) / PROGRESS
    self.num_train_steps = num_train_steps
    self.global_batch = global_batch
    self.run = run
    self.seconds = self.steady_seconds = 0.0
    self.steady_steps = 0
    saved = read_json(self.path)
    if saved is not None:  # A resumed run: its earlier sessions' time counts.
      self.seconds = float(saved.get('train_seconds', 0.0))
      self.steady_seconds = float(saved.get('steady_seconds', 0.0))
      self.steady_steps = int(saved.get('steady_steps', 0))
    # The code of each earlier session of a resumed run (the latest session's is `run`'s).
    self.earlier_sessions = []
    if saved is not None:
      self.earlier_sessions = list(saved.get('earlier_sessions', []))
      if saved.get('provenance'):
        self.earlier_sessions.append({k: saved['provenance'].get(k) for k in _SESSION_FIELDS})
    self._first_interval = True

  def add(self, step: int, steps: int, seconds: float) -> None:
    """Records `steps` steps that took `seconds` (training only), ending at `step`."""
    self.seconds += seconds
    if not self._first_interval:
      self.steady_seconds += seconds
      self.steady_steps += steps
    self._first_interval = False
    self.write(step)

  def write(self, step: int) -> None:
    """Rewrites progress.json at `step` (also before the first step, to show the run)."""
    write_json(self.path, {'step': step, 'num_train_steps': self.num_train_steps,
                           'steady_steps': self.steady_steps,
                           'steady_seconds': self.steady_seconds, **self.summary(),
                           **self.run,
                           **({'earlier_sessions': self.earlier_sessions}
                              if self.earlier_sessions else {})})

  def summary(self) -> Dict[str, float]:
    steps, seconds = self.steady_steps, self.steady_seconds
    speed = steps * self.global_batch / seconds if seconds > 0 else None
    return {'train_seconds': self.seconds, 'train_images_per_second': speed}
