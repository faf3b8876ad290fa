"""Buckets at their edges: one line when a bucket cannot be used, and a lease that a thawed
holder cannot outrun (gs:// on fake-gcs-server, s3:// on moto)."""

import os
import signal
import subprocess
import time

from botocore import exceptions as s3_errors
from google import auth
from google.api_core import exceptions as gcs_errors
import pytest

from densenet_jax import buckets
from densenet_jax import paths
import gcs_emulator
from test_training import train_py


def closed_port_url():
  return f'http://127.0.0.1:{gcs_emulator._free_port()}'  # pylint: disable=protected-access


def test_a_missing_bucket_is_one_line_and_writes_nothing(bucket):
  """train.py on a bucket that does not exist: exit 1 with one line, before anything starts."""
  workdir = 'gs://no-such-bucket-here/run'
  proc = train_py(workdir, stderr=subprocess.PIPE)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 1, out + err
  assert err.strip().splitlines()[-1] == (
      f"Workdir {workdir}: bucket 'no-such-bucket-here' does not exist."), err[-3000:]
  assert 'Traceback' not in out + err
  assert not os.path.exists(os.path.join(gcs_emulator.ROOT, 'gs:'))
  with pytest.raises(buckets.BucketError, match='does not exist'):  # Still none created.
    buckets.check(workdir)


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_each_cause_is_named(scheme, request, monkeypatch):
  root = request.getfixturevalue('bucket' if scheme == 'gs' else 's3_bucket')
  buckets.check(f'{root}/run')  # The emulator's bucket is usable.
  with pytest.raises(buckets.BucketError,
                     match=f"^Workdir {scheme}://nope-bucket/run: bucket 'nope-bucket' does "
                           r'not exist\.$'):
    buckets.check(f'{scheme}://nope-bucket/run')
  url = closed_port_url()
  monkeypatch.setenv('STORAGE_EMULATOR_HOST' if scheme == 'gs' else 'AWS_ENDPOINT_URL', url)
  with pytest.raises(buckets.BucketError,
                     match=f'^Workdir {root}/run: cannot reach {url} \\(.*Error\\)\\.$'):
    buckets.check(f'{root}/run')
  if scheme == 's3':  # No credentials anywhere (and no metadata server asked).
    for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_PROFILE'):
      monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', os.devnull)
    monkeypatch.setenv('AWS_CONFIG_FILE', os.devnull)
    with pytest.raises(buckets.BucketError, match='no AWS credentials found'):
      buckets.check(f'{root}/run')


def s3_error(code, status):
  return s3_errors.ClientError({'Error': {'Code': code, 'Message': 'm'},
                                'ResponseMetadata': {'HTTPStatusCode': status}}, 'ListObjectsV2')


@pytest.mark.parametrize('error,cause', [
    (gcs_errors.Forbidden('no storage.objects.list'), "permission denied on bucket 'b'"),
    (gcs_errors.Unauthorized('bad token'), 'the credentials were rejected'),
    (auth.exceptions.DefaultCredentialsError('none'), 'no Google Cloud credentials found'),
])
def test_gcs_causes_the_emulator_cannot_produce(error, cause):
  assert buckets.gcs_cause(error, 'b').startswith(cause)


@pytest.mark.parametrize('error,cause', [
    (s3_error('AccessDenied', 403), "permission denied on bucket 'b'"),
    (s3_error('InvalidAccessKeyId', 403), 'the credentials were rejected'),
    (s3_error('NoSuchBucket', 404), "bucket 'b' does not exist"),
])
def test_s3_causes_the_emulator_cannot_produce(error, cause):
  assert buckets.s3_cause(error, 'b').startswith(cause)


def test_s3_workdir_says_at_start_up_what_cannot_work(s3_bucket, tmp_path):
  """Orbax cannot checkpoint to s3://: one line at start-up, nothing written."""
  workdir = f'{s3_bucket}/run'
  proc = train_py(workdir, stderr=subprocess.PIPE)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 1, out + err
  line = err.strip().splitlines()[-1]
  assert line.startswith(f'Workdir {workdir}: orbax-checkpoint ') and 's3://' in line, err
  assert 'Traceback' not in out + err
  assert not paths.resolve(workdir).exists()
