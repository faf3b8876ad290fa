"""What produced a run: the code, the libraries, the hardware and the command.

Every run writes this record into its progress.json and results.json (under 'provenance'), so
that a study rerun after a code change, on other library versions or on other hardware cannot
silently mix two programs: the report compares the records of a study's runs and names the runs
that differ (`differences`).

The code is identified by the git commit of the checkout that holds this package and, when the
tree has uncommitted changes, a short hash of `git diff HEAD`, so that two runs of the same
uncommitted edit can still be told apart from runs of another one. An installed package with
no checkout records its version instead.
"""

import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

# The libraries whose versions change what a run computes or how fast.
LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets',
             'numpy')
# The fields whose differences make two runs of one study results of different programs or
# machines (`differences`); times, command lines and process ids differ by nature.
COMPARED = ('commit', 'diff_hash', 'versions', 'python', 'platform', 'device_kind',
            'device_count', 'process_count')
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def now() -> str:
  """The time in UTC, ISO 8601, to the second."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _git(*args: str) -> Optional[str]:
  try:
    result = subprocess.run(['git', '-C', _ROOT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, timeout=30, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.decode(errors='replace')


def code() -> Dict[str, Any]:
  """{'commit', 'dirty', 'diff_hash'} of the checkout that holds this package.

  `commit` is None when the package is not in a git checkout (a pip installation), and
  `package_version` says which release it is then.
  """
  commit = _git('rev-parse', 'HEAD')
  if commit is None:
    try:
      version = importlib.metadata.version('densenet_jax')
    except importlib.metadata.PackageNotFoundError:
      version = None
    return {'commit': None, 'dirty': None, 'diff_hash': None, 'package_version': version}
  # Untracked files that git does not ignore count as changes too: a new module is code.
  status = _git('status', '--porcelain', '--untracked-files=normal') or ''
  dirty = bool(status.strip())
  diff_hash = None
  if dirty:
    digest = hashlib.sha256((_git('diff', 'HEAD') or '').encode())
    digest.update(status.encode())
    diff_hash = digest.hexdigest()[:12]
  return {'commit': commit.strip(), 'dirty': dirty, 'diff_hash': diff_hash}


def versions(libraries: Sequence[str] = LIBRARIES) -> Dict[str, Optional[str]]:
  """Installed version of each library (None where it is not installed)."""
  found = {}
  for name in libraries:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def visible_devices() -> Dict[str, Any]:
  """The devices this process was given by whoever started it (a sweep's --parallel, SLURM):
  the accelerators' visibility variables and the CPU cores it may run on."""
  visible = {name: os.environ[name] for name in
             ('CUDA_VISIBLE_DEVICES', 'TPU_VISIBLE_CHIPS', 'TPU_CHIPS_PER_PROCESS_BOUNDS')
             if name in os.environ}
  if hasattr(os, 'sched_getaffinity'):
    visible['cpu_cores'] = _ranges(sorted(os.sched_getaffinity(0)))
  visible['host_cpu_count'] = os.cpu_count()
  return visible


def _ranges(numbers: List[int]) -> str:
  """[0, 1, 2, 5] -> '0-2,5'."""
  parts, start = [], None
  for i, n in enumerate(numbers):
    if start is None:
      start = n
    if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
      parts.append(f'{start}-{n}' if n != start else str(n))
      start = None
  return ','.join(parts)


def describe(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """The provenance record of this process's run, started now.

  Needs jax's backends (it asks for the devices): call it after distributed initialisation.
  """
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      **code(),
      'versions': versions(),
      'python': platform.python_version(),
      'platform': jax.default_backend(),
      'device_kind': devices[0].device_kind if devices else None,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'host': platform.node(),
      'visible_devices': visible_devices(),
      'command': list(sys.argv if argv is None else argv),
      'started': now(),
  }


def label(record: Dict[str, Any], field: str) -> str:
  """One field of a record as the report prints it."""
  value = record.get(field)
  if field == 'commit' and value:
    dirty = record.get('dirty')
    return value[:10] + (f'+{record.get("diff_hash")}' if dirty else '')
  if isinstance(value, dict):
    return ', '.join(f'{k} {v}' for k, v in value.items())
  return '' if value is None else str(value)


def differences(records: Dict[str, Optional[Dict[str, Any]]]) -> List[str]:
  """One line per compared field on which the runs of a study disagree, naming the runs.

  Args:
    records: run name -> its provenance record (None for a run written before runs recorded
      one).

  Returns:
    Lines such as "commit: 1a2b3c4d5e (runs a, b); 9f8e7d6c5b (run c)"; also a line naming the
    runs with no record, when some have one.
  """
  known = {name: r for name, r in records.items() if r}
  lines = []
  missing = sorted(name for name, r in records.items() if not r)
  if missing and known:
    lines.append(f'no provenance record (written by older code): {", ".join(missing)}')
  for field in COMPARED:
    if field == 'diff_hash':
      continue  # Part of the commit's label.
    groups: Dict[str, List[str]] = {}
    for name, record in known.items():
      groups.setdefault(label(record, field), []).append(name)
    if len(groups) > 1:
      lines.append(f'{field}: ' + '; '.join(
          f'{value or "none"} ({"runs" if len(names) > 1 else "run"} {", ".join(sorted(names))})'
          for value, names in sorted(groups.items())))
  return lines


def summary(records: Dict[str, Optional[Dict[str, Any]]]) -> Dict[str, str]:
  """The compared fields that every run with a record shares: field -> value as printed."""
  known = [r for r in records.values() if r]
  shared = {}
  for field in COMPARED:
    if field == 'diff_hash':
      continue
    values = {label(r, field) for r in known}
    if len(values) == 1:
      shared[field] = values.pop()
  return shared
