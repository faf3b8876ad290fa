"""Sweeps on a gs:// directory, against the local GCS emulator (the `bucket` fixture).

Every file of the sweep (sweep.json, the points' runs and train.log, the report and its
figures) must end up in the bucket and nothing in a local `./gs:` folder; a point's log is
uploaded while it runs and keeps every session, and its last line is still the error.
"""

import csv
import io
import os
import subprocess
import sys
import textwrap

import pytest

from densenet_jax.experiments import launchers
from densenet_jax.experiments import plan
from densenet_jax.experiments import report
from densenet_jax.runtime import paths
from densenet_jax.runtime import run_guard
from densenet_jax.runtime import staging
from test_sweep import ROOT
from test_sweep import run_sweep
from test_sweep import SWEEP_CONFIG

# A point that prints, waits until the sweep has uploaded its log (the session's number of
# lines 'started' is in the bucket), then fails: the upload happens while a point runs.
FAKE_POINT = textwrap.dedent('''
    import os, sys, time
    from densenet_jax.runtime import paths
    print('started', flush=True)
    log, session = paths.resolve(sys.argv[1]), int(os.environ['SESSION'])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      if log.exists() and log.read_text().splitlines().count('started') >= session:
        sys.exit('Training stopped: boom')
      time.sleep(0.1)
    sys.exit('the log was not uploaded while the point ran')
''')


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / 'tiny_sweep.py'
  path.write_text(SWEEP_CONFIG)
  return str(path)


class FakeSweep(plan.Sweep):
  """One point whose command is FAKE_POINT, not train.py."""

  def command(self, point):
    return [sys.executable, '-c', FAKE_POINT, f'{self.point_workdir(point)}/train.log']


def fake_sweep(workdir):
  return FakeSweep('unused.py', workdir, [plan.Point(0, 'p', {})], {})


def no_local_gs_folder():
  return not any(os.path.exists(os.path.join(d, 'gs:')) for d in (ROOT, os.getcwd()))


@pytest.mark.slow
def test_print_launcher_hands_points_their_gs_workdirs(sweep_file):
  """Every configuration once per seed (--seeds), as the README's study command runs it, each
  on its own gs:// workdir, written as such (not the 'gs:/' of a local path)."""
  result = run_sweep(sweep_file, 'gs://densenet-test/seeded', '--launcher=print', '--seeds=2')
  assert result.returncode == 0, result.stdout[-3000:]
  for k in (4, 6):
    for seed in (0, 1):
      assert (f'--workdir=gs://densenet-test/seeded/growth_rate={k},seed={seed} '
              f'--config.model.growth_rate={k} --config.seed={seed}') in result.stdout
  assert 'gs:/densenet-test' not in result.stdout.replace('gs://', '')
  assert no_local_gs_folder()


def test_point_log_is_uploaded_while_running_and_keeps_every_session(bucket, monkeypatch):
  monkeypatch.setenv('PYTHONPATH', ROOT)
  workdir = f'{bucket}/logs'
  log = paths.resolve(f'{workdir}/p/train.log')
  texts = []
  for session in (1, 2):
    monkeypatch.setenv('SESSION', str(session))
    fake = fake_sweep(workdir)
    failed = launchers.run_local(fake, poll_seconds=0.1)
    assert [p.name for p in failed] == ['p']
    assert failed[0].error == 'Training stopped: boom'   # The last line, read before upload.
    texts.append(log.read_text())
    lines = texts[-1].splitlines()   # (The command line shown above each session has both.)
    assert lines.count('started') == session
    assert lines.count('Training stopped: boom') == session
  assert texts[1].startswith(texts[0])                    # Appended, as a local log is.
  assert paths.read_json(f'{workdir}/sweep.json')['points'][0]['state'] == 'failed'
  assert not os.path.exists(staging.cache_dir(f'{workdir}/p'))   # The cache is removed.
  last_line = launchers._last_line  # pylint: disable=protected-access
  assert last_line(str(log)) == 'Training stopped: boom'   # As run_slurm reads it.
  assert no_local_gs_folder()


@pytest.mark.slow
def test_submitit_point_on_gs_uploads_its_log(bucket, monkeypatch, tmp_path):
  """submitit's local executor runs the job array's task; its folder stays local."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('SESSION', '1')
  monkeypatch.setenv('PYTHONPATH', ROOT)
  fake = fake_sweep(f'{bucket}/submitted')
  failed = launchers.run_slurm(fake, cluster='local', wait=True, timeout_min=5,
                               log_upload_seconds=1.0)
  assert [p.error for p in failed] == ['Training stopped: boom']
  assert 'started' in paths.resolve(f'{bucket}/submitted/p/train.log').read_text().split()
  assert os.listdir(tmp_path / 'submitit') == [os.path.basename(
      staging.cache_dir(fake.workdir))]
  assert no_local_gs_folder()


@pytest.mark.slow
def test_sweep_on_gs_runs_reruns_and_reports(sweep_file, bucket):
  """A sweep of three points on gs://, two at a time (one core each), one of which diverges:
  the failure is reported and tabled, the finished runs carry their provenance, every file is
  in the bucket; a rerun skips the finished points and runs the failed one again; the report
  command rebuilds the report."""
  workdir = f'{bucket}/sweep1'
  remote = paths.resolve(workdir)
  with run_guard.WorkdirLock(workdir):  # Another sweep holds the directory.
    refused = run_sweep(f'{sweep_file}:diverging', workdir)
  assert refused.returncode != 0
  assert f'Sweep error: Workdir {workdir} is in use by another run (pid {os.getpid()}' in (
      refused.stdout), refused.stdout[-3000:]

  first = run_sweep(f'{sweep_file}:diverging', workdir, '--parallel=2')
  assert first.returncode != 0, first.stdout[-5000:]
  failed_name = 'growth_rate=4,lr_decay_factor=1e+30'
  names = ['growth_rate=4,lr_decay_factor=0.1', 'growth_rate=6,lr_decay_factor=0.1', failed_name]
  assert (f'1 of 3 points failed: {failed_name}: Training stopped: Loss is' in first.stdout
          ), first.stdout[-3000:]
  assert 'Point 3/3' in first.stdout and 'ETA' in first.stdout
  state = paths.read_json(f'{workdir}/sweep.json')
  assert [(p['name'], p['state']) for p in state['points']] == list(
      zip(names, ['done', 'done', 'failed']))
  assert state['points'][2]['overrides'] == {'model.growth_rate': 4, 'lr_decay_factor': 1e30}
  assert 'Loss is' in state['points'][2]['error']
  for name in names:   # Each point uploads its own log.
    run = {p.name for p in (remote / name).iterdir()}
    assert {'results.json', 'progress.json', 'train.log', 'checkpoints'} <= run or (
        name == failed_name and 'train.log' in run), run
    assert '$ ' in (remote / name / 'train.log').read_text()
  for figure in ('error_vs_params.png', 'error_vs_gmacs.png', 'curves.png',
                 'feature_reuse.png'):
    assert len((remote / figure).read_bytes()) > 1000, figure

  # The runs' table has a row per point, the swept fields, and the failure; with one seed the
  # configurations' table has the same rows, and no spread.
  rows = list(csv.DictReader(io.StringIO((remote / 'runs.csv').read_text())))
  configurations = list(csv.DictReader(io.StringIO((remote / 'results.csv').read_text())))
  assert [r['name'] for r in rows] == [c['name'] for c in configurations] == names
  assert [c['seeds'] for c in configurations] == ['1', '1', '0']
  assert configurations[0]['test_error_mean'] and not configurations[0]['test_error_ci95']
  assert (remote / 'effects.csv').exists()
  for column in ('model.growth_rate', 'lr_decay_factor', *report.FIXED_COLUMNS):
    assert column in rows[0]
  done = rows[:2]
  assert all(r['status'] == 'done' and r['step'] == '12' for r in done), rows
  assert int(done[0]['params']) < int(done[1]['params'])  # k=4 is smaller than k=6.
  assert 0 < float(done[0]['gmacs']) < float(done[1]['gmacs'])
  assert float(done[0]['train_seconds']) > 0 and float(done[0]['train_images_per_second']) > 0
  # best_eval_top1 and the curves come from the event files, staged for the report.
  assert float(done[0]['best_eval_top1']) >= float(done[0]['eval_top1']) > 0
  assert rows[2]['status'].startswith('failed: Training stopped: Loss is nan')
  # What produced each run, as a reviewer needs it.
  produced = paths.read_json(f'{workdir}/{names[0]}/results.json')['provenance']
  for field in ('commit', 'dirty', 'versions', 'python', 'platform', 'device_kind',
                'device_count', 'process_count', 'command', 'started', 'finished'):
    assert field in produced, field
  assert produced['versions']['jax'] and produced['device_count'] == 1
  assert produced['command'][0].endswith('train.py') and produced['commit'] is not None
  assert rows[0]['commit'] == produced['commit'][:10] + (
      f'+{produced["diff_hash"]}' if produced['dirty'] else '')
  report_md = (remote / 'report.md').read_text()
  assert '![feature_reuse.png](feature_reuse.png)' in report_md
  assert '![curves.png](curves.png)' in report_md
  assert 'densenet_jax_report_' not in report_md   # No staging path leaks into it.
  assert not (remote / '.lock').exists()
  assert no_local_gs_folder()

  # Rerun: finished points are skipped, the failed one runs again (and fails again).
  logs = {n: (remote / n / 'train.log').read_text() for n in names}
  second = run_sweep(f'{sweep_file}:diverging', workdir, '--report=False')
  assert second.returncode != 0, second.stdout[-3000:]
  assert second.stdout.count('done already, skipped') == 2
  for name, before in logs.items():
    after = (remote / name / 'train.log').read_text()
    assert (after == before) == (name != failed_name), name

  for name in ('report.md', 'results.csv', 'curves.png'):
    (remote / name).unlink()
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, '-m', 'densenet_jax.experiments.report', f'--workdir={workdir}'], cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:]
  assert f'Report uploaded to {workdir}' in result.stdout
  assert {'report.md', 'results.csv', 'curves.png'} <= {p.name for p in remote.iterdir()}
  missing = subprocess.run(
      [sys.executable, '-m', 'densenet_jax.experiments.report', f'--workdir={bucket}/nothing'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  assert missing.returncode != 0 and 'no such directory' in missing.stdout
  assert no_local_gs_folder()
