"""What keeps a long run's work safe: preemption handling and exclusive use of the workdir.

TPU and cluster schedulers preempt with SIGTERM and a grace period: the run saves a checkpoint
at the next step and exits cleanly, and the same command resumes it. Two runs writing to one
workdir would interleave checkpoints and corrupt each other's results, so the lead process holds
the workdir while it runs: a `flock` on a local workdir, a lease object on an object store.
"""

import fcntl
import json
import os
import signal
import socket
import threading
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
from jax._src import distributed as jax_distributed  # Whether the preemption service runs.
from jax.experimental import multihost_utils
import numpy as np

from densenet_jax import paths

# How long a lease object may go without a heartbeat before another run may take the workdir
# over; the holder renews it every quarter of this and stops itself after half of it without
# a renewal, so that it has stopped writing before anyone may take over.
LEASE_SECONDS = float(os.environ.get('DENSENET_JAX_LEASE_SECONDS', '60'))


class Preemption:
  """Tells the training loop when to save and stop because the job is being preempted.

  In a single process, SIGTERM (and SIGINT, Ctrl-C) set a flag. In a multi-process run, JAX's
  preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any host and
  `reached_preemption_sync_point` makes every process agree on the same step, so that all of
  them take part in the same final checkpoint. SIGINT on any host is passed to that service as
  SIGTERM, so that it too stops every host at the same step. Checking costs about 0.2 us a step;
  where the service is off, the processes exchange their flags every step instead (a few ms
  on CPU).
  """

  def __init__(self):
    self._requested: Optional[str] = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    self._service = (self._multiprocess and
                     jax_distributed.global_state.preemption_sync_manager is not None)
    signals = (signal.SIGINT,) if self._service else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self._requested == name and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    self._requested = name
    logging.warning('Received %s: saving a checkpoint at the end of this step, then exiting.',
                    name)
    if self._service:  # The service tells every host, and they agree on the step.
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; the same answer in every process."""
    if not self._multiprocess:
      return self._requested is not None
    if self._service:
      if not multihost_utils.reached_preemption_sync_point(step):
        return False
    else:
      flags = multihost_utils.process_allgather(np.int32(self._requested is not None))
      if not np.any(flags):
        return False
    self._requested = self._requested or 'a signal to another process'
    return True

  @property
  def reason(self) -> Optional[str]:
    return self._requested

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class WorkdirInUseError(RuntimeError):
  """Another run is writing to this workdir."""


def _in_use(workdir: str, holder: str) -> WorkdirInUseError:
  return WorkdirInUseError(
      f'Workdir {workdir} is in use by another run ({holder}). Wait for it to finish, stop it, '
      'or give this run another --workdir.')


class WorkdirLock:
  """Exclusive use of a workdir, held by the lead process while it runs.

  A local workdir: an advisory `flock` on WORKDIR/.lock, which the kernel releases when the
  process dies, even by `kill -9`, so a crashed run never leaves a stale lock behind (local and
  POSIX network filesystems). A `gs://` workdir: a lease object WORKDIR/.lock (`GcsLease`).
  """

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._lease = None
    self.path = os.path.join(workdir, '.lock')
    self._file = None

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return  # The processes of one multi-host run are one run: the lead holds the lock.
    if paths.is_remote(self._workdir):
      self._lease = GcsLease(self._workdir)
      self._lease.acquire()
      return
    f = open(self.path, 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      f.close()
      raise _in_use(os.path.dirname(self.path), holder) from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    self._file = f

  def release(self) -> None:
    if self._lease is not None:
      self._lease.release()
      self._lease = None
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


class GcsLease:
  """A lease on a `gs://` workdir: the object WORKDIR/.lock, with its holder and a heartbeat.

  Object stores have no locks, but they have conditional writes on an object's generation. The
  lease is created only if absent (`ifGenerationMatch=0`), renewed only if still the holder's
  generation, and taken over only by a write conditional on the generation the taker saw, so
  two runs can never both hold it. A holder on this host is judged by its process and its
  heartbeat's age; a holder elsewhere is stale only when the lease's generation has not changed
  for LEASE_SECONDS of the taker's own clock (no clocks are compared across hosts). A holder that cannot renew for half of LEASE_SECONDS, or
  finds its lease taken, exits at once, before anyone may take over: it never writes to a
  workdir it no longer holds. Only the .lock object is ever written or deleted.
  """

  def __init__(self, workdir: str, seconds: Optional[float] = None):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top  (gs:// only)
    if not workdir.startswith('gs://'):
      raise ValueError(f'--workdir={workdir}: object-store workdirs are gs:// only (no lease '
                       'exists for this scheme).')
    bucket, _, prefix = workdir[len('gs://'):].partition('/')
    prefix = prefix.rstrip('/')
    self.workdir = workdir
    self.seconds = seconds or LEASE_SECONDS
    self._blob = storage.Client().bucket(bucket).blob(f'{prefix}/.lock' if prefix else '.lock')
    self._owner = {'holder': f'pid {os.getpid()} on {socket.gethostname()}',
                   'host': socket.gethostname(), 'pid': os.getpid()}
    self._generation: Optional[int] = None
    self._renewed = 0.0
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _write(self, if_generation_match: int) -> None:
    """Writes this run's record; raises PreconditionFailed if the generation differs."""
    record = dict(self._owner, heartbeat=time.time(), lease_seconds=self.seconds)
    self._blob.upload_from_string(json.dumps(record), content_type='application/json',
                                  if_generation_match=if_generation_match)
    self._generation = self._blob.generation
    self._renewed = time.monotonic()

  def _read(self) -> Optional[Tuple[int, Dict[str, Any]]]:
    """(generation, record) of the lease object, or None if there is none."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._blob.bucket.blob(self._blob.name)
    try:
      text = blob.download_as_text()
    except exceptions.NotFound:
      return None
    try:
      record = json.loads(text)
    except ValueError:
      record = {}
    return blob.generation, record

  def _holder_on_this_host(self, record: Dict[str, Any]) -> Optional[bool]:
    """True for a holder of this host that runs and renewed its lease in time (same clock),
    False for one whose process is gone; None otherwise, when only heartbeats can tell."""
    if record.get('host') != socket.gethostname() or not isinstance(record.get('pid'), int):
      return None
    try:
      os.kill(record['pid'], 0)
    except ProcessLookupError:
      return False
    except PermissionError:  # Another user's live process.
      pass
    if time.time() - float(record.get('heartbeat', 0)) < self.seconds:
      return True
    return None  # Running but silent (stopped, or its pid reused): watch it as any other.

  def acquire(self) -> None:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    while True:
      try:
        self._write(if_generation_match=0)
        break
      except exceptions.PreconditionFailed:
        pass
      seen = self._read()
      if seen is None:
        continue  # Released in between: try to create it again.
      generation, record = seen
      live = self._holder_on_this_host(record)
      if live:
        raise _in_use(self.workdir, record.get('holder', 'unknown'))
      if live is None:
        self._wait_for_heartbeat(generation, record)
      try:
        self._write(if_generation_match=generation)
      except exceptions.PreconditionFailed:  # Another run took it first.
        seen = self._read()
        raise _in_use(self.workdir, (seen[1] if seen else record).get('holder', 'unknown')
                      ) from None
      logging.warning('Took over the stale lease of %s (held by %s, no heartbeat).',
                      self.workdir, record.get('holder', 'unknown'))
      break
    self._thread = threading.Thread(target=self._heartbeat, name='workdir-lease', daemon=True)
    self._thread.start()

  def _wait_for_heartbeat(self, generation: int, record: Dict[str, Any]):
    """Watches the lease for LEASE_SECONDS; refuses as soon as its holder renews it."""
    holder = record.get('holder', 'unknown')
    deadline = time.monotonic() + self.seconds
    logging.info('Workdir %s is leased by %s; waiting up to %.0f s for a heartbeat.',
                 self.workdir, holder, self.seconds)
    while time.monotonic() < deadline:
      time.sleep(min(1.0, self.seconds / 8))
      seen = self._read()
      if seen is None or seen[0] != generation:
        raise _in_use(self.workdir, (seen[1] if seen else record).get('holder', holder))

  def _heartbeat(self) -> None:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    while not self._stop.wait(self.seconds / 4):
      try:
        self._write(if_generation_match=self._generation)
      except exceptions.PreconditionFailed:
        self._fence('another run took the lease over')
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Renewing the lease of %s failed (%s: %s).', self.workdir,
                        type(e).__name__, str(e)[:200])
        if time.monotonic() - self._renewed > self.seconds / 2:
          self._fence(f'no renewal for {self.seconds / 2:.0f} s')

  def _fence(self, why: str) -> None:
    """Stops the process now: it may no longer hold the workdir, so it must not write to it."""
    logging.error('Lost the lease of %s (%s): exiting at once, without writing to it again.',
                  self.workdir, why)
    logging.flush()
    os._exit(75)  # pylint: disable=protected-access

  def release(self) -> None:
    """Stops the heartbeat and deletes the lease object if it is still this run's."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    try:
      seen = self._read()
      if seen is not None and seen[0] == self._generation:
        self._blob.bucket.blob(self._blob.name).delete(if_generation_match=self._generation)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not delete the lease %s/.lock (%s); the next run takes it over '
                      'once it is stale.', self.workdir, e)
