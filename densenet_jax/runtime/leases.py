"""The lease on an object-store workdir (`gs://`, `s3://`): the object WORKDIR/.lock.

Object stores have no locks, but they have conditional writes: on an object's generation in
GCS (`ifGenerationMatch`), on its ETag in S3 (`If-None-Match: *`, `If-Match`). The lease is
created only if absent, renewed only if still the holder's version, and taken over only by a
write conditional on the version the taker saw, so two runs can never both hold it. A holder
on this host is judged by its process and its heartbeat's age; a holder elsewhere is stale
only when the lease's version has not changed for LEASE_SECONDS of the taker's own clock (no
clocks are compared across hosts). A holder that cannot renew for half of LEASE_SECONDS, or
finds its lease taken, exits at once, before anyone may take over.

A holder frozen whole for longer than the lease (a VM paused for live migration, a process
stopped in a debugger) can be taken over while it cannot notice. So every write that matters
(a checkpoint, results.json, progress.json, TensorBoard events) first calls `check_held`,
which reads the lease's version and stops the process if it is no longer this run's. Only the
.lock object is ever written or deleted here.
"""

import json
import os
import socket
import threading
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging

from densenet_jax.runtime import buckets

# How long a lease object may go without a heartbeat before another run may take the workdir
# over; the holder renews it every quarter of this and stops itself after half of it without
# a renewal, so that it has stopped writing before anyone may take over.
LEASE_SECONDS = float(os.environ.get('DENSENET_JAX_LEASE_SECONDS', '60'))

_held: Optional['Lease'] = None  # This process's lease, checked before each write.


class WorkdirInUseError(RuntimeError):
  """Another run is writing to this workdir."""


def in_use(workdir: str, holder: str) -> WorkdirInUseError:
  return WorkdirInUseError(
      f'Workdir {workdir} is in use by another run ({holder}). Wait for it to finish, stop it, '
      'or give this run another --workdir.')


class Conflict(Exception):
  """A conditional write or delete found another version of the lease object."""


class _GcsObject:
  """WORKDIR/.lock through google-cloud-storage; its version is the object's generation."""

  def __init__(self, bucket: str, key: str):
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    self._bucket = storage.Client().bucket(bucket)
    self._key = key

  def write(self, text: str, version: Optional[int]) -> int:
    """Writes if the object is at `version` (None: absent); returns the new version."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._bucket.blob(self._key)
    try:
      blob.upload_from_string(text, content_type='application/json',
                              if_generation_match=version or 0)
    except exceptions.PreconditionFailed:
      raise Conflict() from None
    return blob.generation

  def read(self) -> Optional[Tuple[int, str]]:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._bucket.blob(self._key)
    try:
      text = blob.download_as_text()
    except exceptions.NotFound:
      return None
    return blob.generation, text  # The generation of the version downloaded.

  def version(self) -> Optional[int]:
    blob = self._bucket.get_blob(self._key)
    return None if blob is None else blob.generation

  def delete(self, version: int) -> None:
    self._bucket.blob(self._key).delete(if_generation_match=version)


class _S3Object:
  """WORKDIR/.lock through botocore; its version is the object's ETag."""

  def __init__(self, bucket: str, key: str):
    self._client = buckets.s3_client()
    self._where = {'Bucket': bucket, 'Key': key}

  def _conflict(self, error) -> bool:
    code = error.response.get('Error', {}).get('Code', '')
    return code in ('PreconditionFailed', 'ConditionalRequestConflict', '412', '409')

  def write(self, text: str, version: Optional[str]) -> str:
    from botocore import exceptions  # pylint: disable=g-import-not-at-top
    condition = {'IfMatch': version} if version else {'IfNoneMatch': '*'}
    try:
      return self._client.put_object(Body=text.encode(), ContentType='application/json',
                                     **self._where, **condition)['ETag']
    except exceptions.ClientError as e:
      if self._conflict(e):
        raise Conflict() from None
      raise

  def read(self) -> Optional[Tuple[str, str]]:
    try:
      response = self._client.get_object(**self._where)
    except self._client.exceptions.NoSuchKey:
      return None
    return response['ETag'], response['Body'].read().decode()

  def version(self) -> Optional[str]:
    from botocore import exceptions  # pylint: disable=g-import-not-at-top
    try:
      return self._client.head_object(**self._where)['ETag']
    except exceptions.ClientError as e:
      if e.response.get('ResponseMetadata', {}).get('HTTPStatusCode') == 404:
        return None
      raise

  def delete(self, version: str) -> None:
    self._client.delete_object(IfMatch=version, **self._where)


def check_held() -> None:
  """Before a write that matters: stops the process, writing nothing, if its lease was lost.

  A no-op without a lease (a local workdir, or a process other than the lead of a
  multi-host run: the lead's exit stops the others, coordination.py).
  """
  if _held is not None:
    _held.check()


class Lease:
  """The lease on an object-store workdir: WORKDIR/.lock, with its holder and a heartbeat."""

  def __init__(self, workdir: str, seconds: Optional[float] = None):
    scheme, _, rest = workdir.partition('://')
    bucket, _, prefix = rest.partition('/')
    prefix = prefix.rstrip('/')
    key = f'{prefix}/.lock' if prefix else '.lock'
    if scheme == 'gs':
      self._object = _GcsObject(bucket, key)
    elif scheme == 's3':
      self._object = _S3Object(bucket, key)
    else:
      raise ValueError(f'--workdir={workdir}: object-store workdirs are gs:// or s3:// (no '
                       'lease exists for this scheme).')
    self.workdir = workdir
    self.seconds = seconds or LEASE_SECONDS
    self._owner = {'holder': f'pid {os.getpid()} on {socket.gethostname()}',
                   'host': socket.gethostname(), 'pid': os.getpid()}
    self._version = None
    self._renewed = 0.0
    self._writing = threading.Lock()  # A check never sees a renewal half done.
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _write(self, version) -> None:
    """Writes this run's record if the lease is at `version` (None: absent), or Conflict."""
    record = dict(self._owner, heartbeat=time.time(), lease_seconds=self.seconds)
    with self._writing:
      self._version = self._object.write(json.dumps(record), version)
      self._renewed = time.monotonic()

  def _read(self) -> Optional[Tuple[Any, Dict[str, Any]]]:
    """(version, record) of the lease object, or None if there is none."""
    seen = self._object.read()
    if seen is None:
      return None
    try:
      record = json.loads(seen[1])
    except ValueError:
      record = {}
    return seen[0], record

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
    global _held
    while True:
      try:
        self._write(None)
        break
      except Conflict:
        pass
      seen = self._read()
      if seen is None:
        continue  # Released in between: try to create it again.
      version, record = seen
      live = self._holder_on_this_host(record)
      if live:
        raise in_use(self.workdir, record.get('holder', 'unknown'))
      if live is None:
        self._wait_for_heartbeat(version, record)
      try:
        self._write(version)
      except Conflict:  # Another run took it first.
        seen = self._read()
        raise in_use(self.workdir, (seen[1] if seen else record).get('holder', 'unknown')
                     ) from None
      logging.warning('Took over the stale lease of %s (held by %s, no heartbeat).',
                      self.workdir, record.get('holder', 'unknown'))
      break
    self._thread = threading.Thread(target=self._heartbeat, name='workdir-lease', daemon=True)
    self._thread.start()
    _held = self

  def _wait_for_heartbeat(self, version, record: Dict[str, Any]):
    """Watches the lease for LEASE_SECONDS; refuses as soon as its holder renews it."""
    holder = record.get('holder', 'unknown')
    deadline = time.monotonic() + self.seconds
    logging.info('Workdir %s is leased by %s; waiting up to %.0f s for a heartbeat.',
                 self.workdir, holder, self.seconds)
    while time.monotonic() < deadline:
      time.sleep(min(1.0, self.seconds / 8))
      seen = self._read()
      if seen is None or seen[0] != version:
        raise in_use(self.workdir, (seen[1] if seen else record).get('holder', holder))

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.seconds / 4):
      try:
        self._write(self._version)
      except Conflict:
        self._fence('another run took the lease over')
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Renewing the lease of %s failed (%s: %s).', self.workdir,
                        type(e).__name__, str(e)[:200])
        if time.monotonic() - self._renewed > self.seconds / 2:
          self._fence(f'no renewal for {self.seconds / 2:.0f} s')

  def check(self) -> None:
    """Stops the process at once if the lease object is no longer this run's version."""
    with self._writing:
      try:
        version = self._object.version()
      except Exception as e:  # pylint: disable=broad-except  (the write would fail as well)
        if time.monotonic() - self._renewed > self.seconds / 2:
          self._fence(f'no renewal for {self.seconds / 2:.0f} s, and {type(e).__name__}')
        return
      if version != self._version:
        self._fence('another run took the lease over while this one was stopped')

  def _fence(self, why: str) -> None:
    """Stops the process now: it may no longer hold the workdir, so it must not write to it."""
    logging.error('Lost the lease of %s (%s): exiting at once, without writing to it again.',
                  self.workdir, why)
    logging.flush()
    os._exit(75)  # pylint: disable=protected-access

  def release(self) -> None:
    """Stops the heartbeat and deletes the lease object if it is still this run's."""
    global _held
    if self._thread is None:
      return
    _held = None if _held is self else _held
    self._stop.set()
    self._thread.join()
    self._thread = None
    try:
      # Checked first as well: fake-gcs-server ignores the precondition on DELETE.
      if self._object.version() == self._version:
        self._object.delete(self._version)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not delete the lease %s/.lock (%s); the next run takes it over '
                      'once it is stale.', self.workdir, e)
