"""The benchmarks run: ab.py on a tiny model (and rejects bad variants), throughput.py's table,
input_pipeline.py's generated JPEGs and one short measurement."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AB = os.path.join(ROOT, 'benchmarks', 'ab.py')
TINY = ['--model=densenet_bc', '--overrides=depth=10,growth_rate=4', '--batch_size=2']


def _ab(*args):
  env = dict(os.environ, XLA_FLAGS=xla_flags.FAST_COMPILE, DENSENET_JAX_HUGEPAGES='0')
  return subprocess.run([sys.executable, AB, *TINY, *args], capture_output=True, text=True,
                        env=env, timeout=600, check=False)


@pytest.mark.slow
def test_ab_times_every_variant_against_the_first(tmp_path):
  out = tmp_path / 'ab.json'
  proc = _ab('--variants=scan_chunk=64;scan_chunk=4,memory_efficient=True', '--steps=2',
             f'--json={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(out.read_text())
  assert [r['variant'] for r in results] == ['scan_chunk=64',
                                             'scan_chunk=4,memory_efficient=True']
  assert results[0]['ratio'] == 1.0
  for r in results:
    assert r['median_ms'] >= r['min_ms'] > 0 and r['temp_mib'] > 0
  assert '| scan_chunk=4,memory_efficient=True |' in proc.stdout


@pytest.mark.slow
def test_ab_in_fresh_processes_gives_each_round_its_ratio(tmp_path):
  out = tmp_path / 'ab.json'
  proc = _ab('--variants=;dtype=bfloat16', '--steps=1', '--processes=2', f'--json={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(out.read_text())
  assert [r['variant'] for r in results] == ['(as named)', 'dtype=bfloat16']
  assert results[0]['ratio'] == [1.0, 1.0]
  assert len(results[1]['median_ms']) == 2 and all(m > 0 for m in results[1]['median_ms'])
  assert 'round 2:' in proc.stdout and '| dtype=bfloat16 |' in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize('processes', [0, 2])
def test_ab_rejects_a_bad_variant_before_compiling(processes):
  proc = _ab('--variants=scan_chunk=64;scan_chunk=0', f'--processes={processes}')
  assert proc.returncode != 0
  assert 'scan_chunk' in proc.stderr and 'compiled' not in proc.stdout
  assert 'round' not in proc.stdout
  proc = _ab('--variants=growth=4', f'--processes={processes}')
  assert proc.returncode != 0 and 'growth' in proc.stderr


def _throughput_module():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import throughput  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return throughput


def _row(dtype, jax_result, torch_result=None):
  row = dict(model='densenet121', batch=64, dtype=dtype, mode='std-scan1', jax=jax_result)
  if torch_result:
    row['torch'] = torch_result
  return row


def test_throughput_table_adds_device_memory_only_where_a_device_reported_it():
  throughput = _throughput_module()
  jax_cpu = dict(train_ips=6.0, infer_ips=20.0, compile_s=14.0, temp_mib=416.0,
                 peak_rss_mib=2200.0, peak_device_mib=None, device='cpu')
  torch_cpu = dict(train_ips=5.0, infer_ips=21.0, peak_rss_mib=2000.0, peak_device_mib=None,
                   device='cpu')
  table = throughput.markdown_table([_row('float32', jax_cpu, torch_cpu)])
  head, _, row = table.splitlines()[:3]
  assert 'device MiB' not in head
  assert row.endswith('| 5.00 / 21.00, 2000 | 1.20x |')
  assert head.count('|') == row.count('|')

  jax_gpu = dict(jax_cpu, peak_device_mib=2039.0, device='H100')
  torch_gpu = dict(torch_cpu, peak_device_mib=8960.0, device='H100')
  failed = dict(error='Traceback ...\nRuntimeError: out of memory')
  table = throughput.markdown_table([_row('float32', jax_gpu, torch_gpu),
                                     _row('bfloat16', failed),
                                     _row('float32', jax_gpu, failed)])
  head, _, ok, error, torch_error = table.splitlines()[:5]
  assert '| peak device MiB |' in head and 'device MiB | train ratio |' in head
  assert '| 2200 | 2039 | 5.00 / 21.00, 8960 | 1.20x |' in ok
  assert '| error: RuntimeError: out of memory |' in error
  assert '| error: RuntimeError: out of memory |  |' in torch_error
  for line in (ok, error, torch_error):
    assert line.count('|') == head.count('|'), line
  assert 'jax on H100; torch on H100' in table


def test_throughput_resnet_cases_and_torch_counterparts():
  """The ResNet cases parse, and the torch models beside them are ours, parameter for
  parameter (the benchmark itself is not run here)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  import pytest
  from densenet_jax.models import create_model
  torch = pytest.importorskip('torch')
  throughput = _throughput_module()
  assert throughput.model_options('resnet50', 'std-scan1') == {'scan_blocks': True}
  assert throughput.model_options('resnet110', 'std') == {'scan_blocks': False}
  with pytest.raises(ValueError, match="mode 'eff' for ResNet resnet50"):
    throughput.model_options('resnet50', 'eff')
  for name in ('resnet50', 'resnet110'):
    model, size = throughput._torch_model(name, 'std')  # pylint: disable=protected-access
    ours = create_model(name)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    params = jax.eval_shape(ours.init, jax.random.key(0), images)['params']
    assert sum(p.numel() for p in model.parameters()) == sum(
        int(np.prod(p.shape)) for p in jax.tree.leaves(params)), name
  with torch.no_grad():
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _input_benchmark():
  """benchmarks/input_pipeline.py, its flags in a FlagValues of their own: its --torch, --json and
  --markdown are throughput.py's names too, and both are loaded in this process."""
  import absl  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  private = flags.FlagValues()
  spec = importlib.util.spec_from_file_location(
      'input_pipeline_benchmark', os.path.join(ROOT, 'benchmarks', 'input_pipeline.py'))
  bench = importlib.util.module_from_spec(spec)
  with pytest.MonkeyPatch.context() as patch:  # Only while the module defines its flags.
    patch.setattr(absl, 'flags', types.SimpleNamespace(**{
        name: functools.partial(getattr(flags, name), flag_values=private)
        for name in ('DEFINE_string', 'DEFINE_integer', 'DEFINE_bool', 'DEFINE_list')}))
    spec.loader.exec_module(bench)
  return bench


def test_input_pipeline_benchmark_writes_data_and_measures_ours(tmp_path):
  bench = _input_benchmark()
  data = bench.write_data(str(tmp_path), num_images=4, num_classes=2)
  assert bench.write_data(str(tmp_path), num_images=4, num_classes=2) == data  # Cached.
  files = [f for _, _, names in os.walk(data['folder']) for f in names]
  assert len(files) == 4 and data['mean_jpeg_kib'] > 20  # Photo-like sizes, not flat colour.
  # One source keeps this short; tests/test_preprocessing.py covers the folder's training path.
  rates = bench.measure_ours('tfds', data, batch_size=2, epochs=1)
  assert all(rate > 0 for k in ('train', 'eval') for rate in rates[k].values())
  torch = {k: {'wall': rates[k]['wall'] / 2, 'cpu': 1.0} for k in ('train', 'eval')}
  table = bench.table([dict(pipeline='ours-tfds', cores=1, **rates),
                       dict(pipeline='torchvision', cores=1, **torch)])
  assert '| ours-tfds | 1 |' in table and '| 2.00x, 2.00x |' in table
