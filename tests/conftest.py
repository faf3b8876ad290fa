"""Test-wide settings: 8 host CPU devices and fast compiles (set before JAX starts), exact float32
matmuls and one compilation cache per run."""

import fcntl
import json
import os
import shutil
import tempfile

import xla_flags  # pylint: disable=g-bad-import-order

# Multi-device tests need several devices; on CPU XLA fakes them. Must precede importing jax.
# Compiled with less LLVM optimisation, as every process the tests start (tests/xla_flags.py).
os.environ.setdefault('XLA_FLAGS', xla_flags.with_devices(8))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# torchvision segfaults when imported after TensorFlow (torch 2.14.1, TF 2.21.0, seen here), and
# tensorflow_datasets imports TensorFlow: the converter tests need torch loaded first.
try:
  import torch  # pylint: disable=g-import-not-at-top,unused-import
  import torchvision  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:  # Only the converter tests use them; they skip without.
  pass

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from densenet_jax.native import onednn  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')

# One persistent compilation cache for the whole run, shared by the test processes and every
# train.py, sweep and benchmark they start (which inherit the environment): the kill-and-resume
# tests restart the same training many times, and each restart would compile the same steps
# again. It is a fresh
# directory per run, made by the process that starts the run (pytest-xdist's controller, before
# its workers start) and removed at the end, so no test ever reads a program of another run.
_CACHE = 'JAX_COMPILATION_CACHE_DIR'


def pytest_configure(config):
  if hasattr(config, 'workerinput'):   # an xdist worker: the controller has set it up
    return
  if _CACHE not in os.environ:
    config.densenet_jax_cache = os.environ[_CACHE] = tempfile.mkdtemp(prefix='densenet_jax_xla_')
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  # This process imported jax above, before the variables were set.
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 1.0)))


def pytest_unconfigure(config):
  cache = getattr(config, 'densenet_jax_cache', None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def on_one_device():
  """The test traces its steps under a mesh of the first device: with these 8 devices and no
  mesh, oneDNN's calls are not used (densenet_jax/native/shards.py), so a test about them needs
  one."""
  with jax.set_mesh(jax.sharding.Mesh(jax.devices()[:1], ('data',))):
    yield


@pytest.fixture
def use_onednn(on_one_device):   # pylint: disable=redefined-outer-name,unused-argument
  """oneDNN's convolutions on for the test (skipped where the library cannot be built), traced
  on one device (`on_one_device`)."""
  # pylint: disable=protected-access
  previous = onednn._state['enabled']
  onednn.set_enabled(True)
  if not onednn.available():
    pytest.skip(f'oneDNN unavailable: {onednn._state["reason"]}')
  yield
  onednn.set_enabled(previous)


@pytest.fixture(scope='session')
def bucket(tmp_path_factory):
  """'gs://BUCKET' on one local GCS emulator for the whole run (tests/gcs_emulator.py): shared
  by every file that uses it, since in-process gcsfs clients keep the first endpoint they saw."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  emulator = gcs_emulator.Emulator(str(tmp_path_factory.mktemp('gcs') / 'emulator.log'))
  yield f'gs://{gcs_emulator.BUCKET}'
  emulator.stop()


@pytest.fixture(scope='session')
def s3_bucket(tmp_path_factory):
  """'s3://BUCKET' on one local S3 emulator for the whole run (tests/s3_emulator.py)."""
  import s3_emulator  # pylint: disable=g-import-not-at-top
  emulator = s3_emulator.Emulator(str(tmp_path_factory.mktemp('s3') / 'emulator.log'))
  yield f's3://{s3_emulator.BUCKET}'
  emulator.stop()


@pytest.fixture(scope='session')
def computed_once(tmp_path_factory):
  """`computed_once(name, compute)`: compute(directory) -> a JSON value, computed by one process
  of the run and read by the others. pytest-xdist deals the tests one by one, so the tests of a
  file that share a reference run (a module fixture that trains one) may land on both workers:
  this trains it once, the other worker waiting for it instead of training its own."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):   # <base>/popen-gwN: the workers share <base>
    root = root.parent

  def get(name, compute):
    result = root / f'{name}.json'
    with open(root / f'{name}.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes, also on a failure
      if not result.exists():
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(compute(str(directory))))
      return json.loads(result.read_text())
  return get


@pytest.fixture(scope='session')
def uninterrupted(computed_once):
  """The workdir of one uninterrupted train.py run of test_reliability's LONG config on a local
  disk, trained once for the whole test run: the runs that are killed, stopped, damaged or run
  on a bucket must end exactly as it does."""
  def train(directory):
    from test_reliability import finish  # pylint: disable=g-import-not-at-top
    workdir = os.path.join(directory, 'run')
    finish(workdir)
    return workdir
  return computed_once('uninterrupted', train)
