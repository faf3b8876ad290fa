"""`--parallel`: several sweep points at once, each on devices of its own (GPUs, TPU chips, CPU
cores). GPU and TPU layouts are checked on the environments the launcher gives; CPU for real."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from densenet_jax.experiments import parallel
from densenet_jax.experiments import plan
from densenet_jax.training import records
from tests.test_sweep import ROOT
from tests.test_sweep import run_sweep
import xla_flags

CORES = sorted(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(len(CORES) < 2, reason='needs 2 CPU cores')

# The tests' tiny quickstart; get_config appends what the process that evaluates it sees (its
# pid, affinity, thread variables, the time) to $PARALLEL_TEST_RECORD: train.py evaluates it
# inside each point's own process. ARG: steps, with one checkpoint and eval at the end.
RECORDING_CONFIG = textwrap.dedent('''
    import json, os, time
    from densenet_jax.experiments import hyper
    from tests.test_training import tiny_config

    def get_config(arg=None):
      if os.environ.get('PARALLEL_TEST_RECORD'):
        with open(os.environ['PARALLEL_TEST_RECORD'], 'a') as f:
          f.write(json.dumps({'pid': os.getpid(), 'cores': sorted(os.sched_getaffinity(0)),
                              'omp': os.environ.get('OMP_NUM_THREADS'),
                              'time': time.time()}) + '\\n')
      if arg is None:
        return tiny_config()
      steps = int(arg)
      return tiny_config(num_train_steps=steps, checkpoint_every_steps=steps,
                         eval_every_steps=steps)

    def get_sweep(arg=None):
      return hyper.sweep('model.growth_rate', [4, 6])
''')

# A stand-in for train.py: writes what its process was given as its results.json (so the point
# counts as done), or fails when its workdir's name says so.
FAKE_POINT = textwrap.dedent('''
    import json, os, sys, time
    start = time.time()
    time.sleep(0.6)
    if 'fail' in sys.argv[1]:
      sys.exit('the point broke')
    variables = ('CUDA_VISIBLE_DEVICES', 'TPU_VISIBLE_CHIPS', 'TPU_CHIPS_PER_PROCESS_BOUNDS',
                 'TPU_PROCESS_BOUNDS', 'TPU_PROCESS_PORT', 'TPU_PROCESS_ADDRESSES',
                 'ALLOW_MULTIPLE_LIBTPU_LOAD', 'OMP_NUM_THREADS', 'XLA_PYTHON_CLIENT_PREALLOCATE')
    with open(os.path.join(sys.argv[1], 'results.json'), 'w') as f:
      json.dump({'env': {v: os.environ.get(v) for v in variables}, 'start': start,
                 'end': time.time(), 'cores': sorted(os.sched_getaffinity(0))}, f)
''')


@pytest.mark.parametrize('platform,count', [('gpu', 8), ('tpu', 4)])
def test_slots_split_the_devices_without_overlap(platform, count):
  for points, per_point in [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2), (2, None)]:
    if points * (per_point or 1) > count:
      with pytest.raises(parallel.ParallelError, match=f'--parallel={points} x '):
        parallel.device_slots(platform, range(count), points, per_point)
      continue
    slots = parallel.device_slots(platform, range(count), points, per_point)
    k = per_point or count // points
    assert len(slots) == points and all(len(s.devices) == k for s in slots)
    taken = [d for s in slots for d in s.devices]
    assert len(taken) == len(set(taken)) and set(taken) <= {str(i) for i in range(count)}
    envs = [parallel.slot_environment(s) for s in slots]
    if platform == 'gpu':
      assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == [
          ','.join(str(i * k + j) for j in range(k)) for i in range(points)]
      assert all(e.keys() == {'CUDA_VISIBLE_DEVICES'} for e in envs)  # Preallocation as is.
      assert all(s.jax_devices == k for s in slots)
    else:
      assert [e['TPU_VISIBLE_CHIPS'] for e in envs] == [
          ','.join(str(i * k + j) for j in range(k)) for i in range(points)]
      assert {e['TPU_CHIPS_PER_PROCESS_BOUNDS'] for e in envs} == {
          {1: '1,1,1', 2: '1,2,1'}[k]}
      assert {e['TPU_PROCESS_BOUNDS'] for e in envs} == {'1,1,1'}
      ports = [e['TPU_PROCESS_PORT'] for e in envs]
      assert len(set(ports)) == points
      assert [e['TPU_PROCESS_ADDRESSES'] for e in envs] == [f'localhost:{p}' for p in ports]
      assert {e['ALLOW_MULTIPLE_LIBTPU_LOAD'] for e in envs} == {'1'}
  # v2/v3: two JAX devices per chip.
  assert parallel.device_slots('tpu', range(4), 2, 2, jax_devices_per_device=2)[0].jax_devices == 4
  # The host's cores are shared out too, when each slot can have some.
  slots = parallel.device_slots(platform, range(count), 2, 1, cores=range(16))
  assert [s.cores for s in slots] == [tuple(range(8)), tuple(range(8, 16))]
  assert parallel.slot_environment(slots[1])['OMP_NUM_THREADS'] == '8'
  assert slots[1].label().endswith('(of 0-%d), cpu cores 8-15' % (count - 1))


def test_cpu_slots_are_core_groups():
  slots = parallel.device_slots('cpu', [0, 1, 2, 3, 8, 9], 3, None, jax_devices_per_device=1)
  assert [s.cores for s in slots] == [(0, 1), (2, 3), (8, 9)]
  assert slots[2].label() == 'cpu cores 8-9 (of 0-3,8-9)'
  env = parallel.slot_environment(slots[0])
  assert env == {'OMP_NUM_THREADS': '2', 'TF_NUM_INTRAOP_THREADS': '2',
                 'TF_NUM_INTEROP_THREADS': '2'}
  assert parallel.device_slots('cpu', [0, 1], 2, None)[0].label() == 'cpu cores 0 (of 0-1)'
  record = slots[0].record()
  assert record['platform'] == 'cpu' and record['cores'] == [0, 1]


@pytest.mark.slow
def test_bad_flags_are_one_line_errors(sweep_file, tmp_path):
  cases = [(('cpu', range(2), 0, None), '--parallel=0: must be at least 1'),
           (('cpu', range(2), 2, 0), '--devices_per_point=0: must be at least 1'),
           (('cpu', range(2), 2, 2), r'--parallel=2 x --devices_per_point=2 needs 4 CPU cores, '
                                     r'but this host has 2 \(0-1\)'),
           (('gpu', range(8), 3, 3), '--parallel=3 x --devices_per_point=3 needs 9 GPUs'),
           (('tpu', range(4), 1, 3), '--devices_per_point=3: a TPU point takes 1, 2, 4 or 8'),
           (('metal', range(1), 1, 1), "platform here is 'metal'; only gpu, tpu and cpu")]
  for args, match in cases:
    with pytest.raises(parallel.ParallelError, match=match) as raised:
      parallel.device_slots(*args)
    assert '\n' not in str(raised.value)
  # From the command line: before anything runs, and nothing written. (A process costs seconds
  # of imports: the case here is the one only the command line checks, the launcher's.)
  result = run_sweep(sweep_file, tmp_path / 'cli', '--parallel=2', '--launcher=print')
  assert result.returncode != 0 and 'Sweep flag error: ' in result.stdout
  assert 'are for --launcher=local, not --launcher=print' in result.stdout, result.stdout[-2000:]
  assert not os.path.exists(tmp_path / 'cli')


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / 'recording_sweep.py'
  path.write_text(RECORDING_CONFIG)
  return str(path)


def _fake_sweep(tmp_path, names):
  points = [plan.Point(i, name, {}) for i, name in enumerate(names)]
  built = plan.Sweep('fake.py', str(tmp_path / 'fake'), points, {})
  os.makedirs(built.workdir)
  built.command = lambda p: [sys.executable, '-c', FAKE_POINT, built.point_workdir(p)]
  return built


@pytest.mark.parametrize('platform,count,points,per_point', [('gpu', 8, 4, 2), ('tpu', 4, 2, 2),
                                                            ('gpu', 8, 8, 1)])
def test_launcher_gives_each_running_point_its_own_devices(tmp_path, caplog, platform, count,
                                                           points, per_point):
  caplog.set_level('INFO')
  slots = parallel.device_slots(platform, range(count), points, per_point, cores=CORES)
  names = [f'p{i}' for i in range(points + 2)] + ['fail']   # More points than slots.
  built = _fake_sweep(tmp_path, names)
  failed = parallel.run_parallel(built, slots, poll_seconds=0.2)
  assert [p.name for p in failed] == ['fail'] and 'the point broke' in failed[0].error
  ran = {}
  for point in built.points[:-1]:
    assert point.state == 'done'
    with open(os.path.join(built.point_workdir(point), 'results.json')) as f:
      ran[point.name] = json.load(f)
    log = open(os.path.join(built.point_workdir(point), 'train.log')).read()
    assert log.startswith(f'\n# devices: {point.devices["label"]}\n$ ')
  variable = 'CUDA_VISIBLE_DEVICES' if platform == 'gpu' else 'TPU_VISIBLE_CHIPS'
  for a in ran.values():
    assert len(a['env'][variable].split(',')) == per_point
    assert a['env']['XLA_PYTHON_CLIENT_PREALLOCATE'] is None
    if platform == 'tpu':
      assert a['env']['TPU_PROCESS_ADDRESSES'] == f'localhost:{a["env"]["TPU_PROCESS_PORT"]}'
    for b in ran.values():   # Points running at the same time share no device nor core.
      if a is not b and a['start'] < b['end'] and b['start'] < a['end']:
        assert not set(a['env'][variable].split(',')) & set(b['env'][variable].split(','))
        if len(CORES) >= points:
          assert not set(a['cores']) & set(b['cores'])
  assert sum(1 for a in ran.values() for b in ran.values()
             if a['start'] < b['start'] < a['end']) >= points - 1   # They did overlap.
  progress = [r.getMessage() for r in caplog.records if f'[{variable}=' in r.getMessage()]
  assert progress and all(re.search(r'Point \d+/\d+ .*ETA', m) for m in progress)
  saved = json.loads(open(os.path.join(built.workdir, 'sweep.json')).read())
  assert [p['state'] for p in saved['points']] == ['done'] * (points + 2) + ['failed']


def _train_children(parent):
  """{pid: (its point: the last part of its --workdir, {each thread's Cpus_allowed_list})} of
  `parent`'s train.py children, as /proc has them now."""
  found = {}
  for stat in glob.glob('/proc/[0-9]*/stat'):
    pid = int(stat.split('/')[2])
    try:
      with open(stat) as f:
        if int(f.read().rsplit(')', 1)[1].split()[1]) != parent:
          continue
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        args = f.read().decode().split('\0')
      if not any(a.endswith('train.py') for a in args):
        continue
      workdir = next(a for a in args if a.startswith('--workdir='))
      allowed = set()
      for status in glob.glob(f'/proc/{pid}/task/*/status'):
        with open(status) as f:
          allowed |= {line.split(':')[1].strip() for line in f
                      if line.startswith('Cpus_allowed_list:')}
      found[pid] = os.path.basename(workdir), allowed
    except (OSError, IndexError, ValueError, StopIteration):  # It ended meanwhile.
      continue
  return found


def _start_sweep(config_arg, workdir, record, *extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(1),
             PYTHONPATH=ROOT, PARALLEL_TEST_RECORD=str(record))
  return subprocess.Popen(
      [sys.executable, '-m', 'densenet_jax.experiments.sweep', f'--config={config_arg}',
       f'--workdir={workdir}', '--poll_seconds=2', '--parallel=2', *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(path, sweep_pid):
  """The first record of each point's process (the sweep's own left out)."""
  with open(path) as f:
    by_pid = {}
    for r in map(json.loads, f):
      by_pid.setdefault(r['pid'], r)
  return [r for pid, r in by_pid.items() if pid != sweep_pid]


@pytest.mark.slow
@needs_two_cores
def test_two_points_train_at_once_each_on_its_own_core_and_stop_together(sweep_file, tmp_path):
  """Two points run at once, each process (every thread of it) on one core, not the other's;
  SIGTERM to the sweep stops both with a checkpoint, and the rerun resumes both from it."""
  steps = 300   # Long enough that neither point ends before both are stopped.
  config_arg, workdir, record = f'{sweep_file}:{steps}', tmp_path / 'sweep', tmp_path / 'rec'
  names = ['growth_rate=4', 'growth_rate=6']
  proc = _start_sweep(config_arg, workdir, record, '--report=False')
  deadline = time.time() + 600
  seen, together, paused = {}, False, set()
  try:
    while time.time() < deadline and proc.poll() is None:   # Both past their first log step.
      children = _train_children(proc.pid)
      together |= len(children) == 2
      for pid, (_, allowed) in children.items():
        seen.setdefault(pid, set()).update(allowed)
      progress = {n: (records.read_json(workdir / n / 'progress.json') or {}).get('step', 0)
                  for n in names}
      if together and min(progress.values()) >= 4:
        break
      # A point that compiled first could finish all its steps while the other still compiles
      # on a loaded machine: it waits, stopped, for the other (SIGCONT below, then SIGTERM).
      for pid, (name, _) in children.items():
        if pid not in paused and progress[name] >= 4:
          try:
            os.kill(pid, signal.SIGSTOP)
            paused.add(pid)
          except OSError:  # It ended meanwhile: the assertions below say how.
            pass
      time.sleep(0.2)
  finally:
    for pid in paused:
      os.kill(pid, signal.SIGCONT)
  assert proc.poll() is None, proc.stdout.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0 and 'Sweep stopped by SIGTERM' in out, out[-3000:]
  assert together, 'the two points never ran at the same time'
  assert sorted(map(sorted, seen.values())) == [['0'], ['1']], seen
  inside = _records(record, proc.pid)
  assert sorted(r['cores'] for r in inside) == [[0], [1]] and len(inside) == 2, inside
  assert {r['omp'] for r in inside} == {'1'}
  assert '[cpu cores ' in out
  state = json.loads((workdir / 'sweep.json').read_text())
  assert [p['state'] for p in state['points']] == ['interrupted', 'interrupted']
  assert sorted(p['devices']['cores'] for p in state['points']) == [[0], [1]]
  stopped = {}
  for point in state['points']:
    name = point['name']
    log = (workdir / name / 'train.log').read_text()
    assert log.startswith(f'\n# devices: {point["devices"]["label"]}\n')
    assert re.match(r'cpu cores [01] \(of 0-1\)', point['devices']['label'])
    stopped[name] = int(re.search(r'Stopped by SIGTERM after saving step (\d+)', log).group(1))
    assert 4 <= stopped[name] < steps
    assert (workdir / name / 'checkpoints' / str(stopped[name])).is_dir()

  rerun = run_sweep(config_arg, workdir, '--parallel=2', '--report=False')
  assert rerun.returncode == 0, rerun.stdout[-3000:]
  assert 'Point 2/2' in rerun.stdout and 'ETA' in rerun.stdout
  state = json.loads((workdir / 'sweep.json').read_text())
  assert [p['state'] for p in state['points']] == ['done', 'done']
  for name in names:
    assert json.loads((workdir / name / 'results.json').read_text())['step'] == steps
    resumed = (workdir / name / 'train.log').read_text().rsplit('# devices:', 1)[1]
    assert f'Restored checkpoint of step {stopped[name]} ' in resumed   # Not started over.
