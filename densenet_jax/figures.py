"""The report's figures as PNG files (matplotlib), from the rows that `report.collect` builds."""

import math
import os
from typing import Any, Dict, List, Sequence

import matplotlib
matplotlib.use('Agg')  # Files only: no display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

Row = Dict[str, Any]


def _error(row: Row) -> float:
  return 100 * (1 - row['eval_top1'])


def _finished(rows: Sequence[Row]) -> List[Row]:
  return [r for r in rows if r['status'] == 'done' and r.get('eval_top1') is not None]


def error_against(rows: Sequence[Row], column: str, label: str, path: str) -> bool:
  """Test error against `column`, one line per family, each point labelled with its name."""
  done = [r for r in _finished(rows) if r.get(column) is not None]
  if not done:
    return False
  scale = 1e6 if column == 'params' else 1.0
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for name in sorted({r['family'] for r in done}):
    points = sorted((r for r in done if r['family'] == name), key=lambda r: r[column])
    xs = [r[column] / scale for r in points]
    ax.plot(xs, [_error(r) for r in points], 'o-', label=name)
    for r, x in zip(points, xs):
      ax.annotate(r['name'], (x, _error(r)), fontsize=6, xytext=(3, 3),
                  textcoords='offset points')
  ax.set_xlabel(label)
  ax.set_ylabel('test error (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def curves(rows: Sequence[Row], path: str) -> bool:
  """Training loss and test error against epochs, one line per point."""
  drawn = [r for r in rows if r['_curves'].get('train_loss') and r.get('_steps_per_epoch')]
  if not drawn:
    return False
  fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
  for r in drawn:
    per_epoch = r['_steps_per_epoch']
    loss = sorted(r['_curves']['train_loss'].items())
    line, = loss_ax.plot([s / per_epoch for s, _ in loss], [v for _, v in loss],
                         label=r['name'])
    top1 = sorted(r['_curves'].get('eval_top1', {}).items())
    error_ax.plot([s / per_epoch for s, _ in top1], [100 * (1 - v) for _, v in top1], 'o-',
                  color=line.get_color(), label=r['name'])
  loss_ax.set(xlabel='epoch', ylabel='training loss')
  error_ax.set(xlabel='epoch', ylabel='test error (%)')
  for ax in (loss_ax, error_ax):
    ax.grid(alpha=0.3)
  error_ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def heatmap(rows: Sequence[Row], fields: Sequence[str], path: str) -> bool:
  """Test error over a two-field grid; only for a sweep of exactly two fields."""
  if len(fields) != 2:
    return False
  ys = sorted({r[fields[0]] for r in rows if fields[0] in r})
  xs = sorted({r[fields[1]] for r in rows if fields[1] in r})
  if len(xs) * len(ys) != len(rows) or len(xs) < 2 or len(ys) < 2:
    return False  # Not a full product: a heat map would suggest points that do not exist.
  grid = [[math.nan] * len(xs) for _ in ys]
  for r in _finished(rows):
    grid[ys.index(r[fields[0]])][xs.index(r[fields[1]])] = _error(r)
  fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 1.0 * len(ys) + 1.8))
  image = ax.imshow(grid, cmap='viridis_r', aspect='auto')
  for i, row in enumerate(grid):
    for j, value in enumerate(row):
      light = math.isnan(value) or image.norm(value) < 0.5  # Low error: light cells.
      ax.text(j, i, '-' if math.isnan(value) else f'{value:.1f}', ha='center', va='center',
              color='black' if light else 'white', fontsize=9)
  ax.set_xticks(range(len(xs)), [str(x) for x in xs])
  ax.set_yticks(range(len(ys)), [str(y) for y in ys])
  ax.set_xlabel(fields[1])
  ax.set_ylabel(fields[0])
  fig.colorbar(image, ax=ax, label='test error (%)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write_all(rows: Sequence[Row], fields: Sequence[str], directory: str) -> List[str]:
  """Every figure the rows allow, into `directory`; returns the file names written."""
  from densenet_jax import feature_reuse  # pylint: disable=g-import-not-at-top
  from densenet_jax import report  # pylint: disable=g-import-not-at-top
  written = []

  def out(name):
    written.append(name)
    return os.path.join(directory, name)

  if error_against(rows, 'params', 'parameters (millions)',
                   os.path.join(directory, 'error_vs_params.png')):
    out('error_vs_params.png')
  if error_against(rows, 'gmacs', 'GMACs per image',
                   os.path.join(directory, 'error_vs_gmacs.png')):
    out('error_vs_gmacs.png')
  if curves(rows, os.path.join(directory, 'curves.png')):
    out('curves.png')
  if heatmap(rows, fields, os.path.join(directory, 'heatmap.png')):
    out('heatmap.png')
  best = report.best_row(rows)
  if best is not None and feature_reuse.supports(best['_model']):
    feature_reuse.write_figure(best['_dir'], out('feature_reuse.png'))
  return written
