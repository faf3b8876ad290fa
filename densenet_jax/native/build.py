"""Compiling the oneDNN library (densenet_jax/native/onednn.py loads it), once per machine.

The library (both files, with `parts.h` and `conv_primitives.h`) is compiled on first use with
the C++ compiler (`$CXX`, else `g++`) against the oneDNN headers and library that `pip install
onednn-cpu-gomp onednn-devel-cpu-gomp` puts under `sys.prefix` (or under
`$DENSENET_JAX_ONEDNN_ROOT`), and cached under `$DENSENET_JAX_CACHE` (default
`~/.cache/densenet_jax`), keyed by the sources, the compiler and its version, the flags,
jaxlib's version and the oneDNN found (path and version). A cached library that another user
owns, or that others may write, is never loaded; where the cache directory cannot be written or
holds such a file, the library is built in a private directory of this process instead. `build`
raises where any of that is missing; onednn.available() then logs why and the models use XLA's
convolutions.
"""

import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Optional

from absl import logging
import jax
import jaxlib

_HERE = pathlib.Path(__file__).parent
_SOURCES = [_HERE / 'onednn_conv.cc', _HERE / 'bottleneck.cc']
_HEADERS = [_HERE / 'parts.h', _HERE / 'conv_primitives.h']

def _onednn_root() -> pathlib.Path:
  """The prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so."""
  candidates = [os.environ.get('DENSENET_JAX_ONEDNN_ROOT'), sys.prefix]
  for root in filter(None, candidates):
    root = pathlib.Path(root)
    if (root / 'include/oneapi/dnnl/dnnl.hpp').exists() and (root / 'lib/libdnnl.so').exists():
      return root
  raise FileNotFoundError(
      'no oneDNN headers and library (include/oneapi/dnnl/dnnl.hpp, lib/libdnnl.so) under '
      f'{" or ".join(map(str, filter(None, candidates)))}; install them with '
      '`pip install onednn-cpu-gomp onednn-devel-cpu-gomp` or set DENSENET_JAX_ONEDNN_ROOT')


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'densenet_jax'
  return pathlib.Path(os.environ.get('DENSENET_JAX_CACHE', default))


_FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w')
_private_dir = []  # This process's own build directory, made when first needed.


def _compiler_version(compiler: str) -> str:
  """The first line of `compiler --version` (part of the cache key)."""
  try:
    result = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                            check=False, timeout=60)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'no C++ compiler {compiler!r} (set CXX)') from e
  return (result.stdout or result.stderr).splitlines()[0] if (result.stdout or
                                                              result.stderr) else ''


def _onednn_version(root: pathlib.Path) -> str:
  header = root / 'include/oneapi/dnnl/dnnl_version.h'
  text = header.read_text() if header.exists() else ''
  library = (root / 'lib/libdnnl.so').resolve()
  return f'{library.name} ' + ' '.join(line.split()[-1] for line in text.splitlines()
                                      if line.startswith('#define DNNL_VERSION_'))


def cache_key(compiler: str, root: pathlib.Path) -> str:
  """What the library depends on: sources, compiler and version, flags, jaxlib, oneDNN."""
  parts = [b''.join(path.read_bytes() for path in _SOURCES + _HEADERS),
           jaxlib.__version__.encode(), str(root.resolve()).encode(), compiler.encode(),
           _compiler_version(compiler).encode(), ' '.join(_FLAGS).encode(),
           _onednn_version(root).encode()]
  return hashlib.sha256(b'\0'.join(parts)).hexdigest()[:16]


def untrusted(path: pathlib.Path) -> Optional[str]:
  """Why a cached library must not be loaded (another owner, writable by others), or None."""
  info = path.stat()
  if info.st_uid != os.getuid():
    return f'{path} is owned by uid {info.st_uid}, not by this user ({os.getuid()})'
  if info.st_mode & 0o022:
    return f'{path} is writable by other users (mode {oct(info.st_mode & 0o777)})'
  return None


def _compile(command, tmp: str, compiler: str) -> None:
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'no C++ compiler {compiler!r} (set CXX)') from e
  if result.returncode != 0:
    names = ', '.join(path.name for path in _SOURCES)
    raise RuntimeError(f'compiling {names} failed:\n{" ".join(command)}\n'
                       f'{result.stderr[-4000:]}')


def build() -> pathlib.Path:
  """Compiles the library into the cache (once per key, see `cache_key`); its path.

  Raises FileNotFoundError (no oneDNN, no compiler) or RuntimeError (compilation failed).
  """
  root = _onednn_root()
  compiler = os.environ.get('CXX', 'g++')
  name = f'onednn_conv-{cache_key(compiler, root)}.so'
  for directory in (_cache_dir(), None):
    if directory is None:  # This process's own directory (mode 0700).
      if not _private_dir:
        _private_dir.append(pathlib.Path(tempfile.mkdtemp(prefix='densenet_jax-')))
      directory = _private_dir[0]
    out = directory / name
    if out.exists():
      reason = untrusted(out)
      if reason is None:
        return out
      logging.warning('Not loading the cached oneDNN library: %s; building a private one.',
                      reason)
      continue
    try:
      out.parent.mkdir(parents=True, exist_ok=True)
      # Compile to a private name and rename, so concurrent processes never load a partial file.
      fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
    except OSError as e:  # A read-only or foreign cache directory.
      logging.warning('Cannot write the oneDNN cache %s (%s); building in a private directory.',
                      directory, e)
      continue
    os.close(fd)
    command = [compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', f'-I{root / "include"}',
               *map(str, _SOURCES), '-o', tmp, f'-L{root / "lib"}', '-ldnnl',
               f'-Wl,-rpath,{root / "lib"}']
    try:
      _compile(command, tmp, compiler)
      os.chmod(tmp, 0o755)
    except BaseException:
      os.unlink(tmp)
      raise
    os.replace(tmp, out)
    return out
  raise RuntimeError('no usable directory to build the oneDNN library in')
