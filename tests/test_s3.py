"""s3:// workdirs against moto: checkpoints staged locally and uploaded, kill -9 and resume.

Orbax cannot write s3:// itself (densenet_jax/training/staged_checkpoints.py): a run on an s3://
workdir must still end exactly as the same run on a local disk, a step whose upload was cut
short (no commit file) must never be restored, and nothing may stay on the local disk.
"""

import os
import signal
import time

import jax
import numpy as np
import pytest

from densenet_jax.experiments import feature_reuse
from densenet_jax.runtime import paths
from densenet_jax.tools import convert
from densenet_jax.training import pretrained
from densenet_jax.training import staged_checkpoints
from densenet_jax.training import trainer
from test_object_store import resume_after_kill
from test_reliability import start
from test_reliability import STEPS
from test_training import load_params
from test_training import results
from test_training import tiny_config


def committed(workdir):
  return staged_checkpoints.committed_steps(f'{workdir}/checkpoints')


@pytest.mark.slow
def test_kill_9_then_resume_on_s3_matches_a_local_run(tmp_path, s3_bucket, uninterrupted):
  """The run on s3:// is killed with -9 after its first committed upload, rerun, and ends
  exactly as the same run on a local disk."""
  reference = uninterrupted
  workdir = f'{s3_bucket}/kill9'
  # A checkpoint every 10 steps, not 2: each is uploaded whole, and a few show the same.
  every_10 = '--config.checkpoint_every_steps=10'
  proc, log = start(workdir, every_10, log_path=str(tmp_path / 's3.log'))
  while proc.poll() is None and not committed(workdir):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = committed(workdir)[-1]
  assert killed_at < STEPS, open(log.name).read()[-5000:]
  resume_after_kill(workdir, killed_at, tmp_path, every_10)
  assert not os.path.exists(staged_checkpoints.staging_dir(workdir))  # Removed at close.
  jax.tree.map(np.testing.assert_array_equal, feature_reuse.load_params(workdir),
               load_params(reference, STEPS))
  for key in ('step', 'eval_loss', 'eval_top1', 'eval_top5'):
    assert results(workdir)[key] == results(reference)[key], key
  assert committed(workdir) == [20, 30, 40]  # keep_checkpoints=3, in the bucket.
  names = {p.name for p in paths.resolve(workdir).iterdir()}
  assert {'checkpoints', 'results.json', 'progress.json'} <= names, names
  assert any(n.startswith('events.out.tfevents.') for n in names), names
  assert '.lock' not in names


@pytest.mark.slow
def test_an_uncommitted_step_is_never_restored(s3_bucket, caplog):
  """A step whose upload was cut short (no commit file) is ignored: the next run resumes from
  the committed one before it, saves the step again and ends as the first run did."""
  workdir = f'{s3_bucket}/uncommitted'
  config = tiny_config(num_train_steps=8)
  first = trainer.train_and_evaluate(config, workdir)
  assert committed(workdir) == [4, 8]
  (paths.resolve(workdir) / 'checkpoints' / '8' / staged_checkpoints.COMMITTED).unlink()
  assert committed(workdir) == [4]
  with caplog.at_level('INFO'):
    again = trainer.train_and_evaluate(config, workdir)
  assert 'Restored checkpoint of step 4' in caplog.text
  assert committed(workdir) == [4, 8]
  assert again == first


def test_converted_weights_on_s3(s3_bucket):
  """The converter's --output and config.init_checkpoint on s3://, through a local copy."""
  variables = {'params': {'classifier': {'kernel': np.ones((3, 2), np.float32)}},
               'batch_stats': {'norm': {'mean': np.zeros(3, np.float32)}}}
  output = f'{s3_bucket}/weights'
  convert.save(variables, {'model': 'densenet121', 'overrides': {}}, output)
  jax.tree.map(np.testing.assert_array_equal, pretrained.read_init_checkpoint(output), variables)
  assert pretrained.read_model_json(output)['model'] == 'densenet121'
