"""Batched kernel initialisation (models/initializers.py): flax's values, fewer computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from densenet_jax.models import create_model
from densenet_jax.models import initializers
from densenet_jax.training import train_lib


def plain_params(model, rng, size):
  """What create_train_state's params were before: flax's own init, one draw per kernel."""
  params_rng, _ = jax.random.split(rng)
  return jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)), train=False))(
      params_rng)['params']


def assert_same_values(params, reference):
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  kernels = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    y = reference
    for p in path:
      y = y[p.key]
    # The same draws: at most a rounding of the scaling apart (different draws differ by O(1)).
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
    if path[-1].key == 'kernel' and 'classifier' not in jax.tree_util.keystr(path):
      kernels += 1
      assert np.std(np.asarray(x)) > 0, jax.tree_util.keystr(path)
  return kernels


@pytest.mark.parametrize('name,overrides', [
    ('densenet_bc', dict(depth=10, growth_rate=4)),                   # scanned blocks
    ('densenet_bc', dict(depth=10, growth_rate=4, scan_segments=0)),  # unrolled layers
    ('densenet_bc', dict(depth=10, growth_rate=4, memory_efficient=True)),
    ('densenet_cifar', dict(depth=10, growth_rate=4)),   # 3x3 kernels of every input width
])
@pytest.mark.slow
def test_create_train_state_draws_flax_values(name, overrides):
  """Every kernel gets the draws flax's own init gives it; none is left a zero placeholder."""
  model = create_model(name, **overrides)
  mesh = train_lib.create_mesh()
  state, _ = train_lib.create_train_state(model, optax.sgd(0.1), 3, (8, 8, 3), mesh)
  kernels = assert_same_values(state.params, plain_params(model, jax.random.PRNGKey(3), 8))
  assert kernels >= 7


@pytest.mark.slow
def test_kernel_keys_are_derived_in_one_batch():
  """Inside deferred() every kernel's key is traced back to flax's fold_in, so that fill()
  derives them all at once; if a flax upgrade derived keys differently, the values would stay
  right but the init program would again compile one fold_in per kernel (22 instead of 10 s
  for DenseNet-BC L=250)."""
  model = create_model('densenet_bc', depth=10, growth_rate=4)
  with initializers.deferred() as pending:
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
  assert len(pending.keys) >= 7
  assert all(isinstance(key, tuple) for key in pending.keys)
  assert pending.fill(variables['params']) is not None
  # Outside the block flax's scope module has jax.random back.
  import flax.core.scope  # pylint: disable=g-import-not-at-top
  assert flax.core.scope.random is jax.random


@pytest.mark.slow
def test_without_partitionable_threefry_each_kernel_is_drawn_alone():
  """The prefix trick needs partitionable threefry; without it the values are still flax's."""
  model = create_model('densenet_bc', depth=10, growth_rate=4)
  with jax.threefry_partitionable(False):
    with initializers.deferred() as pending:
      variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)), train=False)
    params = pending.fill(variables['params'])
    reference = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)), train=False)
  assert_same_values(params, reference['params'])


def test_a_lost_placeholder_is_an_error():
  model = create_model('densenet_bc', depth=10, growth_rate=4)
  with initializers.deferred() as pending:
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
  params = jax.tree.map(lambda x: x + 0, variables['params'])   # new arrays, placeholders lost
  with pytest.raises(RuntimeError, match='not found'):
    pending.fill(params)
  with initializers.deferred():
    with pytest.raises(RuntimeError, match='nest'):
      with initializers.deferred():
        pass
