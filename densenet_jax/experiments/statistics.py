"""Runs that differ only in their seed, as one configuration: means, spreads and effects.

A study's single runs differ by seed-to-seed variation alone, so the report states each
configuration's mean over its seeds with the half-width of the 95 % confidence interval of that
mean (Student's t), and calls the difference between two configurations resolved only when the
95 % interval of the difference of their means (Welch's t, which does not assume equal
variances) excludes zero. With one seed there is no spread: the columns are empty, not zero.
"""

import math
import re
from typing import Any, Dict, List, Optional, Sequence

from scipy import stats

Row = Dict[str, Any]
# The metrics aggregated over seeds; test_error is 100 * (1 - eval_top1), in percent.
METRICS = ('eval_top1', 'eval_top5', 'eval_loss', 'best_eval_top1', 'test_error')
SEED_FIELD = 'seed'
_SEED_PART = re.compile(r'^(?:[\w.]*\.)?seed=[^,]*$')


def configuration_name(name: str) -> str:
  """A run's name without its seed: 'growth_rate=12,seed=1' -> 'growth_rate=12'; a run that is
  only a seed ('seed=2') -> 'all'."""
  parts = [p for p in name.split(',') if not _SEED_PART.match(p)]
  return ','.join(parts) or 'all'


def mean_interval(values: Sequence[float]) -> Dict[str, Optional[float]]:
  """{'mean', 'std', 'ci95'}: the sample standard deviation (n - 1) and the half-width of the
  95 % interval of the mean, t(0.975, n - 1) * std / sqrt(n); spread None for one value."""
  n = len(values)
  if n == 0:
    return {'mean': None, 'std': None, 'ci95': None}
  mean = sum(values) / n
  if n == 1:
    return {'mean': mean, 'std': None, 'ci95': None}
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  t = float(stats.t.ppf(0.975, n - 1))
  return {'mean': mean, 'std': std, 'ci95': t * std / math.sqrt(n)}


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Dict[str, float]]:
  """The difference of means mean(b) - mean(a) with its 95 % interval (Welch's t and the
  Welch-Satterthwaite degrees of freedom); None when either side has fewer than two values."""
  if len(a) < 2 or len(b) < 2:
    return None
  ma, mb = mean_interval(a), mean_interval(b)
  va, vb = ma['std'] ** 2 / len(a), mb['std'] ** 2 / len(b)
  difference = mb['mean'] - ma['mean']
  se = math.sqrt(va + vb)
  if se == 0:  # Identical runs on both sides: the difference is exact.
    return {'difference': difference, 'ci95': 0.0, 'df': float('inf')}
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return {'difference': difference, 'ci95': float(stats.t.ppf(0.975, df)) * se, 'df': df}


def metric_value(row: Row, metric: str) -> Optional[float]:
  if metric == 'test_error':
    top1 = row.get('eval_top1')
    return None if top1 is None else 100 * (1 - top1)
  value = row.get(metric)
  return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def group(runs: Sequence[Row], fields: Sequence[str]) -> List[Row]:
  """One row per configuration (runs whose names differ only in the seed), in the runs' order.

  Each row has 'name' (without the seed), the swept `fields` except the seed, 'seeds' (finished
  runs), 'runs' (all), the status of its runs, the first finished run's descriptive columns
  (family, params, GMACs...), `<metric>_mean`, `_std`, `_ci95` for each of METRICS over the
  finished runs, and '_runs', the runs themselves.
  """
  configurations: Dict[str, List[Row]] = {}
  for run in runs:
    configurations.setdefault(configuration_name(run['name']), []).append(run)
  rows = []
  for name, members in configurations.items():
    done = [r for r in members if r['status'] == 'done']
    first = (done or members)[0]
    row = {'name': name, **{f: first.get(f) for f in fields if f != SEED_FIELD},
           'family': first.get('family'), 'params': first.get('params'),
           'gmacs': first.get('gmacs'), 'seeds': len(done), 'runs': len(members),
           'status': 'done' if len(done) == len(members) else
                     f'{len(done)} of {len(members)} done', '_runs': members,
           '_model': first.get('_model'), '_config': first.get('_config')}
    for metric in METRICS:
      values = [v for v in (metric_value(r, metric) for r in done) if v is not None]
      for key, value in mean_interval(values).items():
        row[f'{metric}_{key}'] = value
    rows.append(row)
  return rows


def _neighbours(values: Sequence[Any]) -> List[tuple]:
  ordered = sorted(set(values), key=lambda v: (isinstance(v, str), v))
  return list(zip(ordered, ordered[1:]))


def effects(configurations: Sequence[Row], fields: Sequence[str],
            metric: str = 'test_error') -> List[Row]:
  """For each swept field, the effect of going from one value to the next with every other
  swept field fixed: Welch's difference of the configurations' mean `metric` and whether its
  95 % interval excludes zero.

  Returns:
    Rows {'field', 'from', 'to', 'at' (the other fields' values), 'n_from', 'n_to',
    'difference', 'ci95', 'resolved' (True, False, or None when a side has fewer than two
    seeds), 'verdict'} in the fields' order.
  """
  fields = [f for f in fields if f != SEED_FIELD]
  found = []
  for field in fields:
    others = [f for f in fields if f != field]
    by_rest: Dict[tuple, Dict[Any, Row]] = {}
    for row in configurations:
      if row.get(field) is None:
        continue
      by_rest.setdefault(tuple(repr(row.get(f)) for f in others), {})[row[field]] = row
    for rest, rows in by_rest.items():
      for low, high in _neighbours(list(rows)):
        a, b = (_values(rows[v], metric) for v in (low, high))
        result = welch(a, b)
        n = min(len(a), len(b))
        if result is None:
          resolved, verdict = None, f'not resolved with n = {n}'
        else:
          resolved = bool(abs(result['difference']) > result['ci95'])
          verdict = 'resolved' if resolved else f'not resolved with n = {n}'
        found.append({
            'field': field, 'from': low, 'to': high,
            'at': ', '.join(f'{f.rsplit(".", 1)[-1]}={rows[low].get(f)}' for f in others),
            'n_from': len(a), 'n_to': len(b),
            'difference': result['difference'] if result else None,
            'ci95': result['ci95'] if result else None, 'resolved': resolved,
            'verdict': verdict})
  return found


def _values(configuration: Row, metric: str) -> List[float]:
  done = [r for r in configuration['_runs'] if r['status'] == 'done']
  return [v for v in (metric_value(r, metric) for r in done) if v is not None]
