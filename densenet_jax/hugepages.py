"""Back large host allocations with transparent huge pages by restarting under a glibc tunable.

XLA:CPU allocates a train step's temporary buffer (hundreds of MiB for densenet121) afresh in
every step. glibc serves an allocation that size with a new `mmap` and returns it with `munmap`,
so the kernel faults in and zeroes every 4 KiB page again in every step. On the 2-core VM that
the README's figures come from, that was 147,000 page faults per densenet121 step (batch 8) and
198,000 per DenseNet-BC-100 step (batch 64), about a tenth of the step time.

glibc's `glibc.malloc.hugetlb=1` tunable makes malloc advise the kernel to back such memory with
transparent huge pages (2 MiB). Faults drop to a few hundred per step and training ran 8-15%
faster on that VM (measured in alternating processes). A tunable is read only when a process
starts, so `train.py` and the benchmarks restart themselves once with it set.

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


def restart_with_hugepages() -> None:
  """Replaces this process by itself with the tunable set (same PID, arguments, environment).

  Call it first thing in a program's entry point, before JAX or anything else has started
  threads or allocated memory; it returns immediately when no restart is wanted.
  """
  environ = restart_environment(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
