"""Each of 8 CPU devices runs the native oneDNN calls on its own part of the batch
(densenet_jax/native/shards.py), and the step is the one a single device computes."""

import re

import jax
import numpy as np
import optax
import pytest

from densenet_jax import train_lib
from densenet_jax.models import create_model
from densenet_jax.native import onednn

BATCH, DEVICES = 40, 8   # 5 images per device: no kernel dimension is 5 or 40.


def _shapes(text):
  return [tuple(int(d) for d in dims.split(',') if d)
          for dims in re.findall(r'f32\[([\d,]*)\]', text)]


@pytest.mark.parametrize('name, fields', [
    ('densenet_bc', dict(depth=16, growth_rate=4)),   # scanned blocks, the fused bottleneck
    ('densenet_bc', dict(depth=16, growth_rate=4, memory_efficient=True, scan_segments=0)),
    ('preact_resnet_cifar', dict(depth=11)),   # strided convolutions and projections
], ids=['scanned', 'unrolled-memory-efficient', 'preact-resnet'])
def test_each_device_computes_its_part_of_the_batch(name, fields):
  if not onednn.available():
    pytest.skip(f'no oneDNN here: {onednn.unavailable_reason()}')
  assert jax.device_count() == DEVICES
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
      hlo = compiled.as_text()
      assert 'all-gather' not in hlo
      calls = [line for line in hlo.splitlines()
               if 'custom_call_target="densenet_onednn_' in line]
      assert calls
      for line in calls:
        batch_dims = [s[0] for s in _shapes(line) if len(s) == 4 and s[0] not in (1, 3)]
        assert batch_dims and set(batch_dims) == {BATCH // DEVICES}, line
    for _ in range(2):
      state, _ = compiled(state, data)
    finals.append(jax.device_get((state.params, state.batch_stats)))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5), *finals)
