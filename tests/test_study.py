"""Studies a reviewer accepts: seeds, means with intervals, effects, provenance, figures.

The statistics are checked against values computed by hand from the textbook formulas (t
quantiles from a printed table); the report against sweep folders built here, with no training.
"""

import csv
import json
import math
import os

import pytest

from densenet_jax.experiments import figures
from densenet_jax.experiments import hyper
from densenet_jax.experiments import plan
from densenet_jax.experiments import report
from densenet_jax.experiments import statistics
from densenet_jax.runtime import provenance
from densenet_jax.training import metric_writer

# t(0.975, 2) = 4.303 and t(0.975, 4) = 2.776, from a table of Student's t.


def test_mean_and_interval_by_hand():
  result = statistics.mean_interval([60.0, 62.0, 64.0])
  assert result['mean'] == pytest.approx(62.0)
  assert result['std'] == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
  assert result['ci95'] == pytest.approx(4.303 * 2.0 / math.sqrt(3), abs=1e-3)
  one = statistics.mean_interval([61.5])
  assert one == {'mean': 61.5, 'std': None, 'ci95': None}


def test_welch_difference_by_hand():
  # Means 2 and 5, variances 1 and 1, n = 3: se = sqrt(2/3), df = 4.
  result = statistics.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
  assert result['difference'] == pytest.approx(3.0)
  assert result['df'] == pytest.approx(4.0)
  assert result['ci95'] == pytest.approx(2.776 * math.sqrt(2 / 3), abs=1e-3)
  # Unequal variances: 1 and 16, n = 3 and 3 -> df = (17/3)^2 / ((1/9 + 256/9) / 2) = 2.249.
  result = statistics.welch([1.0, 2.0, 3.0], [4.0, 8.0, 12.0])
  assert result['df'] == pytest.approx((17 / 3) ** 2 / ((1 / 9 + 256 / 9) / 2), rel=1e-9)
  assert statistics.welch([1.0], [2.0, 3.0]) is None


def test_configuration_names_drop_only_the_seed():
  assert statistics.configuration_name('growth_rate=12,compression=0.5,seed=1') == (
      'growth_rate=12,compression=0.5')
  assert statistics.configuration_name('seed=3') == 'all'
  assert statistics.configuration_name('seed_offset=3,k=2') == 'seed_offset=3,k=2'


def _run(name, top1, k, theta, seed, status='done'):
  return {'name': name, 'model.growth_rate': k, 'model.compression': theta, 'seed': seed,
          'family': 'DenseNet-BC', 'params': 1000 * k, 'gmacs': 0.01 * k, 'eval_top1': top1,
          'eval_top5': 0.9, 'eval_loss': 1.0, 'best_eval_top1': top1, 'status': status,
          '_curves': {}, '_fields': ['model.growth_rate', 'model.compression', 'seed']}


def _grid(top1):
  """Runs of a 2x2 grid, 3 seeds each; top1[(k, theta)] = three accuracies."""
  return [_run(f'growth_rate={k},compression={t},seed={s}', acc, k, t, s)
          for (k, t), accuracies in top1.items() for s, acc in enumerate(accuracies)]


def test_grouping_and_effects_on_constructed_results():
  runs = _grid({(12, 0.5): [0.60, 0.61, 0.62], (12, 1.0): [0.605, 0.625, 0.595],
                (24, 0.5): [0.70, 0.71, 0.72], (24, 1.0): [0.71, 0.70, 0.72]})
  fields = ['model.growth_rate', 'model.compression', 'seed']
  configurations = statistics.group(runs, fields)
  assert [c['name'] for c in configurations] == [
      'growth_rate=12,compression=0.5', 'growth_rate=12,compression=1.0',
      'growth_rate=24,compression=0.5', 'growth_rate=24,compression=1.0']
  first = configurations[0]
  assert first['seeds'] == 3 and 'seed' not in first
  assert first['test_error_mean'] == pytest.approx(39.0)
  assert first['test_error_std'] == pytest.approx(1.0)
  assert first['eval_top1_ci95'] == pytest.approx(4.303 * 0.01 / math.sqrt(3), abs=1e-5)
  found = {(e['field'], e['at']): e for e in statistics.effects(configurations, fields)}
  assert len(found) == 4
  k_effect = found[('model.growth_rate', 'compression=0.5')]
  assert k_effect['difference'] == pytest.approx(-10.0)  # 39 % -> 29 % error
  assert k_effect['resolved'] and k_effect['verdict'] == 'resolved'
  theta_effect = found[('model.compression', 'growth_rate=12')]
  assert theta_effect['difference'] == pytest.approx(39 + 1 / 6 - 39)  # 39 % -> 39.17 %
  assert theta_effect['resolved'] is False
  assert theta_effect['verdict'] == 'not resolved with n = 3'

  # A configuration with one finished seed: no spread, and no verdict on its effects.
  runs = _grid({(12, 0.5): [0.60], (24, 0.5): [0.70, 0.71]})
  configurations = statistics.group(runs, fields)
  assert configurations[0]['test_error_std'] is None
  assert configurations[0]['test_error_ci95'] is None
  effect, = statistics.effects(configurations, fields)
  assert effect['resolved'] is None and effect['verdict'] == 'not resolved with n = 1'


def test_seeds_expand_points_like_a_swept_seed():
  points = [{'model.growth_rate': 12}, {'model.growth_rate': 24}]
  seeded = hyper.with_seeds(points, 3, 5)
  assert [p['seed'] for p in seeded] == [5, 5, 6, 6, 7, 7]  # every configuration once first
  swept = [{**p, 'seed': s} for p in points for s in (5, 6, 7)]
  assert sorted(plan.point_names(seeded)) == sorted(plan.point_names(swept))
  assert 'growth_rate=12,seed=6' in plan.point_names(seeded)
  assert hyper.with_seeds(points, 1, 0) == points  # single-seed names are unchanged
  with pytest.raises(ValueError, match='--seeds=0: expected 1 or more'):
    hyper.with_seeds(points, 0, 0)
  with pytest.raises(ValueError, match='already sweeps seed'):
    hyper.with_seeds(swept, 2, 0)


def _write_run(directory, name, *, top1, commit, status='done', steps=(5, 10)):
  """A run folder as train.py leaves it: progress.json, events and (when done) results.json."""
  run_dir = os.path.join(directory, name)
  os.makedirs(run_dir)
  record = provenance.describe(['train.py'])
  record['commit'], record['dirty'] = commit, False
  progress = {'step': steps[-1] if status == 'done' else steps[0], 'num_train_steps': steps[-1],
              'steps_per_epoch': 10, 'params': 1234, 'gmacs': 0.5,
              'model': {'growth_rate': 4, 'bottleneck': True, 'compression': 0.5},
              'provenance': record}
  with open(os.path.join(run_dir, 'progress.json'), 'w') as f:
    json.dump(progress, f)
  writer = metric_writer.create(run_dir, just_logging=False)
  for step in steps if status == 'done' else steps[:1]:
    writer.write_scalars(step, {'train_loss': 2.0 / step, 'eval_top1': top1 - 0.01 / step})
  writer.flush()
  writer.close()
  if status == 'done':
    with open(os.path.join(run_dir, 'results.json'), 'w') as f:
      json.dump({**progress, 'eval_top1': top1, 'eval_top5': 0.9, 'eval_loss': 1.0,
                 'config': {'model': {'name': 'densenet_bc', 'depth': 10},
                            'dataset': {'name': 'sklearn_digits'}}}, f)
  return run_dir


def _snapshot(directory):
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        found[path] = (os.stat(path).st_mtime_ns, f.read())
  return found


def test_report_of_a_running_sweep_with_mixed_code(tmp_path):
  workdir = str(tmp_path)
  names = ['growth_rate=4,seed=0', 'growth_rate=4,seed=1', 'growth_rate=4,seed=2']
  _write_run(workdir, names[0], top1=0.80, commit='a' * 40)
  _write_run(workdir, names[1], top1=0.82, commit='b' * 40)
  running = _write_run(workdir, names[2], top1=0.70, commit='a' * 40, status='running')
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump({'config': 'tiny.py', 'points': [
        {'name': n, 'overrides': {'model.growth_rate': 4, 'seed': i},
         'state': 'done' if i < 2 else 'running'} for i, n in enumerate(names)]}, f)
  before = _snapshot(running)
  written = report.write_report(workdir)
  assert _snapshot(running) == before  # The running point's folder is left as it was.

  with open(os.path.join(workdir, 'runs.csv')) as f:
    runs = {r['name']: r for r in csv.DictReader(f)}
  assert runs[names[2]]['status'] == 'running'
  assert float(runs[names[2]]['eval_top1']) == pytest.approx(0.70 - 0.01 / 5, abs=1e-6)
  for column in report.FIXED_COLUMNS:
    assert column in runs[names[0]]
  with open(os.path.join(workdir, 'results.csv')) as f:
    configuration, = list(csv.DictReader(f))
  assert configuration['name'] == 'growth_rate=4'
  assert configuration['seeds'] == '2' and configuration['runs'] == '3'
  assert float(configuration['test_error_mean']) == pytest.approx(19.0)
  assert float(configuration['test_error_std']) == pytest.approx(math.sqrt(2))
  assert configuration['status'] == '2 of 3 done'
  text = open(os.path.join(workdir, 'report.md')).read()
  assert 'Warning: the runs of this study were not all produced by the same code' in text
  assert (f'commit: {"a" * 10} (runs {names[0]}, {names[2]}); {"b" * 10} (run {names[1]})'
          in text)
  assert 'curves.png' in written['figures']


def test_report_of_one_seed_leaves_spread_empty(tmp_path):
  workdir = str(tmp_path)
  _write_run(workdir, 'growth_rate=4', top1=0.8, commit='c' * 40)
  _write_run(workdir, 'growth_rate=6', top1=0.9, commit='c' * 40)
  report.write_report(workdir)
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['seeds'] for r in rows] == ['1', '1']
  assert all(r['test_error_std'] == '' and r['test_error_ci95'] == '' for r in rows)
  assert float(rows[0]['test_error_mean']) == pytest.approx(20.0)
  assert 'Warning' not in open(os.path.join(workdir, 'report.md')).read()


def test_figure_labels_stay_clear_of_each_other_and_the_data(tmp_path):
  """20 configurations: the legend lies outside the axes and nothing is written among the
  points (the names used to run into each other and into the legend)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = [_run(f'growth_rate={k},compression={t},seed={s}', 0.5 + 0.01 * k * t + 0.003 * s,
               k, t, s) for k in (6, 12, 24, 32, 40) for t in (0.25, 0.5, 0.75, 1.0)
          for s in range(2)]
  configurations = statistics.group(runs, ['model.growth_rate', 'model.compression', 'seed'])
  assert len(configurations) == 20
  captured = {}
  original = plt.Figure.savefig

  def capture(fig, *args, **kwargs):
    original(fig, *args, **kwargs)
    captured['fig'] = fig

  plt.Figure.savefig = capture
  try:
    assert figures.error_against(configurations, 'params', 'parameters',
                                 str(tmp_path / 'e.png'))
  finally:
    plt.Figure.savefig = original
  fig = captured['fig']
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  renderer = backend_agg.FigureCanvasAgg(fig).get_renderer()  # closed figures lose theirs
  ax, = fig.axes
  legend, = fig.legends
  assert len(legend.get_texts()) >= 20
  assert not ax.texts  # No label among the data.
  axes_box = ax.get_window_extent(renderer)
  legend_box = legend.get_window_extent(renderer)
  assert not axes_box.overlaps(legend_box)
  boxes = [t.get_window_extent(renderer) for t in legend.get_texts()]
  for i, a in enumerate(boxes):
    for b in boxes[i + 1:]:
      assert not a.overlaps(b)
  assert fig.bbox.contains(legend_box.x1 - 1, legend_box.y0 + 1)  # inside the image
