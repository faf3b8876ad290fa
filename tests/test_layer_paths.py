"""Every execution path of a dense layer computes the one definition (models/dense_layer.py),
and the paths written for the paper's layer decline any other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax.models import create_model
from densenet_jax.models import dense_layer
from densenet_jax.models import dispatch
from densenet_jax.models import scanned
from densenet_jax.native import onednn
from model_checks import assert_trains_as, count, loss_and_grads, standard_results, tiny

pytestmark = pytest.mark.slow   # every test here compiles several models


# Every way of computing a dense block, against the unrolled standard one: (memory_efficient,
# scan_segments, scan_chunk, fused, specialised). Scanned blocks of one segment (every layer
# padded to the block's width) and of several; layers reading the buffer in one chunk (64:
# wider than these tiny blocks) or several, the last overlapping; oneDNN's fused first unit
# allowed (on a CPU with oneDNN it is taken where it applies) or turned off (the chunked path of
# GPUs and TPUs); and the generic scanned path that any layer takes (specialised=False).
PATHS = {
    'unrolled-memory-efficient': (True, 0, 5, True, True),
    'scanned': (False, 1, 64, True, True),
    'scanned-chunked': (False, 2, 8, False, True),
    'scanned-memory-efficient': (True, 2, 64, True, True),
    'scanned-memory-efficient-chunked': (True, 3, 5, False, True),
    'scanned-generic': (False, 2, 64, True, False),
}
# The layers compared: the paper's (ReLU bottleneck, no dropout), and each non-default activation
# with dropout on, one with and one without bottleneck.
LAYERS = {
    'relu-bottleneck': dict(activation='relu', dropout_rate=0.0, bottleneck=True),
    'silu-dropout-bottleneck': dict(activation='silu', dropout_rate=0.5, bottleneck=True),
    'gelu-dropout-plain': dict(activation='gelu', dropout_rate=0.5, bottleneck=False),
}


# The paper's layer takes every path. Chunks and oneDNN's fused call move the paper's layer's
# data, whatever its activation: the other layers take each way of running a block once
# (unrolled with recomputation; scanned; scanned with recomputation, in chunks), and the
# layer without bottleneck the generic path too (squeeze-and-excitation, below, takes it as
# well). They have 2 layers a block, the paper's layer 3: segments of several layers after
# another segment are the paper's layer's cases.
OTHER_LAYERS_PATHS = {
    'silu-dropout-bottleneck': ('unrolled-memory-efficient', 'scanned',
                                'scanned-memory-efficient-chunked'),
    'gelu-dropout-plain': ('unrolled-memory-efficient', 'scanned-memory-efficient-chunked',
                           'scanned-generic'),
}
CASES = [(path, 'relu-bottleneck') for path in PATHS] + [
    (path, variant) for variant, paths in OTHER_LAYERS_PATHS.items() for path in paths]


@pytest.mark.parametrize('path, variant', CASES)
def test_every_path_computes_the_same_layer(path, variant):
  """One definition of the layer (models/layer.py): every implementation computes the unrolled
  standard block's logits, gradients and BatchNorm updates from the very same variables, for
  any activation, and with dropout draws the very same masks for one seed. The memory-efficient
  paths also run their transitions in chunks (of 64, or of 5 channels, the last overlapping)."""
  memory_efficient, scan_segments, scan_chunk, fused, specialised = PATHS[path]
  bottleneck = LAYERS[variant]['bottleneck']
  fields = dict(depth=22 if variant == 'relu-bottleneck' else 16, **LAYERS[variant])
  standard = tiny(scan_segments=0, **fields)
  other = tiny(memory_efficient=memory_efficient, scan_segments=scan_segments,
               scan_chunk=scan_chunk, specialised=specialised, **fields)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  key = jax.random.key(3) if fields['dropout_rate'] else None
  onednn.set_bottleneck_enabled(fused)
  try:
    program = assert_trains_as(other, standard, x, dropout_key=key)
    # The fused call computes ReLU bottleneck layers only, and is taken only for them.
    calls_fused = 'densenet_onednn_bottleneck' in program
    assert calls_fused == (fused and specialised and scan_segments > 0 and bottleneck and
                           fields['activation'] == 'relu' and onednn.available())
  finally:
    onednn.set_bottleneck_enabled(True)
  if key is not None:   # dropout is on: another seed drops other values
    other_logits = loss_and_grads(standard, standard_results(standard, x, key)[0], x,
                                   jax.random.key(4))[0]
    assert not np.allclose(other_logits, standard_results(standard, x, key)[1][0])


@pytest.mark.parametrize('implementation', [(True, 0), (True, 2, 5)])
def test_memory_efficient_imagenet_stem_equals_standard(implementation):
  """The memory-efficient mode recomputes the ImageNet stem (convolution, BN, ReLU, max pool)
  in the backward pass: same values, gradients and BatchNorm updates."""
  memory_efficient, scan_segments, scan_chunk = (implementation + (64,))[:3]
  overrides = dict(block_sizes=(2, 3), growth_rate=4, num_init_features=8, num_classes=10)
  standard = create_model('densenet121', scan_segments=0, **overrides)
  other = create_model('densenet121', memory_efficient=memory_efficient,
                       scan_segments=scan_segments, scan_chunk=scan_chunk, **overrides)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3)) * 2 + 0.5
  assert_trains_as(other, standard, x)


# Squeeze-and-excitation (model.se_ratio), the change docs/extending.md makes: with dropout and
# ReLU bottleneck units, the layer the fused call would take if it did not decline.
SE_LAYER = dict(depth=16, se_ratio=0.5, dropout_rate=0.5, activation='relu', bottleneck=True)
SE_PATHS = {
    'unrolled-memory-efficient': dict(memory_efficient=True, scan_segments=0),
    'scanned': dict(scan_segments=1),
    'scanned-memory-efficient': dict(memory_efficient=True, scan_segments=2),
}


@pytest.mark.parametrize('path', SE_PATHS)
def test_squeeze_excitation_in_every_path(path):
  """A unit added to the layer's declaration alone runs in every mode, computing the unrolled
  layer's logits, gradients, BatchNorm updates and dropout masks; the specialised scanned path
  and oneDNN's fused call decline it, and scanned blocks take the generic path."""
  standard = tiny(scan_segments=0, **SE_LAYER)
  other = tiny(**SE_LAYER, **SE_PATHS[path])
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  program = assert_trains_as(other, standard, x, dropout_key=jax.random.key(3))
  expected = dispatch.GENERIC if other.scan_segments else dispatch.UNROLLED
  assert dispatch.block_path(other.layer_spec, scan_segments=other.scan_segments,
                             specialised=True) == expected
  assert 'densenet_onednn_bottleneck' not in program


def _cosines(grads, reference):
  """Per variable, the cosine between a gradient and the reference gradient; variables whose
  reference gradient is zero but for rounding (below 1e-4 of the largest: a per-channel scale
  that the next BatchNorm normalises away, as squeeze-and-excitation's bias) have no direction
  and are left out."""
  largest = max(float(np.abs(b).max()) for b in jax.tree.leaves(reference))
  return [float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
          for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference))
          if np.abs(b).max() > 1e-4 * largest]


@pytest.mark.parametrize('layer_fields, paths', [
    (dict(), (dict(scan_segments=1), dict(scan_segments=1, specialised=False))),
    (dict(se_ratio=0.5), (dict(scan_segments=1), dict(scan_segments=0, memory_efficient=True))),
], ids=['paper', 'squeeze-excitation'])
def test_bfloat16_paths_follow_the_float32_gradient(layer_fields, paths):
  """bfloat16 rounding moves these tiny models' gradients by up to the size of a variable's
  largest element, on every path, the unrolled one too: no elementwise comparison holds. Each
  bfloat16 path's gradient of every variable must point where the float32 unrolled layer's does
  (cosine above 0.7, median above 0.9). A path whose gradient stops short of some variables
  fails: the bfloat16 buffer padded on its bits once passed no gradient to anything before a
  scanned block."""
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  reference = tiny(depth=16, scan_segments=0, **layer_fields)
  variables = jax.jit(reference.init)(jax.random.key(0), x)
  expected = loss_and_grads(reference, variables, x)[2]
  for fields in paths:
    model = tiny(depth=16, dtype=jnp.bfloat16, **layer_fields, **fields)
    cosines = _cosines(loss_and_grads(model, variables, x)[2], expected)
    assert min(cosines) > 0.7 and np.median(cosines) > 0.9, (fields, sorted(cosines)[:3])


def _without_se(params):
  """A DenseNet's params with every layer's squeeze-and-excitation variables left out."""
  return {stage: {name: ({m: v for m, v in variables.items() if not m.startswith('se_')}
                         if name.startswith('layer') else variables)
                  for name, variables in stage_vars.items()}
          if stage.startswith('block') else stage_vars
          for stage, stage_vars in params.items()}


def test_squeeze_excitation_adds_its_unit():
  """se_ratio adds to every layer a gate of max(1, round(se_ratio * k)) hidden units, exactly
  nn.Dense's variables, which changes the output; the specialised path declares the paper's
  layer only."""
  plain, se = tiny(depth=16), tiny(depth=16, se_ratio=0.5)   # k = 4: 2 hidden units
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = jax.jit(se.init)(jax.random.key(0), x)
  layer1 = variables['params']['block1']['layer1']
  assert layer1['se_reduce']['kernel'].shape == (4, 2) and layer1['se_reduce']['bias'].shape == (2,)
  assert layer1['se_expand']['kernel'].shape == (2, 4) and layer1['se_expand']['bias'].shape == (4,)
  plain_vars = jax.eval_shape(plain.init, jax.random.key(0), x)
  assert count(variables['params']) - count(plain_vars['params']) == (
      sum(se.block_sizes) * (4 * 2 + 2 + 2 * 4 + 4))
  without = {'params': _without_se(variables['params']), 'batch_stats': variables['batch_stats']}
  assert jax.tree.structure(without) == jax.tree.structure(plain_vars)
  assert not np.allclose(jax.jit(se.apply)(variables, x), jax.jit(plain.apply)(without, x),
                         atol=1e-3)
  assert scanned.supports(plain.layer_spec, dense_layer.structure(plain.layer_spec))
  assert not scanned.supports(se.layer_spec, dense_layer.structure(se.layer_spec))
  assert all('SqueezeExcitation' in line for line in dispatch.describe(se, 'cpu'))
