"""Runs survive SIGTERM, kill -9 (also mid-checkpoint), damaged checkpoints and bad input.

Every interrupted run here is compared with one uninterrupted run of the same config: the
resumed parameters and final metrics must be bit-identical, since data order, augmentation and
dropout are functions of the seed and the step.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from densenet_jax.data import data_sources
from densenet_jax.runtime import paths
from densenet_jax.runtime import run_guard
from densenet_jax.training import checkpointing
from densenet_jax.training import trainer
from densenet_jax.training.validation import ConfigError
from test_training import load_params
from test_training import results
from test_training import tiny_config
from test_training import train_py


STEPS = 40
# 40 steps with a checkpoint every 2 keeps the process busy writing checkpoints, so that kills
# land before, between and inside writes.
LONG = [f'--config.num_train_steps={STEPS}', '--config.checkpoint_every_steps=2',
        '--config.eval_every_steps=20']


def start(workdir, *extra, log_path=None):
  """train.py on `workdir` (local or gs://), its output in `log_path` (default: WORKDIR.log)."""
  log = open(log_path or (workdir + '.log'), 'a')
  return train_py(workdir, *LONG, *extra, stdout=log, stderr=subprocess.STDOUT), log


def finish(workdir):
  proc, log = start(workdir)
  assert proc.wait(timeout=600) == 0, open(log.name).read()[-5000:]
  return open(log.name).read()


def assert_same_run(a, b):
  jax.tree.map(np.testing.assert_array_equal, load_params(a, STEPS), load_params(b, STEPS))
  ra, rb = results(a), results(b)
  for key in ('step', 'eval_loss', 'eval_top1', 'eval_top5'):
    assert ra[key] == rb[key], key


def steps_in(workdir):
  directory = paths.resolve(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.is_dir()) else []


def writing(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any('tmp' in s for s in os.listdir(directory))


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path, uninterrupted):
  """Two kill -9s: one at a random moment of training (a random step, then a random delay of
  up to 0.3 s; fixed seed), then one of the resumed run in the middle of a checkpoint write.
  Each restart resumes from the last complete checkpoint, and the run ends exactly as the
  uninterrupted one."""
  reference = uninterrupted
  workdir = str(tmp_path / 'run')
  rng = random.Random(1234)
  kill_plans = [('after', rng.randrange(4, 14), rng.uniform(0, 0.3)), ('mid-write', None, None)]
  resumed_from = []
  for kind, step, delay in kill_plans:
    before = steps_in(workdir)
    proc, log = start(workdir)
    while proc.poll() is None:
      if kind == 'after' and steps_in(workdir) and steps_in(workdir)[-1] >= step:
        time.sleep(delay)
        break
      if kind == 'mid-write' and steps_in(workdir) != before and writing(workdir):
        break
      time.sleep(0.005)
    assert proc.poll() is None, f'run ended before its {kind} kill: ' + open(log.name).read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = open(log.name).read()
    if before:
      assert f'Restored checkpoint of step {before[-1]}' in text
    resumed_from.append(before[-1] if before else 0)
    assert max(steps_in(workdir), default=0) < STEPS
  last = steps_in(workdir)[-1]
  text = finish(workdir)
  assert f'Restored checkpoint of step {last}' in text
  assert len(set(resumed_from)) == 2  # Each kill left progress behind to resume from.
  assert_same_run(reference, workdir)


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path, uninterrupted):
  reference = uninterrupted
  workdir = str(tmp_path / 'run')
  proc, log = start(workdir, '--config.checkpoint_every_steps=1000')
  # Wait for the first logged training metrics (step 4), then preempt.
  while proc.poll() is None and 'examples_per_sec' not in open(log.name).read():
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  text = open(log.name).read()
  assert 'Received SIGTERM' in text and 'run the same command to resume' in text
  saved = steps_in(workdir)
  assert len(saved) == 1 and 0 < saved[0] < STEPS
  text = finish(workdir)
  assert f'Restored checkpoint of step {saved[0]}' in text
  assert_same_run(reference, workdir)
  # The interrupted session's code is kept beside the finishing session's provenance.
  finished = results(workdir)
  earlier, = finished['earlier_sessions']
  assert earlier['commit'] == finished['provenance']['commit']
  assert earlier['started'] <= finished['provenance']['started']


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back(tmp_path, uninterrupted):
  """A latest checkpoint with a truncated data file is moved aside with a warning; the run
  continues from the previous one and still ends exactly as the uninterrupted run."""
  reference = uninterrupted
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)   # The reference's own checkpoints, damaged in a copy.
  latest = steps_in(workdir)[-1]
  assert latest == STEPS
  state_dir = os.path.join(workdir, 'checkpoints', str(latest), 'state')
  data_files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs
                if 'd' == os.path.basename(d)]
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.truncate(max(0, os.path.getsize(path) // 3))
  text = finish(workdir)
  assert f'Checkpoint {latest} in' in text and 'unreadable' in text
  assert f'Restored checkpoint of step {latest - 2}' in text
  assert os.listdir(os.path.join(workdir, 'checkpoints_corrupt'))
  assert_same_run(reference, workdir)


@pytest.mark.parametrize('error, match', [
    (OSError(errno.EIO, 'Input/output error'), r'Checkpoint 8 .* could not be read .*Nothing '
                                               r'was moved'),
    (ValueError('checksum mismatch'), r'No checkpoint .* can be restored \(8: ValueError: '
                                      r'checksum mismatch; 4: .*Nothing was moved'),
])
@pytest.mark.slow
def test_unreadable_checkpoints_are_never_moved_on_a_guess(tmp_path, monkeypatch, error, match):
  """A transient I/O error, or a failure of every checkpoint (which says more about the
  storage than the checkpoints), stops the run loudly; nothing is moved aside."""
  trainer.train_and_evaluate(tiny_config(num_train_steps=8), str(tmp_path))
  monkeypatch.setattr(checkpointing, 'RETRY_SECONDS', (0.0,))
  calls = []

  def failing_restore(self, abstract_state, step):
    calls.append(step)
    raise error
  monkeypatch.setattr(checkpointing.Checkpointer, 'restore', failing_restore)
  with pytest.raises(checkpointing.RestoreError, match=match):
    trainer.train_and_evaluate(tiny_config(num_train_steps=12), str(tmp_path))
  assert calls[:2] == [8, 8]  # Retried before giving up.
  assert steps_in(str(tmp_path)) == [4, 8] and not os.path.exists(tmp_path / 'checkpoints_corrupt')


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # The learning rate jumps to 1e29 after 9 steps (0.3 of the 30 steps): the run diverges.
  config = tiny_config(num_train_steps=30, lr_decay_at=(0.3,), lr_decay_factor=1e30,
                       log_every_steps=1)
  with pytest.raises(FloatingPointError, match=r'Loss is (nan|inf) at step (1\d|2\d)\b'):
    trainer.train_and_evaluate(config, str(tmp_path))
  saved = steps_in(str(tmp_path))
  assert saved and saved[-1] >= 8
  params = load_params(str(tmp_path), saved[-1])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_resume_with_another_model_is_refused(tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path))
  with pytest.raises(ConfigError, match=r'model.growth_rate: checkpoint 4, config 6.*new '
                                        r'--workdir'):
    trainer.train_and_evaluate(tiny_config(num_train_steps=8, **{'model.growth_rate': 6}),
                               str(tmp_path))
  # Optimizer fields that change the train state's structure are refused before anything moves
  # (they used to look like damage: every checkpoint was moved aside and the run restarted).
  for overrides, field in ((dict(grad_clip_norm=1.0), 'grad_clip_norm: checkpoint False'),
                           (dict(momentum=0.0), 'momentum: checkpoint True'),
                           (dict(weight_decay=0.0), 'weight_decay: checkpoint True')):
    with pytest.raises(ConfigError, match=f'optimizer.{field}, config'):
      trainer.train_and_evaluate(tiny_config(num_train_steps=8, **overrides), str(tmp_path))
  assert steps_in(str(tmp_path)) == [4] and not os.path.exists(tmp_path / 'checkpoints_corrupt')
  # The compute mode is not the model, and a value is not a structure: both resume.
  out = trainer.train_and_evaluate(
      tiny_config(num_train_steps=8, weight_decay=5e-4, **{'model.memory_efficient': True}),
      str(tmp_path))
  assert out['step'] == 8


def test_second_run_on_a_workdir_is_refused(tmp_path):
  with run_guard.WorkdirLock(str(tmp_path)):
    with pytest.raises(run_guard.WorkdirInUseError, match=r'in use by another run \(pid'):
      trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  # A lock holder killed with -9 leaves no stale lock.
  holder = subprocess.Popen([sys.executable, '-c', (
      'import fcntl, sys, time; f = open(sys.argv[1], "a+"); '
      'fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(600)'),
                             os.path.join(str(tmp_path), '.lock')], stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == 'locked'
  with pytest.raises(run_guard.WorkdirInUseError):
    run_guard.WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  lock = run_guard.WorkdirLock(str(tmp_path))
  lock.acquire()
  lock.release()


@pytest.mark.parametrize('overrides, error, match', [
    (dict(**{'dataset.name': 'cifar11'}), ValueError, r'cifar11'),
    (dict(**{'model.growth_rate': 0}), ConfigError, r'growth_rate=0: expected a positive'),
    (dict(**{'model.name': 'densenet121', 'model.depth': None, 'model.block_sizes': ()}),
     ConfigError, r'block_sizes=\(\): expected a non-empty'),
    (dict(**{'model.compression': 0.0}), ConfigError, r'compression=0.0: expected a number '
                                                      r'in \(0, 1\]'),
    (dict(eval_batch_size=60), ConfigError, r'config.eval_batch_size=60: expected a positive '
                                            r'multiple of the number of devices \(8\)'),
    (dict(warmup_epochs=5.0), ConfigError, r'config.warmup_epochs=5.0'),
])
def test_bad_input_is_reported_before_compilation(tmp_path, overrides, error, match):
  start_time = time.perf_counter()
  with pytest.raises(error, match=match):
    trainer.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert time.perf_counter() - start_time < 10


@pytest.mark.slow
def test_resume_with_other_classes_is_refused(tmp_path):
  from test_input_pipeline import make_folder  # pylint: disable=g-import-not-at-top
  root = make_folder(tmp_path / 'images', {'train': {'cat': 20, 'dog': 20}, 'test': {'cat': 4}})
  fields = {'dataset.name': 'folder', 'dataset.data_dir': str(root), 'dataset.eval_split': 'test',
            'dataset.mean': (0.5,) * 3, 'dataset.std': (0.25,) * 3, 'eval_batch_size': 8}
  workdir = tmp_path / 'run'
  trainer.train_and_evaluate(tiny_config(num_train_steps=2, **fields), str(workdir))
  with open(workdir / 'classes.json') as f:
    assert json.load(f) == {'classes': {'0': 'cat', '1': 'dog'}}
  os.rename(root / 'train' / 'dog', root / 'train' / 'cow')  # Same count, other labels.
  data_sources._folder_listing.cache_clear()  # pylint: disable=protected-access (a new process)
  with pytest.raises(ConfigError, match=r"labels.classes: checkpoint \['cat', 'dog'\], config "
                                        r"\['cat', 'cow'\]"):
    trainer.train_and_evaluate(tiny_config(num_train_steps=4, **fields), str(workdir))
  with open(workdir / 'classes.json') as f:  # The run's own map is kept.
    assert json.load(f) == {'classes': {'0': 'cat', '1': 'dog'}}
