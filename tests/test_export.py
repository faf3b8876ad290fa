"""The trainer's train step lowers for TPUs and GPUs from this CPU host, and takes their path.

Users train on TPU pods and GPUs; the tests run on a CPU. `jax.export` lowers the step that
`train_lib.compile_steps` builds, with its shardings over a mesh, for another platform without
its devices, so each accelerator program is checked here:

1. it exports at all: lowering for the platform succeeds, and `jax.export` refuses custom calls
   without a compatibility guarantee, so no CPU-only native call (the oneDNN FFI targets,
   registered for 'cpu' only in densenet_jax/native/onednn.py) was reached;
2. its text holds no `densenet_onednn_` call;
3. its blocks read their buffers in the accelerators' chunks (models/policy.py `scan_chunk`):
   the channel slices of a block's buffer are as wide as the accelerator chunk, never the CPU's
   where the two differ.

The same step exported for the CPU, where oneDNN is built, is the control: it does call the
fused bottleneck and reads the CPU's chunks, so the tests above would fail if the blocks chose
their path by the host's platform rather than by the one the step is lowered for.

Add a model to `MODELS` to check it on every platform.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export
from jax.sharding import Mesh

from densenet_jax.models import create_model
from densenet_jax.models import dispatch
from densenet_jax.native import onednn
from densenet_jax.training import train_lib

# Fields of `create_model('densenet_bc', depth=16, growth_rate=4, num_classes=10, ...)`: three
# dense blocks of two layers, each block's buffer 16 channels wide unless the stem is widened.
MODELS = {
    'scanned': {},
    'scanned-bfloat16': dict(dtype=jnp.bfloat16),
    'memory-efficient': dict(memory_efficient=True),
    'unrolled-memory-efficient': dict(memory_efficient=True, scan_segments=0),
    # A 44-map stem makes the first block's buffer 52 channels wide: there the CPU's
    # memory-efficient chunk (48) and the accelerators' (128, so all 52) differ, where in the
    # 16-channel blocks both are the whole buffer.
    'memory-efficient-wide-stem': dict(memory_efficient=True, num_init_features=44),
    # A layer the specialised path declines: scanned blocks take the generic path everywhere.
    'squeeze-excitation': dict(se_ratio=0.5),
    'squeeze-excitation-memory-efficient': dict(se_ratio=0.5, memory_efficient=True),
}
IMAGE, BATCH = 8, 16   # CIFAR stem: block b runs at IMAGE / 2**b
DEVICES = 8   # the mesh, as conftest.py fakes it: a TPU slice's or an 8-GPU host's
# Every model for TPU and GPU on the 8-device mesh; one also on a one-device mesh (one GPU).
ACCELERATORS = ([(name, platform, DEVICES) for name in MODELS for platform in ('tpu', 'cuda')]
                + [('scanned', platform, 1) for platform in ('tpu', 'cuda')])


def _model(name):
  return create_model('densenet_bc', depth=16, growth_rate=4, num_classes=10, **MODELS[name])


@functools.lru_cache(maxsize=None)
def _train_step(name: str, devices: int):
  """The trainer's train step (`train_lib.compile_steps`) of model `name` on a mesh of the
  first `devices` host devices, with abstract arguments: (model, jitted step, state, batch).

  Only shapes are needed: the state is `create_train_state`'s, traced with `jax.eval_shape`
  (no initialisation is compiled), and replicated as `create_train_state` shards it. One
  jitted step per model and mesh, so that its exports for several platforms share one trace.
  """
  model = _model(name)
  tx = optax.sgd(0.1, momentum=0.9)
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  state = jax.eval_shape(
      lambda: train_lib.create_train_state(model, tx, 0, (IMAGE, IMAGE, 3), mesh)[0])
  shardings = jax.tree.map(lambda _: train_lib.replicated(mesh), state)
  state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                sharding=sharding),
                       state, shardings)
  data = train_lib.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((BATCH, IMAGE, IMAGE, 3), jnp.float32, sharding=data),
           'label': jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=data)}
  p_train, _ = train_lib.compile_steps(model, tx, optax.constant_schedule(0.1), 0.0, shardings,
                                       mesh)
  return model, p_train, state, batch


def export_train_step(name: str, platform: str, devices: int):
  """(model, the trainer's train step of model `name` exported for `platform`)."""
  model, p_train, state, batch = _train_step(name, devices)
  # jax.export refuses custom calls it has no compatibility guarantee for: allowed for the
  # CPU control only, which is meant to hold them.
  allowed = ([export.DisabledSafetyCheck.custom_call(f'densenet_onednn_{target}')
              for target in onednn._TARGETS]   # pylint: disable=protected-access
             if platform == 'cpu' else [])
  return model, export.export(p_train, platforms=[platform], disabled_checks=allowed)(state,
                                                                                       batch)


def onednn_calls(text: str) -> set:
  return set(re.findall(r'custom_call @(densenet_onednn_\w+)', text))


def chunk_widths(text: str, size: int, width: int) -> set:
  """Widths of the channel slices taken of [batch, size, size, width] arrays (a block's
  buffer or its output, any element type: bfloat16 ones are sliced as their bits)."""
  pattern = (rf'stablehlo\.dynamic_slice [^\n]*: \(tensor<{BATCH}x{size}x{size}x{width}x\w+>'
             rf'[^\n]*-> tensor<{BATCH}x{size}x{size}x(\d+)x\w+>')
  return {int(c) for c in re.findall(pattern, text)}


def _path(model):
  return dispatch.block_path(model.layer_spec, scan_segments=model.scan_segments,
                             specialised=model.specialised)


def chunked_blocks(model):
  """(block, spatial size, buffer width) of each block whose buffer is read chunk by chunk:
  a specialised scanned block's layers, a memory-efficient block's transition (none after the
  last). The generic scanned path reads the whole buffer."""
  blocks = range(len(model.block_sizes))
  if _path(model) != dispatch.SPECIALISED:
    blocks = blocks[:-1] if model.memory_efficient else []
  return [(b, IMAGE >> b, model.block_inputs[b] + model.block_sizes[b] * model.growth_rate)
          for b in blocks]


def chunk(model, platform: str, block: int, width: int) -> int:
  """The chunk a block's `width`-channel buffer is read in (at most the whole buffer)."""
  return min(model.chunk_for(platform, block), width)


@pytest.fixture
def onednn_if_available():
  """oneDNN on where it can be built, so that the CPU branches the accelerator programs must
  drop hold its calls; the test runs either way."""
  previous = onednn._state['enabled']   # pylint: disable=protected-access
  onednn.set_enabled(True)
  yield
  onednn.set_enabled(previous)


@pytest.mark.usefixtures('onednn_if_available')
@pytest.mark.parametrize('name, platform, devices', ACCELERATORS,
                         ids=[f'{n}-{p}-{d}dev' for n, p, d in ACCELERATORS])
def test_train_step_exports_for_accelerators(name, platform, devices):
  model, exported = export_train_step(name, platform, devices)   # 1: raises on a oneDNN call
  assert exported.platforms == (platform,)
  assert exported.nr_devices == devices
  text = exported.mlir_module()
  assert 'densenet_onednn' not in text   # 2
  assert not model.se_ratio or _path(model) == dispatch.GENERIC
  for block, size, width in chunked_blocks(model):   # 3
    widths = chunk_widths(text, size, width)
    assert chunk(model, 'gpu', block, width) in widths, (block, widths)
    if chunk(model, 'cpu', block, width) != chunk(model, 'gpu', block, width):
      assert chunk(model, 'cpu', block, width) not in widths, (block, widths)


@pytest.mark.usefixtures('onednn_if_available')   # not `use_onednn`: it traces on one device
@pytest.mark.parametrize('name', MODELS)
def test_cpu_control_takes_the_cpu_path(name):
  """The same step lowered for the CPU (oneDNN on) calls oneDNN: the fused bottleneck in
  scanned blocks (models/policy.py `fused_bottleneck`: ReLU bottleneck layers, float32 or
  bfloat16 buffers), its convolutions in the element types it takes here; a memory-efficient
  transition reads the CPU's chunks."""
  if not onednn.available():
    pytest.skip(f'no oneDNN here: {onednn.unavailable_reason()}')
  model, exported = export_train_step(name, 'cpu', DEVICES)
  text = exported.mlir_module()
  calls = onednn_calls(text)
  expected = set()
  if _path(model) == dispatch.SPECIALISED and model.bottleneck and model.activation == 'relu':
    expected |= {'densenet_onednn_bottleneck_forward', 'densenet_onednn_bottleneck_backward'}
  if jnp.dtype(model.dtype) in onednn.dtypes():
    expected |= {'densenet_onednn_conv_forward', 'densenet_onednn_conv_backward_data',
                 'densenet_onednn_conv_backward_weights'}
  assert expected and expected <= calls, calls
  if _path(model) != dispatch.SPECIALISED:   # the fused call declines other layers
    assert not {c for c in calls if 'bottleneck' in c}, calls
  if model.memory_efficient:   # the transitions: every block's but the last
    for block, size, width in chunked_blocks(model)[:len(model.block_sizes) - 1]:
      widths = chunk_widths(text, size, width)
      assert chunk(model, 'cpu', block, width) in widths, (block, widths)
      if chunk(model, 'cpu', block, width) != chunk(model, 'gpu', block, width):
        assert chunk(model, 'gpu', block, width) not in widths, (block, widths)
