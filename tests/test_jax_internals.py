"""What densenet_jax/runtime/jax_internals.py reaches inside JAX and Flax is still there and still
does what the package relies on: these fail, naming what moved, when a JAX or Flax upgrade moves it
(the multi-host tests exercise the coordination client itself)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.models import initializers
from densenet_jax.runtime import jax_internals


def test_distributed_state_in_a_single_process():
  """Without `jax.distributed.initialize` there is no client and no preemption service; the
  attributes exist (an upgrade that renames them fails here, not in a multi-host run)."""
  assert jax_internals.coordination_client() is None
  assert jax_internals.preemption_service_running() is False


def test_flax_derives_parameter_keys_with_scope_random():
  """initializers.deferred() batches the kernels' key derivation by watching the fold_in of
  the `jax.random` that Flax's scope uses: Flax must still call it for every parameter."""
  calls = []

  class Counting:
    def __getattr__(self, name):
      return getattr(jax.random, name)

    def fold_in(self, key, data):
      calls.append(data)
      return jax.random.fold_in(key, data)

  previous = jax_internals.swap_flax_scope_random(Counting())
  try:
    nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
  finally:
    jax_internals.swap_flax_scope_random(previous)
  assert previous is jax.random and jax_internals.flax_scope_random() is jax.random
  assert len(calls) >= 2, 'flax no longer derives parameter keys with scope.random.fold_in'


def test_deferred_initialisation_restores_flax():
  with initializers.deferred():
    assert jax_internals.flax_scope_random() is not jax.random
  assert jax_internals.flax_scope_random() is jax.random
