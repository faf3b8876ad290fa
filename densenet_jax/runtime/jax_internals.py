"""What this package needs from JAX and Flax that they offer no public API for, in one place.

* The coordination service's key-value client (`coordination_client`): coordination.py builds
  the multi-host barriers with timeouts, the leases and the peer checks on it. JAX's public
  multi-host helpers (`jax.experimental.multihost_utils`) block without a timeout and cannot
  tell a dead peer from a slow one.
* Whether JAX's preemption sync service runs (`preemption_service_running`): run_guard.py then
  leaves SIGTERM to it.
* The `jax.random` that Flax's scope derives parameter keys with (`swap_flax_scope_random`):
  models/initializers.py watches its `fold_in` to batch the kernels' key derivation.

Each is reached lazily, through the functions here only; tests/test_jax_internals.py checks that
each still exists and does what these modules rely on, and fails naming the library and version
when one moves.
"""

import importlib

import flax
import jax


def _distributed_state():
  try:
    return importlib.import_module('jax._src.distributed').global_state
  except (ImportError, AttributeError) as e:
    raise RuntimeError(f'jax {jax.__version__} has no jax._src.distributed.global_state, which '
                       'densenet_jax/runtime/jax_internals.py reads: update it for this '
                       'version') from e


def coordination_client():
  """The coordination service's client after `jax.distributed.initialize`, else None."""
  return _distributed_state().client


def preemption_service_running() -> bool:
  """Whether JAX's preemption sync service was started (`jax.distributed.initialize`)."""
  return _distributed_state().preemption_sync_manager is not None


def swap_flax_scope_random(new):
  """Makes Flax's scope derive parameter keys with `new` (a stand-in for the `jax.random`
  module) and returns what it used before."""
  scope = importlib.import_module('flax.core.scope')
  if not hasattr(scope, 'random'):
    raise RuntimeError(f'flax {flax.__version__}: flax.core.scope has no `random`, which '
                       'densenet_jax/runtime/jax_internals.py replaces: update it for this version')
  previous, scope.random = scope.random, new
  return previous


def flax_scope_random():
  """The `jax.random` stand-in Flax's scope derives parameter keys with now."""
  return importlib.import_module('flax.core.scope').random
