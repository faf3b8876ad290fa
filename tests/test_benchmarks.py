"""The A/B benchmark (benchmarks/ab.py) on a tiny model: it runs, and rejects bad variants."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AB = os.path.join(ROOT, 'benchmarks', 'ab.py')
TINY = ['--model=densenet_bc', '--overrides=depth=10,growth_rate=4', '--batch_size=2']


def _ab(*args):
  env = dict(os.environ, XLA_FLAGS='', DENSENET_JAX_HUGEPAGES='0')
  return subprocess.run([sys.executable, AB, *TINY, *args], capture_output=True, text=True,
                        env=env, timeout=600, check=False)


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


def test_ab_rejects_a_bad_variant_before_compiling():
  proc = _ab('--variants=scan_chunk=64;scan_chunk=0')
  assert proc.returncode != 0
  assert 'scan_chunk' in proc.stderr and 'compiled' not in proc.stdout
  proc = _ab('--variants=growth=4')
  assert proc.returncode != 0 and 'growth' in proc.stderr
