"""Several processes as several hosts (localhost): one decision, stopping together, a lost
process named, the identical result on resume (densenet_jax/runtime/coordination.py)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from test_training import load_params, results, run_to_end, train_py
import xla_flags



def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def two_processes(workdir, *extra, log_dir=None, only_1=()):
  """Starts the two processes of one run on localhost, 2 CPU devices each; with `log_dir`
  their output goes to files there (p0.log, p1.log), appended to; `only_1`: flags of process 1."""
  port = _free_port()
  procs = []
  for i in range(2):
    popen = {}
    if log_dir is not None:
      popen = dict(stdout=open(os.path.join(log_dir, f'p{i}.log'), 'a'), stderr=subprocess.STDOUT)
    procs.append(train_py(workdir, f'--coordinator_address=127.0.0.1:{port}',
                          '--num_processes=2', f'--process_id={i}',
                          '--config.distributed.heartbeat_timeout_seconds=6', *extra,
                          *(only_1 if i == 1 else ()),
                          env={'XLA_FLAGS': xla_flags.with_devices(2)},
                          **popen))
  return procs


# Long enough to stop and kill the two processes in the middle of the run.
TWO_PROCESS_STEPS = ['--config.num_train_steps=24']


@pytest.fixture(scope='module')
def two_process_run(computed_once):
  """(workdir, outputs of the two processes) of one uninterrupted two-process run, trained once
  for all the tests here."""
  def train(directory):
    workdir = os.path.join(directory, 'multi')
    return workdir, [run_to_end(p) for p in two_processes(workdir, *TWO_PROCESS_STEPS)]
  return tuple(computed_once('two_process_run', train))


@pytest.mark.slow
def test_two_processes_train_checkpoint_evaluate(two_process_run):
  """Two processes on localhost with 2 CPU devices each form one run of 4 devices."""
  workdir, outs = two_process_run
  assert '4 devices in 2 processes' in outs[0]
  res = results(workdir)
  assert res['step'] == 24 and res['eval_examples'] == 360
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '24'))


def _steps_saved(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(
      directory) else []


def _wait_for(condition, procs, what):
  deadline = time.time() + 300
  while not condition():
    assert all(p.poll() is None for p in procs), f'a process ended before {what}'
    assert time.time() < deadline, f'no {what} after 300 s'
    time.sleep(0.02)


@pytest.mark.slow
def test_two_processes_stop_together_die_together_and_resume(tmp_path, two_process_run):
  """Ctrl-C (SIGINT) on one process stops both after the same step; after kill -9 of one, the
  other exits non-zero within the heartbeat timeout (6 s here), naming it; rerunning both
  ends exactly as the uninterrupted run."""
  reference, _ = two_process_run
  workdir, logs = str(tmp_path / 'multi'), str(tmp_path)
  log = lambda i: open(os.path.join(logs, f'p{i}.log')).read()
  procs = two_processes(workdir, *TWO_PROCESS_STEPS, '--config.checkpoint_every_steps=1000',
                        log_dir=logs)
  _wait_for(lambda: 'examples_per_sec' in log(0), procs, 'metrics of step 4')
  procs[1].send_signal(signal.SIGINT)
  assert [p.wait(timeout=120) for p in procs] == [0, 0], log(0)[-3000:] + log(1)[-3000:]
  stopped = [re.findall(r'Stopped by (.*) after saving step (\d+)', log(i)) for i in (0, 1)]
  (reason0, step0), = stopped[0]
  (reason1, step1), = stopped[1]
  assert (reason0, reason1) == ('a signal to another process', 'SIGINT') and step0 == step1
  step = int(step0)
  assert 4 <= step < 24 and _steps_saved(workdir) == [step]

  procs = two_processes(workdir, *TWO_PROCESS_STEPS, log_dir=logs)
  _wait_for(lambda: _steps_saved(workdir)[-1] > step, procs, 'a new checkpoint')
  procs[1].kill()
  killed = time.time()
  assert procs[0].wait(timeout=60) == 1
  assert time.time() - killed < 6 + 10  # The heartbeat timeout, then a grace period at most.
  assert log(0).strip().splitlines()[-1].startswith(
      'Lost process 1 of 2: no heartbeat for'), log(0)[-3000:]
  last = _steps_saved(workdir)[-1]
  assert last < 24

  procs = two_processes(workdir, *TWO_PROCESS_STEPS, log_dir=logs)
  assert [p.wait(timeout=600) for p in procs] == [0, 0], log(0)[-3000:] + log(1)[-3000:]
  assert all(log(i).count(f'Restored checkpoint of step {last} ') == 1 for i in (0, 1))
  jax.tree.map(np.testing.assert_array_equal, load_params(reference, 24),
               load_params(workdir, 24))
  for key in ('step', 'eval_loss', 'eval_top1', 'eval_top5'):
    assert results(workdir)[key] == results(reference)[key], key


@pytest.mark.slow
def test_two_processes_follow_process_0_or_stop_together(tmp_path, two_process_run):
  """A refusal on process 0 (checkpoints of another model) stops both processes with the same
  line; so do folder datasets that the two list differently, naming the first differing file."""
  reference, _ = two_process_run
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference, workdir)
  outs = [run_to_end(p, expect=1) for p in two_processes(
      workdir, *TWO_PROCESS_STEPS, '--config.model.growth_rate=6')]
  lines = [out.strip().splitlines()[-1] for out in outs]
  assert lines[0] == lines[1] and lines[0].startswith('Config error: The checkpoints in '), lines
  assert 'refusing to resume with: model.growth_rate: checkpoint 4, config 6' in lines[0]

  from test_input_pipeline import make_folder  # pylint: disable=g-import-not-at-top
  roots = [make_folder(tmp_path / f'images{i}', {'train': {'cat': 3, 'dog': 3},
                                                 'test': {'cat': 2}}) for i in (0, 1)]
  os.rename(roots[1] / 'train' / 'dog' / '1.png', roots[1] / 'train' / 'dog' / '1b.png')
  folder = ['--config.dataset.name=folder', '--config.dataset.eval_split=test',
            '--config.dataset.mean=(0.5,0.5,0.5)', '--config.dataset.std=(0.25,0.25,0.25)']
  outs = [run_to_end(p, expect=1) for p in two_processes(
      str(tmp_path / 'folder'), *folder, f'--config.dataset.data_dir={roots[0]}',
      only_1=[f'--config.dataset.data_dir={roots[1]}'])]
  lines = [out.strip().splitlines()[-1] for out in outs]
  assert lines[0] == lines[1] == (
      "Several hosts: The processes list different datasets: in train/dog, file 2 is '1.png' "
      "on process 0 and '1b.png' on process 1. Every process must see the same files "
      "(config.dataset.data_dir)."), lines


