"""What keeps a long run's work safe: preemption handling and exclusive use of the workdir.

TPU and cluster schedulers preempt with SIGTERM and a grace period: the run saves a checkpoint
at the next step and exits cleanly, and the same command resumes it. Two runs writing to one
workdir would interleave checkpoints and corrupt each other's results, so the lead process holds
the workdir while it runs: a `flock` on a local workdir, a lease object on an object store.
"""

import fcntl
import os
import signal
import socket
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from densenet_jax.runtime import jax_internals
from densenet_jax.runtime import leases
from densenet_jax.runtime import paths


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
    self._service = self._multiprocess and jax_internals.preemption_service_running()
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


WorkdirInUseError = leases.WorkdirInUseError


class WorkdirLock:
  """Exclusive use of a workdir, held by the lead process while it runs.

  A local workdir: an advisory `flock` on WORKDIR/.lock, which the kernel releases when the
  process dies, even by `kill -9`, so a crashed run never leaves a stale lock behind (local and
  POSIX network filesystems). A `gs://` or `s3://` workdir: a lease object WORKDIR/.lock
  (densenet_jax/runtime/leases.py).
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
      self._lease = leases.Lease(self._workdir)
      self._lease.acquire()
      return
    f = open(self.path, 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      f.close()
      raise leases.in_use(os.path.dirname(self.path), holder) from None
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
