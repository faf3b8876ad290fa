"""A local S3 emulator for the tests: moto's server mode (`moto[server]` on PyPI), in memory.

moto honours S3's conditional writes (`If-None-Match: *` and `If-Match: ETAG` on PutObject and
DeleteObject), which the workdir lease relies on. Every client of the package (botocore, s3fs,
TensorStore) reaches it through $AWS_ENDPOINT_URL, with fake credentials.
"""

import os
import subprocess
import sys

from densenet_jax.runtime import buckets
import gcs_emulator

BUCKET = 'densenet-test'
# What the emulator needs set, in this process and the runs it starts.
ENV = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
       'AWS_REGION': 'us-east-1', 'AWS_DEFAULT_REGION': 'us-east-1',
       'AWS_EC2_METADATA_DISABLED': 'true'}  # Never ask a cloud's metadata server.


class Emulator:
  """moto's S3 server on a free local port, with one bucket, BUCKET."""

  def __init__(self, log_path: str):
    self.port = gcs_emulator._free_port()  # pylint: disable=protected-access
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = open(log_path, 'w')
    self._process = subprocess.Popen(
        [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(self.port)],
        stdout=self._log, stderr=subprocess.STDOUT)
    gcs_emulator.wait_until_up(self, f'{self.url}/moto-api/', 60, 'moto', log_path)
    variables = dict(ENV, AWS_ENDPOINT_URL=self.url)
    self._saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    buckets.s3_client().create_bucket(Bucket=BUCKET)

  # The same attributes as the GCS emulator's (_saved, _process, _log): the same stop.
  stop = gcs_emulator.Emulator.stop
