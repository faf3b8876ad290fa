"""Each device runs the native calls on its own part of the batch, or the calls are not used.

Why: XLA's partitioner cannot see inside a custom call. Under `jax.jit` with the batch split over
N devices it gathered every oneDNN call's operands and ran each call on the global batch on every
device: the right result for N times the work, plus an all-gather of activations per call.

`split` wraps a call in `jax.shard_map` over the axes of the mesh being traced under (the
trainer's steps set it, train_lib.compile_steps; `jax.set_mesh` does too). Operands with a batch
dimension are split along it and the others (kernels, per-channel factors, scalars) are
replicated. Results with a batch dimension stay split; results that are sums over the batch
(kernel gradients, the fused call's per-channel gradients) are summed over the devices with
`psum`, as XLA's own convolution gradients are. BatchNorm's statistics are computed outside
the calls, by XLA, over the global batch. So one device or N compute the same step
(tests/test_shards.py).

The calls are used only where that split is known (`partition_known`): under a mesh, or in a
process that sees one device (nothing can be split). A step traced over several devices without
a mesh (the legacy `with mesh:` context leaves none set, nor do sharded inputs alone) may have
its batch split in any way, and nothing public tells a traced function how: there the calls
decline (densenet_jax/native/onednn.py asks before each one) and XLA's own convolutions run,
which XLA's partitioner splits; the values agree to float32 rounding. That is logged once, with
the remedy: trace under `jax.set_mesh(mesh)`, as the trainer does.

On a mesh of one device, inside a shard_map over all of the mesh's axes, or for a batch the
devices do not divide, `split` calls the function as it is.
"""

import math
import threading
from typing import Callable, Optional, Sequence, Tuple

from absl import logging
import jax
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

BATCH, SUM = 'batch', 'sum'
_lock = threading.Lock()
_logged = {'declined': False}   # whether `partition_known` has said why it declines


def partition_known() -> bool:
  """Whether the native calls traced here know how the batch is split over the devices: a
  mesh is being traced under (`split` partitions from it), or this process sees one device.
  Otherwise they must not be used (see the module docstring); the first time, says so once."""
  if not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1:
    return True
  with _lock:
    if _logged['declined']:
      return False
    _logged['declined'] = True
    logging.warning(
        'oneDNN calls not used, XLA\'s convolutions instead: this step is traced over %d '
        'devices without a mesh (as under the legacy `with mesh:` or with sharded inputs '
        'alone), so how the batch is split is unknown to them; trace it under '
        '`jax.set_mesh(mesh)`, as the trainer does, to use them.', jax.device_count())
  return False


def batch_axes(*batched: jax.Array) -> Optional[Tuple[str, ...]]:
  """The mesh axes the batch dimension of `batched` is split over, or None where the call
  should run as it is (see the module docstring)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind != AxisType.Manual)
  size = math.prod(mesh.shape[name] for name in axes)
  if size == 1 or any(x.shape[0] % size for x in batched):
    return None
  return axes


def split(fn: Callable, *args, batched: Sequence[bool], outputs: Sequence[str]):
  """fn(*args) with each device computing its part of the batch.

  Args:
    fn: a function of `args` returning a tuple of arrays.
    *args: its operands.
    batched: per operand, whether its first dimension is the batch.
    outputs: per result, BATCH (its first dimension is the batch) or SUM (a sum over the batch).

  Returns:
    fn's results, as a tuple.
  """
  axes = batch_axes(*(a for a, b in zip(args, batched) if b))
  if axes is None:
    return tuple(fn(*args))

  def local(*shard_args):
    results = fn(*shard_args)
    return tuple(r if kind == BATCH else lax.psum(r, axes) for r, kind in zip(results, outputs))

  return jax.shard_map(
      local, mesh=jax.sharding.get_abstract_mesh(), axis_names=set(axes),
      in_specs=tuple(P(axes) if b else P() for b in batched),
      out_specs=tuple(P(axes) if kind == BATCH else P() for kind in outputs),
      check_vma=False)(*args)
