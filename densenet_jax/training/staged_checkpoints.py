"""Checkpoints of workdirs that Orbax cannot write (s3://): written locally, then uploaded.

orbax-checkpoint 0.12.8 writes local paths and gs:// only (checkpointing.ORBAX_SCHEMES). For
any other object store, `StagedCheckpointer` lets Orbax write each step to a local staging
directory, $TMPDIR/densenet_jax_checkpoints/<hash of the workdir>/save, and uploads a finished
step through the file layer (fsspec: s3fs for s3://) to WORKDIR/checkpoints/<step>/, with
`commit_success.txt` written last: the commit file Orbax itself writes on gs://, so a step's
layout is the same on both stores. A step without it is never restored (a kill -9 in the middle
of an upload leaves one; the next run overwrites it when it saves that step again), and nothing
committed is deleted except the steps beyond `keep`, after a newer one is committed.

Saves stay asynchronous: Orbax writes step N in the background while training goes on, and
step N is uploaded when step N+1 is saved (after waiting for N's write, usually long finished)
or at close. Uploading in the save itself would stall training for the whole local write as
well; the price is that a kill loses the step not yet uploaded, one save interval more.

Restoring lists the committed steps in the bucket, downloads the one tried into
.../restore/<step> and lets Orbax read it there, so checkpointing.Checkpointer's fallback past
a damaged step works unchanged. The lease is checked before every upload, and the staging
directory is emptied at start (the lease makes this run its only user) and removed at close.
"""

import hashlib
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import fsspec

from densenet_jax.runtime import leases
from densenet_jax.runtime import paths
from densenet_jax.training import checkpointing

COMMITTED = 'commit_success.txt'  # Written last into each uploaded step.


def staging_dir(remote: str) -> str:
  """The local directory where checkpoints of `remote` are staged (one per remote path)."""
  digest = hashlib.sha256(paths.display(remote).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), 'densenet_jax_checkpoints', digest)


def _fs(remote: str) -> Tuple[fsspec.AbstractFileSystem, str]:
  return fsspec.core.url_to_fs(paths.display(remote))


def upload_tree(local: str, remote: str, marker: Optional[str] = None) -> None:
  """Copies the files under `local` to `remote`, after removing what `remote` held, and
  writes `marker` (an empty object) last if given: present means complete. A local file of
  that name is not copied in the walk (Orbax writes commit_success.txt locally too, and it
  came first, so a step killed mid-upload read as committed)."""
  fs, root = _fs(remote)
  if marker and fs.exists(f'{root}/{marker}'):
    fs.rm_file(f'{root}/{marker}')  # Uncommitted first: a half-replaced step is never read.
  if fs.exists(root):
    fs.rm(root, recursive=True)
  for directory, _, files in os.walk(local):
    for name in files:
      path = os.path.join(directory, name)
      if os.path.relpath(path, local) != marker:
        fs.put_file(path, f'{root}/{os.path.relpath(path, local)}')
  if marker:
    fs.pipe_file(f'{root}/{marker}', b'')


def download_tree(remote: str, local: str) -> str:
  """Copies the objects under `remote` into the directory `local`, whole or not at all (they
  land beside it and are renamed into place). Returns `local`."""
  fs, root = _fs(remote)
  partial = local + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  keys = fs.find(root)
  if not keys:
    raise FileNotFoundError(f'{paths.display(remote)}: nothing to download.')
  for key in keys:
    relative = os.path.relpath(key, root)
    os.makedirs(os.path.dirname(os.path.join(partial, relative)), exist_ok=True)
    fs.get_file(key, os.path.join(partial, relative))
  shutil.rmtree(local, ignore_errors=True)
  os.replace(partial, local)
  return local


def committed_steps(checkpoints: str) -> List[int]:
  """The steps under the remote `checkpoints` directory that hold their commit file."""
  fs, root = _fs(checkpoints)
  if not fs.exists(root):
    return []
  steps = [int(os.path.basename(p.rstrip('/'))) for p in fs.ls(root, detail=False)
           if os.path.basename(p.rstrip('/')).isdigit()]
  return sorted(s for s in steps if fs.exists(f'{root}/{s}/{COMMITTED}'))


def local_copy(workdir: str, destination: str, step: Optional[int] = None) -> str:
  """Downloads committed step `step` (default: the latest) of a staged workdir into
  `destination`, for code that reads a checkpoint with Orbax directly (feature_reuse).

  Returns:
    The step's local directory (DESTINATION/<step>).
  """
  checkpoints = f'{paths.display(workdir).rstrip("/")}/checkpoints'
  steps = committed_steps(checkpoints)
  if step is None and steps:
    step = steps[-1]
  if step not in steps:
    raise FileNotFoundError(f'{checkpoints}: no committed checkpoint to read weights from.')
  return download_tree(f'{checkpoints}/{step}', os.path.join(destination, str(step)))


class StagedCheckpointer(checkpointing.Checkpointer):
  """checkpointing.Checkpointer for a workdir that Orbax cannot write, through local staging."""

  def __init__(self, workdir: str, *, keep: int, asynchronous: bool = True):
    self._staging = staging_dir(workdir)
    shutil.rmtree(self._staging, ignore_errors=True)  # Left by a killed run of this workdir.
    self._bucket_keep = keep
    self._pending: Optional[int] = None  # Saved locally, not uploaded yet.
    # Locally only the step being written and the one awaiting upload are needed.
    super().__init__(workdir, keep=1, asynchronous=asynchronous)

  def _orbax_directories(self) -> Tuple[Any, Any]:
    return (paths.resolve(os.path.join(self._staging, 'save')),
            paths.resolve(os.path.join(self._staging, 'restore')))

  def _remote(self, step: int) -> str:
    return f'{paths.display(self.directory)}/{step}'

  def all_steps(self) -> List[int]:
    return committed_steps(paths.display(self.directory))

  def _fetch(self, step: int) -> None:
    """Downloads committed `step` for Orbax to read, once per run (again after a failure)."""
    local = os.path.join(os.fspath(self._read_directory), str(step))
    if not os.path.isdir(local):
      download_tree(self._remote(step), local)
      self._reader().reload()

  def restore(self, abstract_state: Any, step: int) -> Tuple[Any, Dict, Dict]:
    self._fetch(step)
    return super().restore(abstract_state, step)

  def read_run_info(self, step: int) -> Dict[str, Any]:
    self._fetch(step)
    return super().read_run_info(step)

  def save(self, step: int, state: Any, input_position: Dict[str, int],
           run_info: Dict[str, Any]) -> None:
    """Uploads the previous step (its write has finished by now), then starts saving `step`."""
    self._upload_pending()
    super().save(step, state, input_position, run_info)
    self._pending = step

  def _upload_pending(self) -> None:
    if self._manager is None or self._pending is None:
      return
    self._manager.wait_until_finished()
    step, self._pending = self._pending, None
    local = os.path.join(os.fspath(self._write_directory), str(step))
    leases.check_held()  # A run that lost its lease exits here, uploading nothing.
    upload_tree(local, self._remote(step), marker=COMMITTED)
    logging.info('Uploaded checkpoint of step %d to %s', step, self._remote(step))
    for old in committed_steps(paths.display(self.directory))[:-self._bucket_keep]:
      if old < step:  # Only ever older than the step just committed.
        self._delete(old)

  def _delete(self, step: int) -> None:
    fs, root = _fs(self._remote(step))
    fs.rm_file(f'{root}/{COMMITTED}')  # Uncommitted first: never half a committed step.
    fs.rm(root, recursive=True)

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves a damaged committed step to WORKDIR/checkpoints_corrupt (S3 has no rename: its
    commit file goes first, so a partial move leaves an uncommitted step, never restored)."""
    target = f'{paths.display(self.workdir)}/checkpoints_corrupt/{step}'
    logging.warning('Checkpoint %d in %s is unreadable (%s: %s) while an older one restores; '
                    'moving it to %s.', step, self.directory,
                    type(error).__name__, str(error)[:500], target)
    fs, root = _fs(self._remote(step))
    fs.rm_file(f'{root}/{COMMITTED}')
    _, target_root = _fs(target)
    for key in fs.find(root):
      fs.copy(key, f'{target_root}/{os.path.relpath(key, root)}')
    fs.rm(root, recursive=True)
    shutil.rmtree(os.path.join(os.fspath(self._read_directory), str(step)), ignore_errors=True)
    self.reload()

  def wait_until_finished(self) -> None:
    self._upload_pending()
    super().wait_until_finished()

  def close(self) -> None:
    """Uploads the last step (also when the run is failing: it is a good state) and removes
    the staging directory."""
    try:
      self._upload_pending()
    finally:
      super().close()
      shutil.rmtree(self._staging, ignore_errors=True)


def checkpointer_for(workdir: str, *, keep: int, asynchronous: bool = True
                     ) -> checkpointing.Checkpointer:
  """The checkpointer for `workdir`: the one place that picks Orbax directly or staging."""
  if checkpointing.orbax_writes_directly(workdir):
    return checkpointing.Checkpointer(workdir, keep=keep, asynchronous=asynchronous)
  return StagedCheckpointer(workdir, keep=keep, asynchronous=asynchronous)
