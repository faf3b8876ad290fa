"""The convolution kernels' initialisation, drawn in a few batched calls when a train state starts.

Flax initialises each parameter with its own call of its initialiser, and each
`jax.random.normal` call is its own threefry computation in the compiled init program. XLA
compiles every one of them separately, so for the deep models (DenseNet-BC L=250 has about 500
kernels) one draw per kernel makes `train_lib.create_train_state` compile for longer than the
train step itself (docs/design.md#initialisation; today's times are in docs/performance.md,
"Initialising the train state").

Inside `deferred()`, `conv_kernel_init` only records each kernel's key and shape and returns
zeros; `Deferred.fill` then draws the kernels of similar size together, one vmapped
`jax.random.normal` over their keys per size class, and puts them where the zeros were. The
values are the plain initialiser's, to float32 rounding: in JAX's threefry, which is
"partitionable" by default, element i of `normal(key, shape)` depends only on the key and on i's
row-major position, so `normal(key, (n,))[:size].reshape(shape)` holds the same draws for any
n >= size. Where that does not hold (another PRNG implementation, or
`jax_threefry_partitionable=False`), `fill` draws each kernel on its own, as flax would.

The kernels' keys are batched too. Flax derives each parameter's key with one `fold_in` of the
init key and a hash of the parameter's path, which XLA compiles like a draw: with batched draws
but one fold_in per kernel, the deep models' init still compiled for a long time. Inside `deferred()`
flax's `fold_in` is watched (`_FoldInWatcher`): its results are unchanged, but `fill` knows the
(key, data) behind each kernel's key and redoes all of them in one vmapped `fold_in`; flax's own
are then dead code, which XLA removes.
"""

import contextlib
import math
import threading
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp

from densenet_jax.runtime import jax_internals

# He normal initialisation with fan_out, as the official Torch implementation of the paper
# (and fb.resnet.torch, which it builds on) initialises convolutions:
# std = sqrt(2 / (kernel_h * kernel_w * out_channels)). fan_out rather than fan_in keeps the
# variance of the *backward* signal constant, which matters more than the forward one in a
# network whose early feature maps feed every later layer of their block.
_plain_init = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

_active = threading.local()
_watch_lock = threading.Lock()
_watchers = 0   # deferred() blocks open, in all threads


class _FoldInWatcher:
  """Stands in for `jax.random` in flax's scope module while deferred() blocks are open: the
  same functions, but each `fold_in` result is remembered with its key and data by the
  calling thread's open `Deferred`."""

  def __init__(self, real):
    self.real = real

  def __getattr__(self, name):
    return getattr(self.real, name)

  def fold_in(self, key, data):
    out = self.real.fold_in(key, data)
    pending = getattr(_active, 'deferred', None)
    if pending is not None:
      pending.origins[id(out)] = (out, key, data)   # holding `out` keeps its id unique
    return out


class Deferred:
  """The kernels `conv_kernel_init` was asked for inside one `deferred()` block."""

  def __init__(self):
    self.keys: List[Any] = []   # a key, or (parent key, data) of a watched fold_in
    self.shapes: List[Sequence[int]] = []
    self.dtypes: List[Any] = []
    self.placeholders: List[jax.Array] = []
    self.origins: Dict[int, Any] = {}   # id(fold_in result) -> (result, key, data)

  def record(self, key, shape, dtype):
    placeholder = jnp.zeros(shape, dtype)
    origin = self.origins.get(id(key))
    self.keys.append(origin[1:] if origin is not None and origin[0] is key else key)
    self.shapes.append(tuple(shape))
    self.dtypes.append(dtype)
    self.placeholders.append(placeholder)
    return placeholder

  def _keys(self) -> List[jax.Array]:
    """The recorded kernels' keys: those that flax derived with a watched fold_in are derived
    again here, one vmapped fold_in per parent key."""
    keys = list(self.keys)
    parents: Dict[int, Any] = {}
    for i, key in enumerate(keys):
      if isinstance(key, tuple):
        parents.setdefault(id(key[0]), (key[0], []))[1].append(i)
    for parent, members in parents.values():
      data = jnp.stack([jnp.asarray(keys[i][1], jnp.uint32) for i in members])
      derived = jax.vmap(lambda d, p=parent: jax.random.fold_in(p, d))(data)
      for row, i in enumerate(members):
        keys[i] = derived[row]
    return keys

  def _draw(self) -> List[jax.Array]:
    """The recorded kernels' values, in the order they were recorded."""
    keys = self._keys()
    if not _prefix_draws_hold(keys):
      return [_plain_init(k, s, d) for k, s, d in zip(keys, self.shapes, self.dtypes)]
    values = [None] * len(self.keys)
    classes: Dict[Any, List[int]] = {}
    for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes)):
      # Size classes of powers of two: at most twice the draws of one call per kernel.
      size = math.prod(shape)
      classes.setdefault((1 << max(0, size - 1).bit_length(), jnp.dtype(dtype)), []).append(i)
    for (length, dtype), members in classes.items():
      batch_keys = jnp.stack([keys[i] for i in members])
      draws = jax.vmap(lambda key, n=length, t=dtype: jax.random.normal(key, (n,), t))(
          batch_keys)
      for row, i in enumerate(members):
        shape = self.shapes[i]
        values[i] = draws[row, :math.prod(shape)].reshape(shape) * _stddev(shape, dtype)
    return values

  def fill(self, tree):
    """`tree` (the params from the `deferred()` block) with each placeholder replaced by its
    kernel. Every recorded kernel must appear exactly once: a placeholder left in place would be
    an all-zero kernel, so anything else is an error, not a silent fallback."""
    index = {id(p): i for i, p in enumerate(self.placeholders)}
    found = [0] * len(self.placeholders)

    def where(leaf):
      i = index.get(id(leaf), -1)
      if i >= 0:
        found[i] += 1
      return i

    positions = jax.tree.map(where, tree)
    if found.count(1) != len(found):
      raise RuntimeError(
          f'deferred kernel initialisation: {found.count(0)} of {len(found)} kernels were not '
          f'found in the parameters and {sum(n > 1 for n in found)} were found more than once')
    values = self._draw()
    return jax.tree.map(lambda leaf, i: leaf if i < 0 else values[i], tree, positions)


def _stddev(shape, dtype):
  """sqrt(2 / fan_out) for an HWIO kernel, computed as `_plain_init` does."""
  fan_out = shape[-1] * math.prod(shape[:-2])
  return jnp.sqrt(jnp.array(2.0 / fan_out, dtype=dtype))


def _prefix_draws_hold(keys) -> bool:
  """Whether normal(key, (n,)) starts with normal(key, shape)'s draws: threefry keys, and
  threefry's partitionable form."""
  if not jax.config.jax_threefry_partitionable:
    return False
  for key in keys:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(key)
    else:
      impl = jax.config.jax_default_prng_impl
    if 'threefry' not in str(impl):
      return False
  return True


@contextlib.contextmanager
def deferred():
  """Within this block `conv_kernel_init` returns zeros and records what it was asked for; the
  yielded `Deferred`'s `fill` then puts the real kernels in their place."""
  global _watchers
  if getattr(_active, 'deferred', None) is not None:
    raise RuntimeError('deferred() blocks do not nest')
  _active.deferred = Deferred()
  with _watch_lock:
    if _watchers == 0 and jax_internals.flax_scope_random() is jax.random:
      jax_internals.swap_flax_scope_random(_FoldInWatcher(jax.random))
    _watchers += 1
  try:
    yield _active.deferred
  finally:
    _active.deferred = None
    with _watch_lock:
      _watchers -= 1
      if _watchers == 0 and isinstance(jax_internals.flax_scope_random(), _FoldInWatcher):
        jax_internals.swap_flax_scope_random(jax_internals.flax_scope_random().real)


@contextlib.contextmanager
def immediate():
  """Within this block `conv_kernel_init` draws its kernels at once, also inside `deferred()`:
  for kernels created inside a transform's body (a scan over identical blocks draws one
  vmapped kernel per variable), whose placeholders `fill` could never find in the tree."""
  saved = getattr(_active, 'deferred', None)
  _active.deferred = None
  try:
    yield
  finally:
    _active.deferred = saved


def conv_kernel_init(key, shape, dtype=jnp.float32):
  """He normal (fan_out) convolution kernel, [h, w, in, out]; recorded inside `deferred()`."""
  pending = getattr(_active, 'deferred', None)
  if pending is not None:
    return pending.record(key, shape, dtype)
  return _plain_init(key, shape, dtype)
