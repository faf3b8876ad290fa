"""Each command-line tool run as the README and docs write it, at the smallest size that still
exercises it, and the bad arguments a user is likely to give refused in one line that names
them, without a traceback.

Commands that other files already run are not repeated here: train.py (test_training.py,
test_buckets.py), summary (test_summary.py), convert (test_convert.py), the sweep's local,
print and --parallel launchers (test_sweep.py, test_sweep_store.py, test_parallel.py), the
report (test_sweep_store.py) and ab.py (test_benchmarks.py). Every process costs seconds of
imports (JAX; TensorFlow too for train.py and the sweep), so each bad argument here is one a
user is likely to give and that takes its own path through the tool.
benchmarks/input_pipeline.py is only refused here, not run: its smallest run takes about 30 s on
2 cores, and test_benchmarks.py runs its data writer, measurement and table in-process.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# absl's and XLA's log lines ('I1207 04:00:15.031565 ... xla_bridge.py:849] ...') and the hint
# absl prints after its own flag errors: around the message, not part of it.
_NOT_THE_MESSAGE = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d|Pass --helpshort or --helpfull')


def command(*args, timeout=600):
  """`python ARGS...` run in the repository root as the docs write it, on one CPU device."""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags.with_devices(1))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def succeeded(*args):
  proc = command(*args)
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
  return proc


# input_pipeline.py at its smallest, so that a bad argument it stopped accepting fails soon.
SMALL_INPUT = ['--cache_dir={tmp}/cache', '--num_images=4', '--num_classes=2', '--rounds=1',
               '--torch=False']

# Each: the command's arguments ('{tmp}': a fresh empty directory), and what its one line must
# say: the flag, field or file, and what was expected. The sizes are small where a command
# that no longer refused the argument would go on to measure or train.
BAD_ARGUMENTS = {
    'train-missing-config': (
        ['train.py', '--config=configs/nosuch.py', '--workdir={tmp}/run'],
        ['Config error: --config=configs/nosuch.py: no such file']),
    'sweep-not-a-sweep-config': (
        ['-m', 'densenet_jax.experiments.sweep', '--config=configs/quickstart.py',
         '--workdir={tmp}/sweep'],
        ['configs/quickstart.py has no get_sweep', 'not a sweep config']),
    'sweep-slurm-without-a-cluster': (
        ['-m', 'densenet_jax.experiments.sweep',
         '--config=configs/ablations/growth_compression.py:cpu', '--workdir={tmp}/sweep',
         '--launcher=slurm'],
        ['--launcher=slurm', 'srun is not on the PATH']),
    'summary-name-without-flag': (
        ['-m', 'densenet_jax.tools.summary', 'densenet169'],
        ["unexpected arguments ['densenet169']", '--model=NAME']),
    'summary-image-too-small': (
        ['-m', 'densenet_jax.tools.summary', '--model=densenet121', '--image_size=8'],
        ['--image_size=8', 'densenet121 needs at least 32 pixels']),
    'convert-missing-source': (
        ['-m', 'densenet_jax.tools.convert', '--source={tmp}/densenet121.pth',
         '--model=densenet121', '--output={tmp}/out'],
        ['densenet121.pth: no such file']),
    'convert-output-under-a-file': (
        ['-m', 'densenet_jax.tools.convert', '--source={tmp}/densenet121.pth',
         '--model=densenet121', '--output=/dev/null/converted'],
        ['--output=/dev/null/converted: /dev/null is a file, not a directory']),
    'convert-unknown-model': (
        ['-m', 'densenet_jax.tools.convert', '--source={tmp}/densenet121.pth',
         '--model=densenet122', '--output={tmp}/out'],
        ['--model=densenet122', 'densenet121|densenet161']),
    'feature-reuse-no-checkpoint': (
        ['-m', 'densenet_jax.experiments.feature_reuse', '--workdir={tmp}/run',
         '--output={tmp}/reuse.png'],
        ['run/checkpoints: no checkpoint']),
    'feature-reuse-missing-output': (
        ['-m', 'densenet_jax.experiments.feature_reuse', '--workdir={tmp}/run'],
        ['--output', 'must have a value']),
    'report-missing-workdir': (
        ['-m', 'densenet_jax.experiments.report', '--workdir={tmp}/sweep'],
        ['report: --workdir=', 'sweep: no such directory']),
    'throughput-unknown-flag': (
        ['benchmarks/throughput.py', '--step=8'],
        ["Unknown command line flag 'step'", 'Did you mean: steps']),
    'throughput-case-format': (
        ['benchmarks/throughput.py', '--cases=densenet121:8'],
        ['--cases=densenet121:8', 'expected MODEL:BATCH:DTYPE:MODE']),
    'throughput-unknown-model': (
        ['benchmarks/throughput.py', '--cases=densenet12:8:float32:std-scan1', '--torch=False'],
        ['--cases=densenet12:8:float32:std-scan1', "Unknown model name 'densenet12'"]),
    'memory-resnet': (
        ['benchmarks/memory.py', '--model=resnet50'],
        ['--model=resnet50', "['memory_efficient', 'scan_segments']"]),
    'devices-not-counts': (
        ['benchmarks/devices.py', '--devices=1,two'],
        ['--devices=1,two', 'expected positive integers']),
    'devices-uneven-batch': (
        ['benchmarks/devices.py', '--model=resnet110', '--batch_size=3', '--devices=1,2',
         '--rounds=1', '--steps=1'],
        ['--batch_size=3', "not a multiple of --devices ['2']"]),
    'ab-family-without-depth': (
        ['benchmarks/ab.py', '--model=densenet_bc'],
        ['--model=densenet_bc', 'needs depth= and growth_rate=']),
    'input-pipeline-cores': (
        ['benchmarks/input_pipeline.py', '--cores=1,2,four', *SMALL_INPUT],
        ['--cores=1,2,four', 'expected positive integers']),
    'input-pipeline-sources': (
        ['benchmarks/input_pipeline.py', '--sources=folder,imagenet', *SMALL_INPUT],
        ['--sources=folder,imagenet', "['imagenet'] unknown"]),
}


@pytest.mark.parametrize('case', sorted(BAD_ARGUMENTS))
def test_bad_argument_is_one_line_and_writes_nothing(case, tmp_path):
  if case == 'sweep-slurm-without-a-cluster' and shutil.which('srun'):
    pytest.skip('srun is here: a SLURM cluster, where --launcher=slurm is right')
  args, expected = BAD_ARGUMENTS[case]
  proc = command(*(a.replace('{tmp}', str(tmp_path)) for a in args))
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert 'Traceback (most recent call last)' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines()
           if line.strip() and not _NOT_THE_MESSAGE.match(line)]
  assert len(lines) == 1, proc.stderr[-3000:]
  for part in expected:
    assert part in lines[0], lines[0]
  assert not os.listdir(tmp_path)   # Refused before anything was written.


def test_feature_reuse_draws_a_run(tmp_path):
  """docs/ablations.md's command on a run's latest checkpoint (written here, not trained: only
  the shapes of a DenseNet's parameters matter to the figure)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from densenet_jax.models import create_model
  model = create_model('densenet_bc', depth=16, growth_rate=4, num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'run' / 'checkpoints' / '10' / 'state', {'params': params})
  checkpointer.wait_until_finished()
  figure = tmp_path / 'reuse.png'
  proc = succeeded('-m', 'densenet_jax.experiments.feature_reuse',
                   f'--workdir={tmp_path / "run"}', f'--output={figure}')
  assert f'Wrote {figure}' in proc.stdout
  assert figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and figure.stat().st_size > 10_000


def test_throughput_measures_the_smallest_case(tmp_path):
  """The README's benchmark at its smallest: one case, of the model it takes that compiles
  soonest, and one timed step; the case runs in a worker process and comes back as a table row
  and JSON."""
  out, table = tmp_path / 'out.json', tmp_path / 'out.md'
  proc = succeeded('benchmarks/throughput.py', '--cases=resnet110:2:float32:std-scan1',
                   '--steps=1', '--torch=False', f'--json={out}', f'--markdown={table}')
  [row] = json.loads(out.read_text())
  assert (row['model'], row['batch'], row['mode']) == ('resnet110', 2, 'std-scan1')
  assert 'error' not in row['jax'] and 'torch' not in row, row
  assert row['jax']['train_ips'] > 0 and row['jax']['infer_ips'] > 0
  assert row['jax']['compile_s'] > 0 and row['jax']['temp_mib'] > 0
  assert '| resnet110 | 2 | float32 | std-scan1 |' in table.read_text()
  assert table.read_text() in proc.stdout


def test_memory_compiles_both_modes_of_the_smallest_model():
  """docs/performance.md's memory.py at its smallest: both modes of densenet40_k12 compiled
  (nothing run), one JSON row each, then their ratio."""
  proc = succeeded('benchmarks/memory.py', '--model=densenet40_k12', '--batch_size=2',
                   '--image_size=8')
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert [r['memory_efficient'] for r in rows] == [False, True], proc.stdout
  for row in rows:
    assert (row['model'], row['batch_size'], row['image_size']) == ('densenet40_k12', 2, 8)
    assert row['compile_s'] > 0 and row['temp_mib'] > 0 and row['argument_mib'] > 0
  ratio = rows[1]['temp_mib'] / rows[0]['temp_mib']
  assert proc.stdout.rstrip().endswith(f'memory-efficient / standard temp: {ratio:.3f}')


def test_devices_compares_device_counts(tmp_path):
  """docs/performance.md's devices.py at one device count and one round: the worker process it
  starts, and its table and JSON. (Its train step is the one throughput.py compiled just before,
  found in the run's compilation cache.)"""
  out = tmp_path / 'devices.json'
  proc = succeeded('benchmarks/devices.py', '--model=resnet110', '--batch_size=2',
                   '--devices=1', '--rounds=1', '--steps=1', f'--json={out}')
  [(name, speeds)] = json.loads(out.read_text()).items()
  assert name == 'this checkout / 1' and len(speeds) == 1 and speeds[0] > 0
  assert 'round 1: this checkout, 1 device(s):' in proc.stdout
  assert re.search(r'\| this checkout \| 1 \| \d+ \| [\d.]+ \| 1\.00x \|', proc.stdout)
