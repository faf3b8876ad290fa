"""One file layer for every user path, local or object store (`gs://bucket/run`).

User paths (workdirs, init_checkpoint, the converter's output, folder datasets) go through etils
`epath`, the layer that Orbax and TFDS already use, never through `os.path` or `open`: a
`gs://` workdir used to become the local directory `./gs:/bucket/run`.

Object stores are reached through fsspec (gcsfs for `gs://`, s3fs for `s3://`), not through
TensorFlow's file system, which epath would pick when TensorFlow is importable: TensorFlow's GCS
client has its endpoint compiled in, so it can be neither pointed at an emulator nor tested,
whereas gcsfs, TensorStore (Orbax's array writes) and google-cloud-storage (the workdir lease)
all follow one variable, `STORAGE_EMULATOR_HOST`, as set up below; for `s3://`, s3fs, botocore
(the lease) and TensorStore all read `AWS_ENDPOINT_URL` and the usual AWS variables themselves.
`EPATH_USE_TF=true` restores epath's default.
"""

import json
import logging
import os
from typing import Any, Dict, Optional, Union

# Read by epath on its first remote path: set before anything (Orbax included) makes one.
os.environ.setdefault('EPATH_USE_TF', 'false')


def point_clients_at_emulator() -> None:
  """With $STORAGE_EMULATOR_HOST set (a local GCS emulator), sends every client there.

  gcsfs and google-cloud-storage read the variable themselves; TensorStore has its own
  endpoint variable and wants a token, which an emulator ignores. gcsfs's experimental bucket
  type lookup goes to a gRPC control API that emulators lack: it would only log warnings.
  """
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if not host:
    return
  url = host if '://' in host else f'http://{host}'
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


point_clients_at_emulator()

# pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath
import fsspec

# gcsfs logs each file it opens at INFO level, which absl's handler would print.
logging.getLogger('gcsfs').setLevel(logging.WARNING)
# gcsfs caches directory listings for the life of the process by default, and the arrays of a
# checkpoint are written by TensorStore, which that cache never hears of: a listing made
# before a save would hide the save's files (a run checking for a checkpoint it just wrote).
for _protocol in ('gcs', 's3'):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)

Path = epath.Path
PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """Whether `path` is on an object store (`gs://`, `s3://`, ...), not a local file system."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` as an epath Path; local paths made absolute (a run may change directory)."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def display(path: PathLike) -> str:
  """`path` as the user would type it: 'gs://bucket/run', '/home/me/run'."""
  return os.fspath(path)


def read_bytes(path: PathLike) -> bytes:
  """The contents of `path`, all of one version of it.

  epath's file objects read an object as its size, then ranges of whatever version is current:
  a sweep reading a running point's progress.json while the point replaced it got the new
  version cut at the old one's length (invalid JSON). One GET reads one version whole.
  """
  path = resolve(path)
  if not is_remote(path):
    return path.read_bytes()
  fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
  return fs.cat_file(fs_path)


def read_json(path: PathLike) -> Optional[Dict[str, Any]]:
  """The JSON object in `path`, or None if there is no such file."""
  try:
    return json.loads(read_bytes(path))
  except FileNotFoundError:
    return None


def write_json(path: PathLike, record: Dict[str, Any]) -> None:
  """Writes `record` to `path` whole or not at all.

  An object store replaces an object atomically on upload; a local file is written beside and
  renamed over the old one, so a reader never sees half a file.
  """
  path = resolve(path)
  text = json.dumps(record, indent=2, default=str)
  if is_remote(path):
    path.write_text(text)
  else:
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)
