"""The report's figures as PNG files (matplotlib), from the rows that `report` builds.

Every figure puts its legend outside the axes and writes no text among the data, so that
labels overlap neither each other, the legend nor the points, however many configurations a
study has (a colour and marker per configuration, named in the legend).
"""

import math
import os
from typing import Any, Dict, List, Optional, Sequence

import matplotlib
matplotlib.use('Agg')  # Files only: no display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

Row = Dict[str, Any]
_MARKERS = 'osD^vP*Xhp<>'


def _finished(configurations: Sequence[Row]) -> List[Row]:
  return [c for c in configurations if c['seeds'] and c.get('test_error_mean') is not None]


def _style(index: int) -> Dict[str, Any]:
  """A colour and marker per configuration: 20 colours, then markers tell them apart."""
  cmap = plt.get_cmap('tab20' if index >= 10 else 'tab10')
  return {'color': cmap(index % cmap.N), 'marker': _MARKERS[(index // 10) % len(_MARKERS)]}


def _figure(width: float, height: float, entries: int):
  """A figure whose height leaves room for a legend of `entries` lines beside the axes."""
  fig = plt.figure(figsize=(width, max(height, 0.19 * entries + 1.2)), layout='constrained')
  return fig


def _legend(fig, handles, labels, title=None):
  return fig.legend(handles, labels, loc='outside right upper', fontsize=7, title=title,
                    title_fontsize=7, frameon=False)


def error_against(configurations: Sequence[Row], column: str, label: str, path: str) -> bool:
  """Mean test error against `column` with 95 % intervals as error bars, one line per family,
  and the paper's error of the same model where it has one (open star)."""
  done = [c for c in _finished(configurations) if c.get(column) is not None]
  if not done:
    return False
  scale = 1e6 if column == 'params' else 1.0
  families = sorted({c['family'] for c in done})
  fig = _figure(8.0, 4.4, len(done) + len(families) + 1)
  ax = fig.add_subplot()
  handles, labels = [], []
  for name in families:
    points = sorted((c for c in done if c['family'] == name), key=lambda c: c[column])
    line, = ax.plot([c[column] / scale for c in points],
                    [c['test_error_mean'] for c in points], color='0.6', lw=1,
                    ls=['-', '--', ':', '-.'][families.index(name) % 4], zorder=1)
    handles.append(line)
    labels.append(name)
  paper_drawn = False
  for i, c in enumerate(done):
    style = _style(i)
    bar = ax.errorbar(c[column] / scale, c['test_error_mean'], yerr=c.get('test_error_ci95') or 0,
                      fmt=style['marker'], color=style['color'], capsize=3, ms=5, zorder=3)
    handles.append(bar)
    labels.append(f'{c["name"]} (n={c["seeds"]})')
    if c.get('paper_error') is not None:
      star, = ax.plot(c[column] / scale, c['paper_error'], '*', mfc='none', ms=10,
                      color=style['color'], zorder=2)
      if not paper_drawn:
        handles.append(star)
        labels.append('paper\'s error, same model')
        paper_drawn = True
  ax.set_xlabel(label)
  ax.set_ylabel('test error (%), mean ± 95 % interval')
  ax.grid(alpha=0.3)
  _legend(fig, handles, labels)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _mean_curve(runs: Sequence[Row], tag: str, transform=lambda v: v):
  """Steps every run has, their mean and range over the runs."""
  curves = [r['_curves'].get(tag, {}) for r in runs]
  steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  values = [[transform(c[s]) for c in curves] for s in steps]
  return (steps, [sum(v) / len(v) for v in values], [min(v) for v in values],
          [max(v) for v in values])


def curves(configurations: Sequence[Row], path: str) -> bool:
  """Training loss and test error against epochs: the mean over each configuration's finished
  seeds (its running ones while none has finished), with a band from the lowest to the highest
  seed."""
  drawn = []
  for c in configurations:
    runs = [r for r in c['_runs'] if r['_curves'].get('train_loss') and r.get('_steps_per_epoch')]
    # The finished seeds; a running one's shorter curve would cut the mean short.
    runs = [r for r in runs if r['status'] == 'done'] or runs
    if runs:
      drawn.append((c, runs))
  if not drawn:
    return False
  fig = _figure(12.0, 4.2, len(drawn) + 1)
  loss_ax, error_ax = fig.subplots(1, 2)
  handles, labels = [], []
  for i, (c, runs) in enumerate(drawn):
    per_epoch = runs[0]['_steps_per_epoch']
    color = _style(i)['color']
    for ax, tag, transform, fmt in ((loss_ax, 'train_loss', lambda v: v, '-'),
                                    (error_ax, 'eval_top1', lambda v: 100 * (1 - v), 'o-')):
      steps, mean, low, high = _mean_curve(runs, tag, transform)
      if not steps:
        continue
      epochs = [s / per_epoch for s in steps]
      line, = ax.plot(epochs, mean, fmt, color=color, ms=3)
      if len(runs) > 1:
        ax.fill_between(epochs, low, high, color=color, alpha=0.2, lw=0)
    handles.append(line)
    labels.append(f'{c["name"]} (n={len(runs)})')
  loss_ax.set(xlabel='epoch', ylabel='training loss')
  error_ax.set(xlabel='epoch', ylabel='test error (%)')
  for ax in (loss_ax, error_ax):
    ax.grid(alpha=0.3)
  _legend(fig, handles, labels, title='mean over seeds; band: lowest to highest')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def heatmap(configurations: Sequence[Row], fields: Sequence[str], path: str) -> bool:
  """Mean test error over a two-field grid, each cell with its 95 % interval; only for a
  sweep of exactly two fields (beside the seed) over their full product."""
  fields = [f for f in fields if f != 'seed']
  if len(fields) != 2:
    return False
  ys = sorted({c[fields[0]] for c in configurations if c.get(fields[0]) is not None})
  xs = sorted({c[fields[1]] for c in configurations if c.get(fields[1]) is not None})
  if len(xs) * len(ys) != len(configurations) or len(xs) < 2 or len(ys) < 2:
    return False  # Not a full product: a heat map would suggest points that do not exist.
  grid = [[math.nan] * len(xs) for _ in ys]
  text = [[''] * len(xs) for _ in ys]
  for c in _finished(configurations):
    i, j = ys.index(c[fields[0]]), xs.index(c[fields[1]])
    grid[i][j] = c['test_error_mean']
    ci = c.get('test_error_ci95')
    text[i][j] = f'{grid[i][j]:.1f}' + (f'\n± {ci:.1f}' if ci is not None else '') + (
        f'\nn={c["seeds"]}')
  fig, ax = plt.subplots(figsize=(1.5 * len(xs) + 2.5, 1.1 * len(ys) + 1.8),
                         layout='constrained')
  image = ax.imshow(grid, cmap='viridis_r', aspect='auto')
  for i, row in enumerate(grid):
    for j, value in enumerate(row):
      light = math.isnan(value) or image.norm(value) < 0.5  # Low error: light cells.
      ax.text(j, i, text[i][j] or '-', ha='center', va='center',
              color='black' if light else 'white', fontsize=8)
  ax.set_xticks(range(len(xs)), [str(x) for x in xs])
  ax.set_yticks(range(len(ys)), [str(y) for y in ys])
  ax.set_xlabel(fields[1])
  ax.set_ylabel(fields[0])
  fig.colorbar(image, ax=ax, label='test error (%), mean ± 95 % interval')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def best_row(rows: Sequence[Row]) -> Optional[Row]:
  """The finished DenseNet run with the best test top-1 (best over its evaluations): the one
  whose feature reuse is drawn."""
  done = [r for r in rows if r['status'] == 'done' and r.get('best_eval_top1') is not None
          and not math.isnan(r['best_eval_top1']) and r['family'].startswith('DenseNet')]
  return max(done, key=lambda r: r['best_eval_top1']) if done else None


def write_all(runs: Sequence[Row], configurations: Sequence[Row], fields: Sequence[str],
              directory: str) -> List[str]:
  """Every figure the rows allow, into `directory`; returns the file names written."""
  from densenet_jax.experiments import feature_reuse  # pylint: disable=g-import-not-at-top
  written = []

  def out(name):
    written.append(name)
    return os.path.join(directory, name)

  if error_against(configurations, 'params', 'parameters (millions)',
                   os.path.join(directory, 'error_vs_params.png')):
    out('error_vs_params.png')
  if error_against(configurations, 'gmacs', 'GMACs per image',
                   os.path.join(directory, 'error_vs_gmacs.png')):
    out('error_vs_gmacs.png')
  if curves(configurations, os.path.join(directory, 'curves.png')):
    out('curves.png')
  if heatmap(configurations, fields, os.path.join(directory, 'heatmap.png')):
    out('heatmap.png')
  best = best_row(runs)
  if best is not None and feature_reuse.supports(best['_model']):
    feature_reuse.write_figure(best['_dir'], out('feature_reuse.png'))
  return written
