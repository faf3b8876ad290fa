"""Local copies of a sweep's remote files, for the code that can only use local ones.

Two parts of a sweep cannot work on a `gs://` directory directly:

* A point's train.log is the stdout of a subprocess, which writes to a local file descriptor:
  `PointLog` gives it a local cache file and uploads it whole to DIR/<point>/train.log at
  every poll and at the end. The cache starts as a copy of the object, so the log of every
  session of a point stays in it, as a local log is appended to.
* The report reads TensorBoard event files with TensorFlow, on local paths found with glob,
  and writes its table and figures with `open` and matplotlib. `write_report` copies each
  run's small files (JSON and events, never checkpoints) into a local staging directory,
  builds the report there with the unchanged local code, and uploads what it wrote. The
  feature-reuse figure needs a checkpoint: `origin` maps a staged run back to its remote
  directory, which Orbax reads directly.
"""

import contextlib
import os
import re
import shutil
import tempfile
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from absl import logging

from densenet_jax.runtime import paths

LOG = 'train.log'
# Copied for the report: a run's JSON records and TensorBoard event files.
_STAGED = re.compile(r'(.*\.json|events\.out\.tfevents\..*)$')
# Never staged: large or foreign (the report reads neither).
_SKIPPED_DIRS = ('checkpoints', 'submitit')
_DEPTH = 2  # DIR/<point>/ and one level below it (e.g. a point's seeds).

_origins: Dict[str, str] = {}  # Staging root -> the remote directory it copies.
_origins_lock = threading.Lock()


def cache_dir(remote: str) -> str:
  """A local directory named after a remote one, for files that must be local first."""
  name = re.sub(r'[^A-Za-z0-9._=,-]+', '_', remote).strip('_')
  return os.path.join(tempfile.gettempdir(), 'densenet_jax_sweeps', name)


class PointLog:
  """A point's train.log: the file itself when local, else a local cache that is uploaded.

  `local` is where the point's output is appended. `upload` copies it whole to the remote
  object when it changed (an object store replaces an object atomically, so a reader sees
  the log as of the last upload); `close` uploads a last time and removes the cache.
  """

  def __init__(self, point_dir: str, name: str = LOG):
    self.path = os.path.join(point_dir, name)   # As shown to the user.
    self._remote = paths.resolve(self.path) if paths.is_remote(point_dir) else None
    self._uploaded: Optional[Tuple[int, int]] = None
    if self._remote is None:
      self.local = self.path
      return
    self.local = os.path.join(cache_dir(point_dir), name)
    os.makedirs(os.path.dirname(self.local), exist_ok=True)
    try:  # Earlier sessions' output first; a stale cache of a deleted sweep is replaced.
      data = paths.read_bytes(self._remote)
    except FileNotFoundError:
      data = b''
    with open(self.local, 'wb') as f:
      f.write(data)
    self._uploaded = self._stamp()

  def _stamp(self) -> Tuple[int, int]:
    stat = os.stat(self.local)
    return stat.st_size, stat.st_mtime_ns

  def upload(self) -> None:
    """Copies the cache to the remote log if it changed; a failure is logged, not raised (the
    next poll tries again, and the point itself is unaffected)."""
    if self._remote is None or not os.path.exists(self.local):
      return
    stamp = self._stamp()
    if stamp == self._uploaded:
      return
    try:
      with open(self.local, 'rb') as f:
        self._remote.write_bytes(f.read())
      self._uploaded = stamp
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not upload %s (%s: %s); retrying at the next poll.', self.path,
                      type(e).__name__, str(e)[:200])

  def close(self) -> None:
    """Uploads a last time, then removes the local cache (the object holds it all)."""
    if self._remote is None or not os.path.exists(self.local):
      return
    self.upload()
    if self._uploaded == self._stamp():  # Kept if the upload failed: nothing is lost.
      os.remove(self.local)
      with contextlib.suppress(OSError):  # Only if empty (another log of the point may be).
        os.rmdir(os.path.dirname(self.local))


def origin(path: str) -> str:
  """The remote path that a path inside a staging directory copies; other paths unchanged."""
  with _origins_lock:
    roots = dict(_origins)
  for root, remote in roots.items():
    path = origin_of(os.fspath(path), root, remote)
  return path


def _download(remote: paths.Path, local: str, depth: int) -> Dict[str, Tuple[int, int]]:
  """Copies the staged files of `remote` (and of its directories, `depth` levels down) into
  `local`; returns each copy's (size, mtime) to tell later which files the report wrote."""
  copied = {}
  os.makedirs(local, exist_ok=True)
  for child in remote.iterdir():
    target = os.path.join(local, child.name)
    if child.is_dir():
      if depth > 0 and child.name not in _SKIPPED_DIRS:
        copied.update(_download(child, target, depth - 1))
    elif _STAGED.match(child.name):
      with open(target, 'wb') as f:
        f.write(paths.read_bytes(child))
      stat = os.stat(target)
      copied[target] = (stat.st_size, stat.st_mtime_ns)
  return copied


def _upload_written(local: str, remote: paths.Path,
                    copied: Dict[str, Tuple[int, int]]) -> List[str]:
  """Uploads every file under `local` that is new or changed since the download."""
  uploaded = []
  for directory, _, names in os.walk(local):
    for name in sorted(names):
      path = os.path.join(directory, name)
      stat = os.stat(path)
      if copied.get(path) == (stat.st_size, stat.st_mtime_ns):
        continue
      relative = os.path.relpath(path, local).replace(os.sep, '/')
      with open(path, 'rb') as f:
        (remote / relative).write_bytes(f.read())
      uploaded.append(relative)
  return uploaded


@contextlib.contextmanager
def staged(remote_dir: str) -> Iterator[Tuple[str, Dict[str, Tuple[int, int]]]]:
  """A temporary local copy of a remote sweep's small files: (its root, what was copied)."""
  remote = paths.resolve(remote_dir)
  root = tempfile.mkdtemp(prefix='densenet_jax_report_')
  try:
    copied = _download(remote, root, _DEPTH)
    with _origins_lock:
      _origins[root] = paths.display(remote_dir).rstrip('/')
    yield root, copied
  finally:
    with _origins_lock:
      _origins.pop(root, None)
    shutil.rmtree(root, ignore_errors=True)


def write_report(remote_dir: str, write_local: Callable[[str], Dict[str, Any]]
                 ) -> Dict[str, Any]:
  """`write_local` (report.write_report) on a local copy of a remote sweep; what it writes
  (results.csv, report.md, figures, any other file) is uploaded to the remote directory."""
  remote_dir = paths.display(remote_dir).rstrip('/')
  with staged(remote_dir) as (root, copied):
    if not copied:
      raise ValueError(f'{remote_dir} holds no sweep.json and no runs (no JSON records).')
    try:
      written = write_local(root)
    except ValueError as e:  # Its message names the staging directory.
      raise ValueError(str(e).replace(root, remote_dir)) from None
    uploaded = _upload_written(root, paths.resolve(remote_dir), copied)
  logging.info('Report uploaded to %s: %s', remote_dir, ', '.join(uploaded))
  for row in written.get('rows', ()):  # Staged paths are gone now: name the remote runs.
    if isinstance(row.get('_dir'), str):
      row['_dir'] = origin_of(row['_dir'], root, remote_dir)
  return written


def origin_of(path: str, root: str, remote_dir: str) -> str:
  """`path` under the staging root `root`, as the same path under `remote_dir`."""
  if path != root and not path.startswith(root + os.sep):
    return path
  relative = os.path.relpath(path, root).replace(os.sep, '/')
  return remote_dir if relative == '.' else f'{remote_dir}/{relative}'
