"""train.py's restart under glibc's transparent-huge-page tunable
(densenet_jax/runtime/hugepages.py)."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest

from densenet_jax.runtime import hugepages

# Restarts itself as train.py does, then faults in a fresh 64 MiB malloc (glibc serves it with
# its own mmap) and reports the page faults that took.
_CHILD = """
from densenet_jax.runtime import hugepages
hugepages.restart_with_hugepages()
import ctypes, json, os, resource
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(64 << 20)
ctypes.memset(p, 1, 64 << 20)
print(json.dumps(dict(faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                      tunables=os.environ.get('GLIBC_TUNABLES', ''), pid=os.getpid())))
"""
_PAGES_4K = (64 << 20) // 4096


def _child(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ('GLIBC_TUNABLES', hugepages.OPT_OUT)}
  proc = subprocess.Popen([sys.executable, '-c', _CHILD], env=dict(clean, **env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate()
  assert proc.returncode == 0, err
  report = json.loads(out.splitlines()[-1])
  # Restarting keeps the PID, so launchers and signals still reach the process.
  assert report['pid'] == proc.pid
  return report


@pytest.fixture
def supported():
  with mock.patch.object(hugepages, '_glibc_has_tunable', return_value=True), \
       mock.patch.object(hugepages, '_kernel_has_thp', return_value=True):
    yield


def test_restart_adds_the_tunable_to_the_users_tunables(supported):
  del supported
  assert hugepages.restart_environment({'A': '1'}) == {
      'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  env = hugepages.restart_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


def test_no_restart_when_already_set_opted_out_or_unsupported(supported):
  del supported
  # The user's own value wins, and the restarted process does not restart again.
  assert hugepages.restart_environment({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}) is None
  assert hugepages.restart_environment({hugepages.OPT_OUT: '0'}) is None
  with mock.patch.object(hugepages, '_kernel_has_thp', return_value=False):
    assert hugepages.restart_environment({}) is None
  with mock.patch.object(hugepages, '_glibc_has_tunable', return_value=False):
    assert hugepages.restart_environment({}) is None


@pytest.mark.skipif(hugepages.restart_environment({}) is None,
                    reason='needs Linux, glibc >= 2.35 and transparent huge pages')
def test_restarted_process_faults_in_large_allocations_by_huge_pages():
  restarted = _child()
  assert restarted['tunables'] == 'glibc.malloc.hugetlb=1'
  # 64 MiB in 4 KiB pages is 16384 faults; in 2 MiB pages a few dozen, plus the unaligned ends.
  assert restarted['faults'] < _PAGES_4K // 4, restarted
  # Under 'always' the kernel uses huge pages anyway, so there is no contrast to check.
  if hugepages.thp_mode() == 'madvise':
    plain = _child(**{hugepages.OPT_OUT: '0'})
    assert plain['tunables'] == ''
    assert plain['faults'] >= _PAGES_4K * 0.9, plain


@pytest.mark.skipif(hugepages.restart_environment({}) is None,
                    reason='needs Linux, glibc >= 2.35 and transparent huge pages')
@pytest.mark.slow
def test_importing_train_py_does_not_restart_the_process():
  # Restarted, the process would run this code again with the tunable in its environment.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  clean = {k: v for k, v in os.environ.items()
           if k not in ('GLIBC_TUNABLES', hugepages.OPT_OUT, hugepages.RESTARTED)}
  code = 'import os, train; print("tunables:", os.environ.get("GLIBC_TUNABLES", ""))'
  proc = subprocess.run([sys.executable, '-c', code], env=dict(clean, PYTHONPATH=root),
                        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'tunables:' in proc.stdout and 'hugetlb' not in proc.stdout


def test_restart_happens_at_most_once_and_falls_back(supported, monkeypatch, capsys):
  del supported
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.setenv(hugepages.RESTARTED, '1')
  with mock.patch.object(os, 'execve') as execve:
    assert hugepages.restart_with_hugepages() is False
    execve.assert_not_called()
  monkeypatch.delenv(hugepages.RESTARTED)
  with mock.patch.object(os, 'execve', side_effect=OSError('no exec here')):
    assert hugepages.restart_with_hugepages() is False
  assert 'exec failed: no exec here' in capsys.readouterr().err
  monkeypatch.setattr(sys, 'argv', ['-'])
  with mock.patch.object(os, 'execve') as execve:
    assert hugepages.restart_with_hugepages() is False
    execve.assert_not_called()
  assert 'standard input' in capsys.readouterr().err
