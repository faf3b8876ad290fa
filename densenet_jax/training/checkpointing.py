"""Orbax checkpoints of the whole train state and the input position, under WORKDIR/checkpoints.

One checkpoint is one step: the train state (step, params, batch statistics, optimizer state,
RNG) saved and restored as a unit, beside two small JSON records: where the input pipeline stood
(epoch and batches already consumed in it), so that a resumed run continues with the very next
batch, and the run's model description, so that a workdir is never resumed with another model.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed in the middle of a write leaves the previous checkpoint as the latest one, and it deletes
checkpoints beyond `keep` only after a newer one is complete. Orbax writes local and gs://
workdirs itself; others (s3://) get the same interface through local staging and uploads
(densenet_jax/training/staged_checkpoints.py, whose `checkpointer_for` picks one).

Restoring tells failures apart. A read that fails is retried with backoff; one that still fails
with an I/O error of the transient kind (a timeout, EIO, a dropped connection) stops the run
loudly and moves nothing. A checkpoint that fails otherwise (a truncated file, values that are
not finite) is damaged only if an older checkpoint of the same run then restores: only then is
it moved aside to WORKDIR/checkpoints_corrupt, with a warning, and the older one used. When no
checkpoint restores, nothing is moved and the run stops with the errors.
"""

import errno
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from densenet_jax.runtime import leases
from densenet_jax.runtime import paths

_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.ECONNRESET,
                     errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE}
RETRY_SECONDS = (1.0, 4.0)  # Backoff between the attempts of a failing read.


# Schemes whose paths Orbax 0.12.8 writes itself ('' is a local path). It special-cases gs://
# where an object store differs from a disk and treats any other URL as a local path: its
# TensorStore spec builder turns `s3://b` into `s3:/b`, and it commits a step by renaming a
# temporary directory, which S3 cannot do. Checkpoints of other schemes are written by Orbax
# to a local staging directory and uploaded (densenet_jax/training/staged_checkpoints.py).
ORBAX_SCHEMES = ('', 'gs')


def orbax_writes_directly(path: str) -> bool:
  """Whether Orbax reads and writes checkpoints under `path` itself, or through staging."""
  path = str(path)
  return (path.partition('://')[0] if '://' in path else '') in ORBAX_SCHEMES


def unsupported(workdir: str) -> Optional[str]:
  """Why checkpoints cannot be written under `workdir`, or None: said at start-up, in one line.

  A staged checkpoint is written by each process to its own local directory, while Orbax
  assembles a multi-process checkpoint in one shared directory: staging is single-process.
  """
  if not orbax_writes_directly(workdir) and jax.process_count() > 1:
    return (f'checkpoints on {str(workdir).partition("://")[0]}:// are staged locally by one '
            f'process (orbax-checkpoint {ocp.__version__} writes gs:// and local paths only), '
            f'and this run has {jax.process_count()} processes; use a gs:// or shared '
            'local workdir')
  return None


class RestoreError(RuntimeError):
  """Checkpoints exist but cannot be read now; nothing was moved."""


def is_transient(error: BaseException) -> bool:
  """Whether `error` (or what caused it) is an I/O failure that may pass: retry, never move."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (TimeoutError, ConnectionError)):
      return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
      return True
    error = error.__cause__ or error.__context__
  return False


def _with_retries(read: Callable[[], Any], what: str) -> Any:
  """`read()`, tried again after each backoff in RETRY_SECONDS while it fails."""
  for delay in RETRY_SECONDS + (None,):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      if delay is None:
        raise
      logging.warning('Reading %s failed (%s: %s); retrying in %.0f s.', what,
                      type(e).__name__, str(e)[:300], delay)
      time.sleep(delay)


class Checkpointer:
  """Asynchronous, keep-N checkpoints of one run, with fallback past damaged ones."""

  def __init__(self, workdir: str, *, keep: int, asynchronous: bool = True):
    self.workdir = paths.resolve(workdir)  # Local or gs://: Orbax takes epath Paths.
    self.directory = self.workdir / 'checkpoints'
    self._write_directory, self._read_directory = self._orbax_directories()
    self._keep = keep
    self._asynchronous = asynchronous
    self._manager = self._open()
    self._reading = None

  def _orbax_directories(self) -> Tuple[Any, Any]:
    """Where Orbax writes steps and reads them: the workdir's own, unless staged (subclass)."""
    return self.directory, self.directory

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep,
        create=True,
        enable_async_checkpointing=self._asynchronous,
    )
    return ocp.CheckpointManager(self._write_directory, options=options,
                                 item_names=('state', 'input', 'run'))

  def _reader(self) -> ocp.CheckpointManager:
    """A manager that reads in this process alone, with none of Orbax's barriers between
    processes: in a multi-process run process 0 picks the checkpoint while the others wait
    (densenet_jax/runtime/coordination.py), then they read it."""
    if self._reading is None:
      me = jax.process_index()
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=me, active_processes={me}))
      self._reading = ocp.CheckpointManager(self._read_directory, options=options,
                                            item_names=('state', 'input', 'run'))
    return self._reading

  def reload(self) -> None:
    """Lists the checkpoints again (another process may have moved one aside)."""
    self._manager.reload()
    self._reader().reload()

  def all_steps(self):
    return sorted(self._reader().all_steps())

  def save(self, step: int, state: Any, input_position: Dict[str, int],
           run_info: Dict[str, Any]) -> None:
    """Starts saving `state` at `step`; the write completes in the background."""
    leases.check_held()  # Only the lead holds the lease; the others wait for it in Orbax.
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            input=ocp.args.JsonSave(input_position),
            run=ocp.args.JsonSave(run_info),
        ),
        force=True,
    )

  def restore(self, abstract_state: Any, step: int) -> Tuple[Any, Dict, Dict]:
    """Restores the checkpoint at `step` onto `abstract_state`'s structure and shardings.

    Returns:
      (state, input_position, run_info).

    Raises:
      ValueError: if the checkpoint cannot be read or holds non-finite values.
    """
    restored = self._reader().restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            input=ocp.args.JsonRestore(),
            run=ocp.args.JsonRestore(),
        ),
    )
    state = restored['state']
    finite = all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(
        jax.device_get((state.params, state.batch_stats))))
    if not finite:
      raise ValueError('non-finite parameters or batch statistics')
    return state, dict(restored['input']), dict(restored['run'])

  def read_run_info(self, step: int) -> Dict[str, Any]:
    """The run description saved with `step` (cheap: no arrays are read)."""
    restored = self._reader().restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))
    return dict(restored['run'])

  def restore_latest_good(self, abstract_state: Any,
                          check_run_info: Callable[[Dict[str, Any]], None]
                          ) -> Optional[Tuple[Any, Dict, Dict, int]]:
    """Restores the newest readable checkpoint, moving damaged newer ones aside.

    Args:
      abstract_state: structure, dtypes and shardings of the state to restore.
      check_run_info: called with each candidate's run description before any array is read;
        it raises if the checkpoint belongs to another run (a model that differs would
        otherwise look like a damaged checkpoint), and that error propagates untouched.

    Returns:
      (state, input_position, run_info, step), or None when the workdir has no checkpoint.

    Raises:
      RestoreError: a transient I/O error outlasted the retries, or no checkpoint restores;
        nothing was moved.
    """
    steps = list(reversed(self.all_steps()))
    failed: List[Tuple[int, Exception]] = []
    for step in steps:
      try:
        run_info = _with_retries(lambda: self.read_run_info(step), f'checkpoint {step}')
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, self._not_transient(step, e)))
        continue
      check_run_info(run_info)  # Another model or optimizer: refused, never taken for damage.
      try:
        state, position, run_info = _with_retries(
            lambda: self.restore(abstract_state, step), f'checkpoint {step}')
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and TensorStore raise many types for a damaged checkpoint.
        failed.append((step, self._not_transient(step, e)))
        continue
      # An older checkpoint of this run restores: the newer ones that failed are damaged.
      for bad_step, error in failed:
        self._quarantine(bad_step, error)
      logging.info('Restored checkpoint of step %d from %s', step, self.directory)
      return state, position, run_info, step
    if failed:
      errors = '; '.join(f'{s}: {type(e).__name__}: {str(e)[:200]}' for s, e in failed)
      raise RestoreError(f'No checkpoint in {self.directory} can be restored ({errors}). '
                         'Nothing was moved.')
    return None

  def restore_step(self, abstract_state: Any, step: int,
                   check_run_info: Callable[[Dict[str, Any]], None]
                   ) -> Tuple[Any, Dict, Dict, int]:
    """Restores exactly `step` (the one process 0 chose), retrying a failing read.

    Returns:
      (state, input_position, run_info, step), as restore_latest_good.
    """
    self.reload()
    check_run_info(_with_retries(lambda: self.read_run_info(step), f'checkpoint {step}'))
    state, position, run_info = _with_retries(lambda: self.restore(abstract_state, step),
                                              f'checkpoint {step}')
    logging.info('Restored checkpoint of step %d from %s', step, self.directory)
    return state, position, run_info, step

  def _not_transient(self, step: int, error: Exception) -> Exception:
    """`error`, unless it is a transient I/O error: then the run stops (RestoreError)."""
    if is_transient(error):
      raise RestoreError(
          f'Checkpoint {step} in {self.directory} could not be read ({type(error).__name__}: '
          f'{error}); the storage may be unavailable. Nothing was moved: rerun when it is '
          'back.') from error
    return error

  def _quarantine(self, step: int, error: Exception) -> None:
    target = self.workdir / 'checkpoints_corrupt' / f'{step}-{int(time.time())}'
    logging.warning('Checkpoint %d in %s is unreadable (%s: %s) while an older one restores; '
                    'moving it to %s.', step, self.directory,
                    type(error).__name__, str(error)[:500], target)
    # Only process 0 decides what to restore (coordination.py): the others reload after it.
    target.parent.mkdir(parents=True, exist_ok=True)
    (self.directory / str(step)).rename(target)
    self.reload()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes (also when the run is failing: they are good states) and closes."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
    if self._reading is not None:
      self._reading.close()
      self._reading = None
