"""Buckets at their edges: one line when a bucket cannot be used, and a lease that a thawed
holder cannot outrun (gs:// on fake-gcs-server, s3:// on moto)."""

import os
import signal
import subprocess
import time

from botocore import exceptions as s3_errors
from google import auth
from google.api_core import exceptions as gcs_errors
import jax
import numpy as np
import pytest

from densenet_jax.experiments import feature_reuse
from densenet_jax.runtime import buckets
from densenet_jax.runtime import paths
import gcs_emulator
from test_object_store import committed_steps
from test_reliability import assert_same_run
from test_reliability import LONG
from test_training import train_py

LEASE_SECONDS = 6  # The lease for the SIGSTOP test: seconds, not the default minute.


def closed_port_url():
  return f'http://127.0.0.1:{gcs_emulator._free_port()}'  # pylint: disable=protected-access


@pytest.mark.slow
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


def test_what_orbax_writes_itself_and_what_is_staged(monkeypatch):
  """Local and gs:// go to Orbax directly, s3:// through local staging (test_s3.py), which a
  multi-process run cannot use: one line at start-up."""
  from densenet_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  assert checkpointing.orbax_writes_directly('/tmp/run')
  assert checkpointing.orbax_writes_directly('gs://b/run')
  assert not checkpointing.orbax_writes_directly('s3://b/run')
  assert checkpointing.unsupported('s3://b/run') is None
  monkeypatch.setattr(checkpointing.jax, 'process_count', lambda: 2)
  assert checkpointing.unsupported('gs://b/run') is None
  assert 'this run has 2 processes' in checkpointing.unsupported('s3://b/run')


def _objects(workdir):
  """{name: generation} of the run's records and events, and its committed steps."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, _, prefix = workdir[len('gs://'):].partition('/')
  records = {b.name: b.generation for b in storage.Client().list_blobs(bucket, prefix=prefix)
             if '/checkpoints/' not in b.name and not b.name.endswith('/.lock')}
  return records, committed_steps(workdir)


def _holder_pid(workdir):
  record = paths.read_json(f'{workdir}/.lock')
  return record and record.get('pid')


@pytest.mark.slow
def test_a_thawed_holder_that_lost_its_lease_writes_nothing(tmp_path, bucket, uninterrupted):
  """Run 1 is frozen (SIGSTOP) past its lease, run 2 takes the workdir over and is frozen in
  turn; run 1 thawed must exit (75) with one line, writing nothing; run 2 thawed resumes from
  run 1's checkpoint and ends exactly as the same run on a local disk, with its records in the
  bucket and nothing on the machine. (A live holder's refusal: test_object_store.py.)"""
  reference, workdir = uninterrupted, f'{bucket}/thawed'
  env = {'DENSENET_JAX_LEASE_SECONDS': str(LEASE_SECONDS)}
  logs = [open(tmp_path / f'run{i}.log', 'w') for i in (1, 2)]
  # Checkpoints far apart, so that run 1 is frozen between saves, not inside one.
  run = lambda log: train_py(workdir, *LONG, '--config.checkpoint_every_steps=10', env=env,
                             stdout=log, stderr=subprocess.STDOUT)
  first = run(logs[0])
  while first.poll() is None and not committed_steps(workdir):
    time.sleep(0.05)
  first.send_signal(signal.SIGSTOP)
  assert first.poll() is None, open(logs[0].name).read()[-5000:]
  time.sleep(LEASE_SECONDS + 0.5)  # Its heartbeat is now older than the lease.
  second = run(logs[1])
  deadline = time.monotonic() + 120
  while _holder_pid(workdir) != second.pid:
    assert second.poll() is None and time.monotonic() < deadline, open(logs[1].name).read()
    time.sleep(0.1)
  second.send_signal(signal.SIGSTOP)
  time.sleep(0.5)
  before = _objects(workdir)
  first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=60) == 75, open(logs[0].name).read()[-5000:]
  assert _objects(workdir) == before
  lost = [l for l in open(logs[0].name) if 'Lost the lease' in l]
  assert len(lost) == 1 and f'Lost the lease of {workdir} (another run took' in lost[0], lost
  second.send_signal(signal.SIGCONT)
  assert second.wait(timeout=600) == 0, open(logs[1].name).read()[-5000:]
  text = open(logs[1].name).read()
  assert 'Took over the stale lease' in text
  assert f'Restored checkpoint of step {before[1][-1]}' in text
  assert_same_run(reference, workdir)
  jax.tree.map(np.testing.assert_array_equal, feature_reuse.load_params(workdir),
               feature_reuse.load_params(reference))
  names = {p.name for p in paths.resolve(workdir).iterdir()}
  assert {'checkpoints', 'results.json', 'progress.json'} <= names, names
  assert any(n.startswith('events.out.tfevents.') for n in names), names
  assert '.lock' not in names  # Released at the end.
  assert not os.path.exists(os.path.join(gcs_emulator.ROOT, 'gs:'))  # Nothing went local.


def test_s3_lease_refuses_a_live_holder_and_takes_over_a_stale_one(s3_bucket):
  """The lease on S3's conditional writes (If-None-Match, If-Match), as on gs://."""
  from densenet_jax.runtime import leases  # pylint: disable=g-import-not-at-top
  workdir = f'{s3_bucket}/lease'
  holder = leases.Lease(workdir, seconds=2)
  holder._owner = {'holder': 'pid 1 on elsewhere', 'host': 'elsewhere', 'pid': 1}
  holder.acquire()
  try:
    with pytest.raises(leases.WorkdirInUseError, match=f'Workdir {workdir} is in use by '
                                                       r'another run \(pid 1 on elsewhere\)'):
      leases.Lease(workdir, seconds=2).acquire()
  finally:
    holder._stop.set()  # Silent from now on, its lease object left behind.
    holder._thread.join()
  taker = leases.Lease(workdir, seconds=2)
  taker.acquire()
  assert paths.read_json(f'{workdir}/.lock')['pid'] == os.getpid()
  def fence(why):
    raise SystemExit(why)
  holder._fence = fence  # Instead of os._exit, for this process.
  with pytest.raises(SystemExit, match='another run took the lease over'):
    holder.check()  # The old holder, thawed: stopped before its next write.
  taker.check()  # The holder's own check passes.
  taker.release()
  assert not paths.resolve(f'{workdir}/.lock').exists()
