"""One results table and the paper's figures for a sweep (or any folder of runs).

    python -m densenet_jax.report --workdir=DIR

Writes, from what the runs themselves wrote (results.json, progress.json, TensorBoard events):
  * DIR/results.csv and DIR/report.md: one row per point, with its swept fields, parameters,
    GMACs, training time and speed, final and best test accuracy, and status;
  * DIR/error_vs_params.png, DIR/error_vs_gmacs.png: test error against parameters and against
    GMACs, one line per family (DenseNet, DenseNet-B, -C, -BC, ResNets; the paper's Figures 3
    and 4);
  * DIR/curves.png: training loss and test error against epochs for every point (Figure 4,
    right);
  * DIR/heatmap.png: for a sweep of two fields over a full grid, test error over the two;
  * DIR/feature_reuse.png: the paper's Figure 5 for the best finished DenseNet point
    (densenet_jax/feature_reuse.py).
`python -m densenet_jax.sweep` runs it at the end of a sweep. Points still running or failed
appear with their status; a folder with no sweep.json reports every run directory in it.
"""

import csv
import glob
import math
import os
from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging

from densenet_jax import paths
from densenet_jax import records

FIXED_COLUMNS = ('params', 'gmacs', 'train_seconds', 'train_images_per_second', 'step',
                 'eval_top1', 'eval_top5', 'eval_loss', 'best_eval_top1', 'status')


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
  """One row per point: its fields, what it measured, its curves (under '_curves')."""
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
           '_curves': scalars, '_steps_per_epoch': record.get('steps_per_epoch'),
           '_model': record.get('model'), '_dir': run_dir,
           '_fields': list(point.get('overrides', {}))}
    rows.append(row)
  return rows


def swept_fields(rows: List[Dict[str, Any]]) -> List[str]:
  """The dotted config fields that the points set, in the sweep's order."""
  return list(dict.fromkeys(k for r in rows for k in r['_fields']))


def _format(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}' if abs(value) < 1e5 else f'{value:.0f}'
  if isinstance(value, (list, tuple)):
    return '-'.join(str(v) for v in value)
  return str(value)


def write_table(rows: List[Dict[str, Any]], sweep_dir: str) -> List[str]:
  """DIR/results.csv (full precision) and the markdown rows of report.md."""
  columns = ['name', *swept_fields(rows), 'family', *FIXED_COLUMNS]
  with open(os.path.join(sweep_dir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow(['' if row.get(c) is None else row.get(c) for c in columns])
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join(_format(row.get(c)).replace('|', '/') for c in columns)
                 + ' |')
  return lines


def write_report(sweep_dir: str) -> Dict[str, Any]:
  """Writes the table, report.md and every figure that the rows allow; returns what it wrote."""
  if paths.is_remote(sweep_dir):  # Built on a local copy, then uploaded (staging.py).
    from densenet_jax import staging  # pylint: disable=g-import-not-at-top
    return staging.write_report(sweep_dir, write_report)
  from densenet_jax import figures  # pylint: disable=g-import-not-at-top
  rows = collect(sweep_dir)
  if not rows:
    raise ValueError(f'{sweep_dir} holds no sweep.json and no runs (no directory with a '
                     f'{records.RESULTS} or {records.PROGRESS}).')
  table = write_table(rows, sweep_dir)
  written = figures.write_all(rows, swept_fields(rows), sweep_dir)
  sweep = records.read_json(os.path.join(sweep_dir, 'sweep.json')) or {}
  done = sum(r['status'] == 'done' for r in rows)
  lines = [f'# Sweep report: {sweep.get("config", sweep_dir)}', '',
           f'{done} of {len(rows)} points done. Test error = 1 - eval_top1; params and '
           'GMACs (multiply-accumulates per image at the evaluation resolution) of each model; '
           'train_seconds is wall time spent training (compilation included, evaluation '
           'excluded), over every session of a run.', '', *table, '']
  for name in written:
    lines += [f'![{name}]({name})', '']
  with open(os.path.join(sweep_dir, 'report.md'), 'w') as f:
    f.write('\n'.join(lines))
  logging.info('Report: %s (%d points, %d done); figures: %s',
               os.path.join(sweep_dir, 'report.md'), len(rows), done, ', '.join(written))
  return {'rows': rows, 'figures': written}


def best_row(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
  """The finished DenseNet point with the best test top-1 (best over its evaluations): the one
  whose feature reuse is drawn."""
  done = [r for r in rows if r['status'] == 'done' and r.get('best_eval_top1') is not None
          and not math.isnan(r['best_eval_top1']) and r['family'].startswith('DenseNet')]
  return max(done, key=lambda r: r['best_eval_top1']) if done else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = flags.FLAGS.workdir
  if not paths.resolve(workdir).is_dir():
    raise app.UsageError(f'--workdir={workdir}: no such directory.')
  try:
    write_report(workdir)
  except ValueError as e:
    raise SystemExit(f'report: {e}') from None


if __name__ == '__main__':  # Flags only for the command: the sweep imports this module.
  flags.DEFINE_string('workdir', None, 'A sweep directory (or a folder of runs).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
