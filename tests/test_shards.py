"""Each of 8 CPU devices runs the native oneDNN calls on its own part of the batch
(densenet_jax/native/shards.py), and the step is the one a single device computes. Traced over
the 8 devices without a mesh, where the split is unknown, the calls are not used at all."""

import logging
import re
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from densenet_jax.models import create_model
from densenet_jax.native import onednn
from densenet_jax.native import shards
from densenet_jax.training import train_lib

pytestmark = pytest.mark.slow   # every test here starts processes or compiles whole models

BATCH, DEVICES = 40, 8   # 5 images per device: no kernel dimension is 5 or 40.


def _shapes(text):
  return [tuple(int(d) for d in dims.split(',') if d)
          for dims in re.findall(r'f32\[([\d,]*)\]', text)]


def _assert_each_call_on_its_part(hlo):
  """The compiled program `hlo` runs oneDNN calls, each on BATCH // DEVICES images, and gathers
  no activations."""
  assert 'all-gather' not in hlo
  calls = [line for line in hlo.splitlines() if 'custom_call_target="densenet_onednn_' in line]
  assert calls
  for line in calls:
    batch_dims = [s[0] for s in _shapes(line) if len(s) == 4 and s[0] not in (1, 3)]
    assert batch_dims and set(batch_dims) == {BATCH // DEVICES}, line


@pytest.mark.parametrize('name, fields', [
    ('densenet_bc', dict(depth=16, growth_rate=4)),   # scanned blocks, the fused bottleneck
    ('densenet_bc', dict(depth=16, growth_rate=4, memory_efficient=True, scan_segments=0)),
    ('preact_resnet_cifar', dict(depth=11)),   # strided convolutions and projections
], ids=['scanned', 'unrolled-memory-efficient', 'preact-resnet'])
def test_each_device_computes_its_part_of_the_batch(name, fields, monkeypatch, caplog):
  if not onednn.available():
    pytest.skip(f'no oneDNN here: {onednn.unavailable_reason()}')
  assert jax.device_count() == DEVICES
  monkeypatch.setitem(shards._logged, 'declined', False)   # pylint: disable=protected-access
  model = create_model(name, num_classes=10, **fields)
  tx = optax.sgd(0.1, momentum=0.9)
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((BATCH, 8, 8, 3), np.float32),
           'label': rng.integers(0, 10, BATCH).astype(np.int32)}
  finals = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
    state, shardings = train_lib.create_train_state(model, tx, 0, (8, 8, 3), mesh)
    p_train, _ = train_lib.compile_steps(model, tx, optax.constant_schedule(0.1), 0.0,
                                         shardings, mesh)
    data = train_lib.to_global(batch, mesh)
    compiled = p_train.lower(state, data).compile()
    if len(devices) == DEVICES:
      _assert_each_call_on_its_part(compiled.as_text())
    for _ in range(2):
      state, _ = compiled(state, data)
    finals.append(jax.device_get((state.params, state.batch_stats)))
  # The trainer traces its initialisation and steps on the mesh: no oneDNN call declined.
  assert not [r for r in caplog.records if 'oneDNN calls not used' in r.getMessage()]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5), *finals)


def _tiny():
  return create_model('densenet_bc', depth=16, growth_rate=4, num_classes=10)


def _train_gradient(model):
  """A user's own jitted train-mode step: the parameters' gradient and the BatchNorm updates."""
  def loss(params, batch_stats, images):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(logits)), updates
  return jax.jit(jax.grad(loss, has_aux=True))


def _inputs(model, mesh):
  """The variables, replicated on `mesh`, and a batch of BATCH images split over it."""
  images = np.random.default_rng(0).standard_normal((BATCH, 8, 8, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), images[:2])
  replicated = NamedSharding(mesh, P())
  return (jax.device_put(variables['params'], replicated),
          jax.device_put(variables['batch_stats'], replicated),
          jax.device_put(images, NamedSharding(mesh, P('data'))))


def _on_one_device(model):
  """The step on one device, through oneDNN (a one-device mesh: the calls know the split)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  with jax.sharding.set_mesh(mesh):
    return jax.device_get(_train_gradient(model)(*_inputs(model, mesh)))


def _assert_same_step(ours, reference):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
               ours, reference)


@pytest.fixture
def eight_devices():
  """A mesh of the 8 devices (and none set: not conftest.py's `use_onednn`, which sets one)."""
  if not onednn.available():
    pytest.skip(f'no oneDNN here: {onednn.unavailable_reason()}')
  assert jax.device_count() == DEVICES
  return jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))


def test_a_step_traced_without_a_mesh_leaves_convolutions_to_xla(eight_devices):
  """A user's own jax.jit with the batch split over 8 devices by its inputs' shardings, inside
  the legacy `with mesh:` context (which sets no mesh for tracing): nothing tells the calls how
  the batch is split, so none is used, and XLA's convolutions, which XLA splits itself, compute
  the single device's step."""
  model = _tiny()
  step = _train_gradient(model)
  inputs = _inputs(model, eight_devices)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)   # `with mesh:` is deprecated
    with eight_devices:
      assert jax.sharding.get_abstract_mesh().empty
      compiled = step.lower(*inputs).compile()
      assert 'densenet_onednn' not in compiled.as_text()
      ours = jax.device_get(compiled(*inputs))
  _assert_same_step(ours, _on_one_device(model))


def test_a_step_traced_under_the_mesh_splits_the_calls(eight_devices):
  """The same step traced under `jax.set_mesh`: each device runs the oneDNN calls on its own
  part of the batch, and computes the single device's step."""
  model = _tiny()
  step = _train_gradient(model)
  inputs = _inputs(model, eight_devices)
  with jax.sharding.set_mesh(eight_devices):
    compiled = step.lower(*inputs).compile()
    _assert_each_call_on_its_part(compiled.as_text())
    ours = jax.device_get(compiled(*inputs))
  _assert_same_step(ours, _on_one_device(model))


def test_declining_is_logged_once(eight_devices, monkeypatch, caplog):
  """Why the calls are not used, and how to get them back, in one line logged once however many
  calls and steps decline; nothing under a mesh."""
  model = _tiny()
  inputs = _inputs(model, eight_devices)
  monkeypatch.setitem(shards._logged, 'declined', False)   # pylint: disable=protected-access
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    with jax.sharding.set_mesh(eight_devices):
      _train_gradient(model).trace(*inputs)
    assert not caplog.records
    for _ in range(2):   # sharded inputs and no context at all: two steps, a dozen calls each
      assert 'densenet_onednn' not in _train_gradient(model).lower(*inputs).as_text()
  declined = [r.getMessage() for r in caplog.records if 'oneDNN' in r.getMessage()]
  assert len(declined) == 1 and '\n' not in declined[0], declined
  assert 'without a mesh' in declined[0] and 'jax.set_mesh(mesh)' in declined[0]
