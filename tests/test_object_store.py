"""gs:// workdirs against a local GCS emulator: the lease, datasets, weights and figures there.

A whole run on gs:// that is frozen, taken over and resumed, and ends exactly as the same run on
a local disk, is test_buckets.py's; a run killed with -9 and resumed on s3:// is test_s3.py's.
"""

import os
import time

import jax
import numpy as np
import pytest

from densenet_jax.data import input_pipeline
from densenet_jax.runtime import leases
from densenet_jax.runtime import paths
from densenet_jax.runtime import run_guard
from densenet_jax.tools import convert
from densenet_jax.training import pretrained
from densenet_jax.training import trainer
from test_reliability import start
from test_reliability import steps_in
from test_training import tiny_config
from densenet_jax.training.validation import ConfigError


def committed_steps(workdir):
  """Steps whose checkpoint is complete: on an object store Orbax writes a step in place and
  marks it complete last, with commit_success.txt."""
  return [s for s in steps_in(workdir)
          if (paths.resolve(workdir) / 'checkpoints' / str(s) / 'commit_success.txt').exists()]


def resume_after_kill(workdir, killed_at, tmp_path, *extra):
  """Reruns a killed run on an object store (with the flags `extra`): it takes the dead
  holder's lease over, resumes from `killed_at` and finishes."""
  resumed, log = start(workdir, *extra, log_path=str(tmp_path / 'resumed.log'))
  assert resumed.wait(timeout=600) == 0, open(log.name).read()[-5000:]
  text = open(log.name).read()
  assert f'Restored checkpoint of step {killed_at}' in text
  assert 'Took over the stale lease' in text


def test_lease_refuses_a_live_holder_and_takes_over_a_stale_one(bucket):
  """A holder on another host is judged by its heartbeat alone: refused while it renews,
  taken over once it has been silent for the lease's duration."""
  workdir = f'{bucket}/lease'
  holder = leases.Lease(workdir, seconds=2)
  holder._owner = {'holder': 'pid 1 on elsewhere', 'host': 'elsewhere', 'pid': 1}
  holder.acquire()
  try:
    begin = time.monotonic()
    with pytest.raises(run_guard.WorkdirInUseError,
                       match=f'Workdir {workdir} is in use by another run \\(pid 1 on '
                             r'elsewhere\). Wait for it to finish'):
      leases.Lease(workdir, seconds=2).acquire()
    assert time.monotonic() - begin < 2
  finally:
    holder._stop.set()  # The holder stops renewing but keeps its lease object: it went silent.
    holder._thread.join()
  taker = leases.Lease(workdir, seconds=2)
  begin = time.monotonic()
  taker.acquire()
  assert time.monotonic() - begin >= 2
  assert paths.read_json(f'{workdir}/.lock')['pid'] == os.getpid()
  taker.release()
  assert not paths.resolve(f'{workdir}/.lock').exists()


def test_in_process_run_on_a_held_gs_workdir_is_refused(bucket):
  workdir = f'{bucket}/held'
  with run_guard.WorkdirLock(workdir):
    with pytest.raises(run_guard.WorkdirInUseError, match=r'in use by another run \(pid'):
      trainer.train_and_evaluate(tiny_config(), workdir)


def upload(local_root, remote_root):
  for directory, _, files in os.walk(local_root):
    for name in files:
      relative = os.path.relpath(os.path.join(directory, name), local_root)
      with open(os.path.join(directory, name), 'rb') as f:
        (paths.resolve(remote_root) / relative).write_bytes(f.read())


def test_folder_dataset_on_gs_reads_as_the_local_one(tmp_path, bucket):
  """Listing and reading go through the file layer: the same batches as from a local copy,
  and a corrupt image is named by its gs:// path."""
  from test_input_pipeline import folder_config, make_folder  # pylint: disable=g-import-not-at-top
  local = make_folder(tmp_path / 'images', {'train': {'cat': 5, 'dog': 4}, 'test': {'cat': 2}})
  remote = f'{bucket}/images'
  upload(local, remote)
  batches = {}
  for root in (str(local), remote):
    config = folder_config(root)
    info = input_pipeline.get_info(config)
    assert info.class_names == ('cat', 'dog') and info.num_train_examples == 9
    batches[root] = (
        list(input_pipeline.train_iterator(config, seed=0, local_batch_size=3, epoch=0)) +
        list(input_pipeline.eval_iterator(config, local_batch_size=2, num_batches=1)))
  for a, b in zip(batches[str(local)], batches[remote]):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  (paths.resolve(remote) / 'train' / 'dog' / '1.png').write_bytes(b'not an image')
  with pytest.raises(ValueError, match=f'Cannot read or decode.*{remote}/train/dog/1.png'):
    list(input_pipeline.train_iterator(folder_config(remote), seed=1, local_batch_size=3,
                                       epoch=0))


def test_converted_weights_on_gs(bucket):
  """The converter's --output and config.init_checkpoint on gs://."""
  variables = {'params': {'classifier': {'kernel': np.ones((3, 2), np.float32)}},
               'batch_stats': {'norm': {'mean': np.zeros(3, np.float32)}}}
  output = f'{bucket}/weights'
  convert.save(variables, {'model': 'densenet121', 'overrides': {}}, output)
  restored = pretrained.read_init_checkpoint(output)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  assert pretrained.read_model_json(output)['model'] == 'densenet121'
  with pytest.raises(ConfigError, match=f"init_checkpoint='{bucket}/none'.*variables/ "
                                        'subdirectory'):
    pretrained.read_init_checkpoint(f'{bucket}/none')
