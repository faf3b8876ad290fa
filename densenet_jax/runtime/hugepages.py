"""Back large host allocations with transparent huge pages by restarting under a glibc tunable.

XLA:CPU allocates a train step's temporary buffer (hundreds of MiB for densenet121) afresh in
every step. glibc serves an allocation that size with a new `mmap` and returns it with `munmap`,
so the kernel faults in and zeroes every 4 KiB page again in every step: over a hundred thousand
page faults per step, a sizeable part of the step's time.

glibc's `glibc.malloc.hugetlb=1` tunable makes malloc advise the kernel to back such memory with
transparent huge pages (2 MiB): faults drop to a few hundred per step, and training is faster
(docs/performance.md). A tunable is read only when a process
starts, so `train.py` and the benchmarks, when run as programs (never on import), restart
themselves once with it set. A guard variable makes the restart happen at most once; a process
that reads its program from standard input, runs under a debugger or tracer, or whose exec fails
runs on without the tunable and says so on standard error.

Nothing happens when the process is not on Linux with glibc 2.35 or later, when the kernel has
transparent huge pages switched off, when `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb`
(the user's value wins), or when `DENSENET_JAX_HUGEPAGES=0`.
"""

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'DENSENET_JAX_HUGEPAGES'
# Set in the restarted process: it never restarts again, whatever its environment says.
RESTARTED = 'DENSENET_JAX_HUGEPAGES_RESTARTED'
_THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_has_tunable() -> bool:
  if sys.platform != 'linux':
    return False
  lib, version = platform.libc_ver()
  try:
    return lib == 'glibc' and tuple(int(v) for v in version.split('.')[:2]) >= (2, 35)
  except ValueError:
    return False


def thp_mode() -> Optional[str]:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(_THP_ENABLED) as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return None


def _kernel_has_thp() -> bool:
  return thp_mode() not in (None, 'never')


def restart_environment(environ: Mapping[str, str]) -> Optional[dict]:
  """The environment to restart this process with, or None when no restart is wanted."""
  if environ.get(OPT_OUT, '1') == '0' or TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return None
  if not (_glibc_has_tunable() and _kernel_has_thp()):
    return None
  tunables = ':'.join(t for t in (environ.get('GLIBC_TUNABLES'), f'{TUNABLE}=1') if t)
  return dict(environ, GLIBC_TUNABLES=tunables)


def _cannot_restart() -> Optional[str]:
  """Why re-executing this process would not run the same program again, if it would not."""
  if sys.argv and sys.argv[0] in ('-', ''):
    return 'the program was read from standard input'
  if sys.gettrace() is not None:
    return 'a debugger or tracer is attached'
  if not getattr(sys, 'orig_argv', None):
    return 'the original command line is unknown'
  return None


def restart_with_hugepages() -> bool:
  """Replaces this process by itself with the tunable set (same PID, arguments, environment).

  Call it from a program's `if __name__ == '__main__':` entry, before the slow imports; never
  at import time. It returns (False) when no restart is wanted or possible, and does not return
  when the restart happens.
  """
  if os.environ.get(RESTARTED):
    return False
  environ = restart_environment(os.environ)
  if environ is None:
    return False
  reason = _cannot_restart()
  if reason is None:
    environ[RESTARTED] = '1'
    sys.stdout.flush()
    sys.stderr.flush()
    try:
      os.execve(sys.executable, sys.orig_argv, environ)
    except OSError as e:
      reason = f'exec failed: {e}'
  sys.stderr.write(f'densenet_jax: running without {TUNABLE}=1 (huge pages for large '
                   f'allocations; slower on CPU) because {reason}.\n')
  return False
