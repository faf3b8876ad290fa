"""The report of a sweep (or any folder of runs): tables, effects, provenance and figures.

    python -m densenet_jax.experiments.report --workdir=DIR

Writes, from what the runs themselves wrote (results.json, progress.json, TensorBoard events):
  * DIR/runs.csv: one row per run, with its swept fields, parameters, GMACs, training time and
    speed, final and best test accuracy, status and the commit that produced it;
  * DIR/results.csv: one row per configuration (runs that differ only in their seed), with the
    number of finished seeds and, for each of eval_top1, eval_top5, eval_loss, best_eval_top1
    and test_error (percent), its mean, standard deviation and the half-width of the 95 %
    interval of the mean (empty with one seed); the paper's error where the configuration is
    one of the paper's models on one of its datasets, and the run's budget against the
    paper's ('1.5 of 300 epochs');
  * DIR/effects.csv: for each swept field, the difference of mean test error between
    neighbouring values with everything else fixed, its 95 % interval (Welch) and whether the
    data resolve it (densenet_jax/experiments/statistics.py);
  * DIR/report.md: the tables, the effects, what produced the runs and a warning naming the runs
    produced by different code, library versions or hardware;
  * the figures of densenet_jax/experiments/figures.py: test error against parameters and GMACs with
    95 % intervals as error bars (the paper's Figures 3 and 4), training curves as the mean over
    seeds with a band, the heat map of a two-field grid, feature reuse (Figure 5).
`python -m densenet_jax.experiments.sweep` runs it at the end of a sweep; it may also run at any
time on a running sweep, where running points show their latest evaluation and are marked as
running. It writes only these files at the top of DIR, never into a run's workdir. A folder with no
sweep.json reports every run directory in it.
"""

import csv
import glob
import math
import os
from typing import Any, Dict, List

from absl import app
from absl import flags
from absl import logging

from densenet_jax.experiments import paper
from densenet_jax.experiments import statistics
from densenet_jax.runtime import paths
from densenet_jax.runtime import provenance
from densenet_jax.training import records

FIXED_COLUMNS = ('params', 'gmacs', 'train_seconds', 'train_images_per_second', 'step',
                 'eval_top1', 'eval_top5', 'eval_loss', 'best_eval_top1', 'status')
SPREAD = ('mean', 'std', 'ci95')


def read_scalars(workdir: str) -> Dict[str, Dict[int, float]]:
  """tag -> {step: value} from a run's TensorBoard event files (clu's metric writer).

  A step written twice (a run that was resumed from an earlier checkpoint repeats the steps
  after it) keeps the value written last.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars: Dict[str, Dict[int, float]] = {}
  events = []
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    try:
      events.extend(tf.compat.v1.train.summary_iterator(path))
    except tf.errors.DataLossError:  # A file cut short by a kill: keep what was read.
      logging.warning('Event file %s is truncated; using what precedes the cut.', path)
  for event in sorted(events, key=lambda e: e.wall_time):
    for value in event.summary.value:
      if value.HasField('simple_value'):
        number = value.simple_value
      elif value.HasField('tensor'):
        array = tf.make_ndarray(value.tensor)
        if array.ndim or array.dtype.kind not in 'fiu':
          continue  # Hyper-parameters and text, not a scalar.
        number = array.item()
      else:
        continue
      scalars.setdefault(value.tag, {})[int(event.step)] = float(number)
  return scalars


def family(model: Dict[str, Any]) -> str:
  """The paper's name of a model's variant: DenseNet, DenseNet-B, DenseNet-C or DenseNet-BC;
  ResNet or pre-activation ResNet for the baselines (models/resnet.py)."""
  if not model:
    return 'unknown'
  if 'growth_rate' not in model:   # the ResNets' fields: stage_sizes, widths, preactivation
    return 'pre-activation ResNet' if model.get('preactivation') else 'ResNet'
  suffix = ('B' if model.get('bottleneck') else '') + (
      'C' if model.get('compression', 1.0) < 1.0 else '')
  return 'DenseNet' + (f'-{suffix}' if suffix else '')


def _points(sweep_dir: str) -> List[Dict[str, Any]]:
  """[{'name', 'overrides', 'state', 'error'}] from sweep.json, or one per run directory."""
  sweep = records.read_json(os.path.join(sweep_dir, 'sweep.json'))
  if sweep is not None:
    return sweep['points']
  runs = sorted(d for d in os.listdir(sweep_dir)
                if os.path.exists(os.path.join(sweep_dir, d, records.PROGRESS))
                or os.path.exists(os.path.join(sweep_dir, d, records.RESULTS)))
  return [{'name': d, 'overrides': {}, 'state': None} for d in runs]


def collect(sweep_dir: str) -> List[Dict[str, Any]]:
  """One row per run: its fields, what it measured, its curves (under '_curves')."""
  rows = []
  for point in _points(sweep_dir):
    run_dir = os.path.join(sweep_dir, point['name'])
    results = records.read_json(os.path.join(run_dir, records.RESULTS))
    progress = records.read_json(os.path.join(run_dir, records.PROGRESS)) or {}
    record = {**progress, **(results or {})}
    status = 'done' if results is not None else (point.get('state') or 'incomplete')
    scalars = read_scalars(run_dir) if os.path.isdir(run_dir) else {}
    top1 = scalars.get('eval_top1', {})
    row = {'name': point['name'], **point.get('overrides', {}),
           'family': family(record.get('model')),
           'params': record.get('params'), 'gmacs': record.get('gmacs'),
           'train_seconds': record.get('train_seconds'),
           'train_images_per_second': record.get('train_images_per_second'),
           'step': record.get('step'),
           'eval_top1': record.get('eval_top1', top1[max(top1)] if top1 else None),
           'eval_top5': record.get('eval_top5'), 'eval_loss': record.get('eval_loss'),
           'best_eval_top1': max(top1.values()) if top1 else record.get('eval_top1'),
           'status': status if status != 'failed' else f'failed: {point.get("error")}',
           'commit': provenance.label(record.get('provenance') or {}, 'commit'),
           '_curves': scalars, '_steps_per_epoch': record.get('steps_per_epoch'),
           '_model': record.get('model'), '_dir': run_dir, '_config': record.get('config'),
           '_provenance': record.get('provenance'),
           '_fields': list(point.get('overrides', {}))}
    rows.append(row)
  return rows


def swept_fields(rows: List[Dict[str, Any]]) -> List[str]:
  """The dotted config fields that the points set, in the sweep's order."""
  return list(dict.fromkeys(k for r in rows for k in r['_fields']))


def with_paper(configuration: Dict[str, Any]) -> Dict[str, Any]:
  """`configuration` with 'paper_error', 'paper_source' and 'budget' where the paper trained
  the same model on the same dataset (densenet_jax/experiments/paper.py)."""
  config = configuration.get('_config') or {}
  run = next((r for r in configuration['_runs'] if r.get('_config')), None)
  result = None
  if config:
    result = paper.paper_result(config.get('model', {}), config.get('dataset', {}).get('name'),
                                paper.is_augmented(config))
  budget = paper.budget(config, run.get('_steps_per_epoch')) if run else ''
  return {**configuration, 'paper_error': result.error if result else None,
          'paper_source': result.source if result else None, 'budget': budget or None}


def _format(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    if math.isnan(value):
      return 'nan'
    return f'{value:.4g}' if abs(value) < 1e5 else f'{value:.0f}'
  if isinstance(value, (list, tuple)):
    return '-'.join(str(v) for v in value)
  return str(value)


def _write_csv(path: str, columns: List[str], rows: List[Dict[str, Any]]) -> None:
  """Full precision; a missing value is an empty cell."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow(['' if row.get(c) is None else row.get(c) for c in columns])


def _markdown(columns: List[str], rows: List[List[str]]) -> List[str]:
  return (['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
          + ['| ' + ' | '.join(c.replace('|', '/') for c in row) + ' |' for row in rows])


def _plus_minus(row: Dict[str, Any], metric: str, scale: float = 1.0, digits: int = 2) -> str:
  mean, ci95 = row.get(f'{metric}_mean'), row.get(f'{metric}_ci95')
  if mean is None:
    return ''
  text = f'{scale * mean:.{digits}f}'
  return text + (f' ± {scale * ci95:.{digits}f}' if ci95 is not None else '')


def configuration_columns(fields: List[str]) -> List[str]:
  return (['name', *[f for f in fields if f != statistics.SEED_FIELD], 'family', 'params',
           'gmacs', 'seeds', 'runs']
          + [f'{m}_{s}' for m in statistics.METRICS for s in SPREAD]
          + ['paper_error', 'paper_source', 'budget', 'status'])


def write_tables(runs: List[Dict[str, Any]], configurations: List[Dict[str, Any]],
                 effects: List[Dict[str, Any]], sweep_dir: str) -> List[str]:
  """runs.csv, results.csv and effects.csv; returns the markdown of the three tables."""
  fields = swept_fields(runs)
  run_columns = ['name', *fields, 'family', *FIXED_COLUMNS, 'commit']
  _write_csv(os.path.join(sweep_dir, 'runs.csv'), run_columns, runs)
  _write_csv(os.path.join(sweep_dir, 'results.csv'), configuration_columns(fields),
             configurations)
  effect_columns = ['field', 'from', 'to', 'at', 'n_from', 'n_to', 'difference', 'ci95',
                    'resolved', 'verdict']
  _write_csv(os.path.join(sweep_dir, 'effects.csv'), effect_columns, effects)
  shown = [f for f in fields if f != statistics.SEED_FIELD]
  lines = ['## Configurations', '',
           'Mean over the finished seeds ± the half-width of its 95 % interval (Student\'s t); '
           'no interval with one seed. Test error = 100 (1 - top-1), in %.', '']
  lines += _markdown(
      ['name', *shown, 'family', 'params', 'GMACs', 'seeds', 'test error %', 'top-5 %',
       'best top-1 %', 'paper error %', 'budget', 'status'],
      [[c['name'], *[_format(c.get(f)) for f in shown], c['family'] or '',
        _format(c['params']), _format(c['gmacs']), str(c['seeds']),
        _plus_minus(c, 'test_error'), _plus_minus(c, 'eval_top5', 100),
        _plus_minus(c, 'best_eval_top1', 100), _format(c.get('paper_error')),
        c.get('budget') or '', c['status']] for c in configurations])
  if effects:
    lines += ['', '## Effects', '',
              'Change of mean test error (percentage points) from one value of a field to the '
              'next, every other field fixed, with its 95 % interval (Welch); resolved when the '
              'interval excludes zero.', '']
    lines += _markdown(
        ['field', 'from', 'to', 'at', 'difference', 'n', 'verdict'],
        [[e['field'], _format(e['from']), _format(e['to']), e['at'],
          '' if e['difference'] is None else f'{e["difference"]:+.2f} ± {e["ci95"]:.2f}',
          f'{e["n_from"]}, {e["n_to"]}', e['verdict']] for e in effects])
  lines += ['', '## Runs', '']
  lines += _markdown(run_columns, [[_format(r.get(c)) for c in run_columns] for r in runs])
  return lines


def provenance_lines(runs: List[Dict[str, Any]]) -> List[str]:
  """What produced the runs, and a warning naming the runs that differ."""
  produced = {r['name']: r.get('_provenance') for r in runs if r['status'] == 'done'
              or r.get('_provenance')}
  lines = ['## What produced these runs', '']
  shared = provenance.summary(produced)
  lines += [f'- {field}: {value}' for field, value in shared.items()]
  differences = provenance.differences(produced)
  if differences:
    lines += ['', '**Warning: the runs of this study were not all produced by the same code, '
              'libraries or hardware:**', '', *[f'- {d}' for d in differences]]
    for line in differences:
      logging.warning('Report: runs differ in %s', line)
  return lines


def write_report(sweep_dir: str) -> Dict[str, Any]:
  """Writes the tables, report.md and every figure that the rows allow; returns what it wrote."""
  if paths.is_remote(sweep_dir):  # Built on a local copy, then uploaded (staging.py).
    from densenet_jax.runtime import staging  # pylint: disable=g-import-not-at-top
    return staging.write_report(sweep_dir, write_report)
  from densenet_jax.experiments import figures  # pylint: disable=g-import-not-at-top
  runs = collect(sweep_dir)
  if not runs:
    raise ValueError(f'{sweep_dir} holds no sweep.json and no runs (no directory with a '
                     f'{records.RESULTS} or {records.PROGRESS}).')
  fields = swept_fields(runs)
  configurations = [with_paper(c) for c in statistics.group(runs, fields)]
  effects = statistics.effects(configurations, fields)
  tables = write_tables(runs, configurations, effects, sweep_dir)
  written = figures.write_all(runs, configurations, fields, sweep_dir)
  sweep = records.read_json(os.path.join(sweep_dir, 'sweep.json')) or {}
  done = sum(r['status'] == 'done' for r in runs)
  lines = [f'# Sweep report: {sweep.get("config", sweep_dir)}', '',
           f'{done} of {len(runs)} runs done, {len(configurations)} configurations. Params and '
           'GMACs (multiply-accumulates per image at the evaluation resolution) of each model; '
           'train_seconds is wall time spent training (compilation included, evaluation '
           'excluded), over every session of a run. A running run shows its latest '
           'evaluation.', '', *tables, '', *provenance_lines(runs), '']
  for name in written:
    lines += [f'![{name}]({name})', '']
  with open(os.path.join(sweep_dir, 'report.md'), 'w') as f:
    f.write('\n'.join(lines))
  logging.info('Report: %s (%d runs, %d done); figures: %s',
               os.path.join(sweep_dir, 'report.md'), len(runs), done, ', '.join(written))
  return {'rows': runs, 'configurations': configurations, 'effects': effects,
          'figures': written}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = flags.FLAGS.workdir
  if not paths.resolve(workdir).is_dir():
    raise SystemExit(f'report: --workdir={workdir}: no such directory.')
  try:
    write_report(workdir)
  except ValueError as e:
    raise SystemExit(f'report: {e}') from None


if __name__ == '__main__':  # Flags only for the command: the sweep imports this module.
  flags.DEFINE_string('workdir', None, 'A sweep directory (or a folder of runs).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
