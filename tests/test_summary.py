"""`python -m densenet_jax.tools.summary`, as the README writes it: tables for every kind of model,
one line for a bad argument."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(*args):
  return subprocess.run([sys.executable, '-m', 'densenet_jax.tools.summary', *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, timeout=300)


@pytest.mark.parametrize('args, total, first_row', [
    (['--model=densenet121'], '7,978,856', '| stem_conv | (1, 112, 112, 64) | 9,408 |'),
    (['--model=densenet_bc', '--depth=250', '--growth_rate=24'], '15,324,406',
     '| stem_conv | (1, 32, 32, 48) |'),
    (['--model=preact_resnet_cifar', '--depth=164'], '1,703,258', None),
])
@pytest.mark.slow
def test_summary_prints_every_stage(args, total, first_row):
  result = summary(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| **total** |' in result.stdout and f'**{total}**' in result.stdout
  if first_row:
    assert first_row in result.stdout
  assert 'GMACs per' in result.stdout


def test_bad_model_is_one_line():
  for args, match in ((['--model=nosuch'], "Unknown model name 'nosuch'"),
                      (['--model=densenet_bc', '--depth=11', '--growth_rate=12'],
                       'depth=11 does not fit DenseNet-BC')):
    result = summary(*args)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'summary: {args[0]}: ') and match in last, result.stderr[-2000:]
