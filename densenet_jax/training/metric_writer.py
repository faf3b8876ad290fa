"""The run's metric writer: the console plus TensorBoard event files in the workdir.

clu's TensorBoard writer goes through TensorFlow's file system, whose GCS client cannot be
pointed at anything but Google's endpoint (see paths.py). For an object-store workdir the
events are therefore written to a local directory and each event file is uploaded whole,
through the package's file layer, after every write: the workdir holds every metric written
up to the last one, also after a `kill -9`, and the upload is tested against an emulator.
"""

import atexit
import os
import shutil
import tempfile
from typing import Any, Dict

from clu import metric_writers

from densenet_jax.runtime import leases
from densenet_jax.runtime import paths


def create(workdir: str, *, just_logging: bool) -> metric_writers.MetricWriter:
  """clu's default writer on WORKDIR; for a remote workdir, one that uploads its events."""
  if just_logging or not paths.is_remote(workdir):
    return metric_writers.create_default_writer(workdir, just_logging=just_logging)
  return _UploadingWriter(workdir)


class _UploadingWriter(metric_writers.MetricWriter):
  """clu's default writer on a local directory, whose event files are copied to a remote one."""

  def __init__(self, workdir: str):
    self._local = tempfile.mkdtemp(prefix='densenet_jax_events_')
    atexit.register(shutil.rmtree, self._local, True)  # The trainer flushes, never closes.
    self._target = paths.resolve(workdir)
    self._writer = metric_writers.create_default_writer(self._local, asynchronous=False)
    self._uploaded: Dict[str, int] = {}

  def _upload(self) -> None:
    self._writer.flush()
    for name in sorted(os.listdir(self._local)):
      local = os.path.join(self._local, name)
      size = os.path.getsize(local)
      if self._uploaded.get(name) != size:
        leases.check_held()
        with open(local, 'rb') as f:
          (self._target / name).write_bytes(f.read())
        self._uploaded[name] = size

  def _written(self, method: str, *args: Any, **kwargs: Any) -> None:
    getattr(self._writer, method)(*args, **kwargs)
    self._upload()

  def write_summaries(self, step, values, metadata=None):
    self._written('write_summaries', step, values, metadata)

  def write_scalars(self, step, scalars):
    self._written('write_scalars', step, scalars)

  def write_images(self, step, images):
    self._written('write_images', step, images)

  def write_videos(self, step, videos):
    self._written('write_videos', step, videos)

  def write_audios(self, step, audios, *, sample_rate):
    self._written('write_audios', step, audios, sample_rate=sample_rate)

  def write_texts(self, step, texts):
    self._written('write_texts', step, texts)

  def write_histograms(self, step, arrays, num_buckets=None):
    self._written('write_histograms', step, arrays, num_buckets)

  def write_hparams(self, hparams):
    self._written('write_hparams', hparams)

  def flush(self):
    self._upload()

  def close(self):
    self._upload()
    self._writer.close()
    shutil.rmtree(self._local, ignore_errors=True)
