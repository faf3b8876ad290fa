"""Sweeps on scikit-learn's digits: points, their checks, the launchers, what the report counts.

A whole sweep (a failing point, reruns, the tables and figures) runs in test_sweep_store.py, on
gs://, and on a local disk with several points at once in test_parallel.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from densenet_jax.experiments import feature_reuse
from densenet_jax.experiments import hyper
from densenet_jax.experiments import launchers
from densenet_jax.experiments import plan
from densenet_jax.experiments import report
from densenet_jax.models import complexity
from densenet_jax.models import create_model
from densenet_jax.models import family
from densenet_jax.training import trainer
import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' quickstart shrunk to seconds (L=10, k=4, 12 steps), with a schedule that a point
# can make diverge: lr_decay_factor=1e30 multiplies the learning rate by 1e30 after 4 steps.
SWEEP_CONFIG = textwrap.dedent('''
    from densenet_jax.experiments import hyper
    from tests.test_training import tiny_config

    def get_config(arg=None):
      return tiny_config(lr_decay_at=(0.3,))

    def get_sweep(arg=None):
      if arg == 'diverging':
        return hyper.zipped(hyper.sweep('model.growth_rate', [4, 6, 4]),
                            hyper.sweep('lr_decay_factor', [0.1, 0.1, 1e30]))
      if arg == 'invalid':
        return hyper.sweep('model.depth', [10, 11])
      if arg == 'typo':
        return [{'model.growth_rate': 4}, {'model.growth_rte': 6}]
      if arg == 'none':   # a valid config, but no flag sets a float field to None
        return [{'model.growth_rate': 4}, {'model.dropout_rate': None}]
      return hyper.sweep('model.growth_rate', [4, 6])
''')


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / 'tiny_sweep.py'
  path.write_text(SWEEP_CONFIG)
  return str(path)


def run_sweep(config_arg, workdir, *extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(1), PYTHONPATH=ROOT)
  return subprocess.run(
      [sys.executable, '-m', 'densenet_jax.experiments.sweep', f'--config={config_arg}',
       f'--workdir={workdir}', '--poll_seconds=2', *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      timeout=900)


def test_helpers_make_products_and_zips():
  points = hyper.product(hyper.sweep('model.growth_rate', [12, 24]),
                         hyper.sweep('model.compression', [0.5, 1.0]))
  assert points == [{'model.growth_rate': 12, 'model.compression': 0.5},
                    {'model.growth_rate': 12, 'model.compression': 1.0},
                    {'model.growth_rate': 24, 'model.compression': 0.5},
                    {'model.growth_rate': 24, 'model.compression': 1.0}]
  assert hyper.zipped(hyper.sweep('model.depth', [40, 100]),
                      hyper.sweep('model.growth_rate', [12, 24])) == [
                          {'model.depth': 40, 'model.growth_rate': 12},
                          {'model.depth': 100, 'model.growth_rate': 24}]
  with pytest.raises(ValueError, match='equal lengths'):
    hyper.zipped(hyper.sweep('a.b', [1, 2]), hyper.sweep('a.c', [1]))
  with pytest.raises(ValueError, match='more than one'):
    hyper.product(hyper.sweep('a.b', [1]), hyper.sweep('a.b', [2]))
  assert plan.point_names(points)[1] == 'growth_rate=12,compression=1.0'
  # Fields with the same last component keep their dotted names; constant fields are left out.
  assert plan.point_names([{'a.x': 1, 'b.x': 2, 'c': 0}, {'a.x': 3, 'b.x': 4, 'c': 0}]) == [
      'a.x=1,b.x=2', 'a.x=3,b.x=4']
  with pytest.raises(plan.SweepError, match='repeated points'):
    plan.point_names([{'a': 1}, {'a': 1}])


def test_ablation_configs_declare_their_studies():
  from configs.ablations import growth_compression  # pylint: disable=g-import-not-at-top
  from configs.ablations import variants  # pylint: disable=g-import-not-at-top
  full = growth_compression.get_sweep()
  assert len(full) == 12 and len(growth_compression.get_sweep('cpu')) == 4
  assert {p['model.compression'] for p in full} == {0.25, 0.5, 0.75, 1.0}
  points = variants.get_sweep('cpu')
  kinds = {(p['model.bottleneck'], p['model.compression']) for p in points}
  assert kinds == {(False, 1.0), (True, 1.0), (False, 0.5), (True, 0.5)}
  for point in points:  # Every depth fits its variant.
    config = plan.apply_overrides(variants.get_config('cpu'), point)
    create_model(config.model.name, depth=config.model.depth, growth_rate=12,
                 bottleneck=config.model.bottleneck, compression=config.model.compression)
  # DenseNet-BC against pre-activation ResNets: every point builds, under one recipe.
  from configs.ablations import densenet_vs_resnet  # pylint: disable=g-import-not-at-top
  for size, count in (('cpu', 6), (None, 5)):
    points = densenet_vs_resnet.get_sweep(size)
    assert len(points) == count
    arg = 'configs/ablations/densenet_vs_resnet.py' + (f':{size}' if size else '')
    # As each point's train.py parses its flags.
    built = [trainer.build_model(plan.parse_train_flags(
        os.path.join(ROOT, arg), plan.override_args(p)), 10) for p in points]
    assert {report.family(trainer.model_description(m)) for m in built} == {
        'DenseNet-BC', 'pre-activation ResNet'}


@pytest.mark.slow
def test_invalid_points_are_refused_before_anything_runs(sweep_file, tmp_path):
  for arg, match in (('invalid', r'Point 2 of 2 \(depth=11\): config.model: depth=11 does '
                                 'not fit DenseNet-BC'),
                     ('typo', r'Point 2 of 2 .*config.model.growth_rte=6: no such field'),
                     ('none', r'Point 2 of 2 .*train.py cannot take these flags: .*dropout_rate')):
    config = plan.load_config(f'{sweep_file}:{arg}')
    with pytest.raises(plan.SweepError, match=match):
      plan.build_sweep(f'{sweep_file}:{arg}', config, str(tmp_path / arg), {}, 1, 1)
    assert not os.path.exists(tmp_path / arg)
  result = run_sweep(f'{sweep_file}:invalid', tmp_path / 'cli')
  assert result.returncode != 0
  assert 'Sweep config error: Point 2 of 2 (depth=11)' in result.stdout
  assert not os.path.exists(tmp_path / 'cli')


@pytest.mark.slow
def test_print_and_submitit_launchers_run_a_point(sweep_file, tmp_path):
  config = plan.apply_overrides(plan.load_config(sweep_file), {'num_train_steps': 6})
  built = plan.build_sweep(sweep_file, config, str(tmp_path / 'sub'), {'num_train_steps': 6},
                            1, 1)
  command = built.command(built.points[1])
  assert command[1] == plan.TRAIN_PY and command[2] == f'--config={sweep_file}'
  assert f'--workdir={tmp_path / "sub" / "growth_rate=6"}' in command
  assert command[-2:] == ['--config.num_train_steps=6', '--config.model.growth_rate=6']

  # submitit's local executor runs the job array's tasks as local processes.
  built.points = built.points[:1]
  os.makedirs(built.workdir)
  env = dict(os.environ)
  os.environ['XLA_FLAGS'] = xla_flags.with_devices(1)
  os.environ['PYTHONPATH'] = ROOT
  try:
    failed = launchers.run_slurm(built, cluster='local', wait=True, timeout_min=10)
  finally:
    os.environ.clear()
    os.environ.update(env)
  assert not failed
  assert built.points[0].state == 'done' and built.points[0].job_id
  results = json.loads((tmp_path / 'sub' / 'growth_rate=4' / 'results.json').read_text())
  assert results['step'] == 6


def test_gmacs_match_torchvision():
  # torchvision's published `_ops` (GMACs at 224x224).
  for name, published in (('densenet121', 2.834), ('densenet169', 3.36),
                          ('densenet201', 4.291), ('densenet161', 7.728)):
    assert round(family.gmacs(create_model(name), 224), 3) == published, name


def test_gmacs_count_every_convolution_of_a_small_densenet():
  # DenseNet-BC L=10 (one layer per block), k=4, 8x8 one-channel images, by hand.
  model = create_model('densenet_bc', depth=10, growth_rate=4)  # stem 8, bottleneck 16
  stem = 9 * 1 * 8 * 64
  block1 = (8 * 16 + 9 * 16 * 4) * 64
  transition1 = 12 * 6 * 64                                    # to floor(0.5 * 12) = 6
  block2 = (6 * 16 + 9 * 16 * 4) * 16
  transition2 = 10 * 5 * 16
  block3 = (5 * 16 + 9 * 16 * 4) * 4
  classifier = 9 * 10
  assert complexity.densenet_macs(model, 8, channels=1) == (
      stem + block1 + transition1 + block2 + transition2 + block3 + classifier)


def _hand_set_params():
  """Two blocks: block 1 has input 2 maps and 2 layers of k=1 (bottleneck 3); block 2 has
  input 2 maps and 1 layer. Every weight from source s to target l is (s + 1) * (l + 1) or 10*s
  in the transition and classifier, with its sign alternating (mean |w| ignores it)."""

  def kernel(shape, sources, target):
    w = np.zeros(shape)
    for s, (a, b) in enumerate(sources):
      w[..., a:b, :] = (s + 1) * (target + 1)
    w[..., ::2] *= -1
    return {'kernel': w}

  def layer(width, l):
    sources = [(0, 2)] + [(2 + i, 3 + i) for i in range(width - 2)]
    return {'conv1': kernel((1, 1, width, 3), sources, l), 'conv2': kernel((3, 3, 3, 1),
                                                                           [(0, 3)], 0)}

  return {
      'block1': {'layer1': layer(2, 1), 'layer2': layer(3, 2)},
      'transition1': {'conv': kernel((1, 1, 4, 2), [(0, 2), (2, 3), (3, 4)], 9)},
      'block2': {'layer1': layer(2, 1)},
      'classifier': kernel((3, 10), [(0, 2), (2, 3)], 4),
  }


def test_feature_reuse_on_hand_set_weights(tmp_path):
  first, second = feature_reuse.reuse_matrices(_hand_set_params())
  nan = np.nan
  # Rows: sources 0 (block input), 1, 2; columns: layers 1, 2, then the transition.
  np.testing.assert_array_equal(first, [[2, 3, 10], [nan, 6, 20], [nan, nan, 30]])
  # Block 2: layer 1, then the classifier (last block).
  np.testing.assert_array_equal(second, [[2, 5], [nan, 10]])
  np.testing.assert_allclose(feature_reuse.normalise_columns(first),
                             [[1, 0.5, 1 / 3], [nan, 1, 2 / 3], [nan, nan, 1]])
  path = tmp_path / 'reuse.png'
  feature_reuse.plot([first, second], str(path))
  assert path.stat().st_size > 1000


def test_feature_reuse_reads_a_real_model():
  import jax  # pylint: disable=g-import-not-at-top
  model = create_model('densenet_bc', depth=16, growth_rate=4, compression=0.5)
  params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3)))['params']
  params = jax.tree.map(lambda x: np.ones(x.shape), params)
  matrices = feature_reuse.reuse_matrices(params)
  assert [m.shape for m in matrices] == [(3, 3)] * 3
  # Layer 2 reads sources 0 and 1; the transition reads all three. All weights are 1.
  assert np.isnan(matrices[0][2, 1]) and matrices[0][1, 1] == 1 and matrices[0][2, 2] == 1
