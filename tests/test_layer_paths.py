"""Every execution path of a dense layer computes the one definition (models/layer.py)."""

import jax
import numpy as np
import pytest

from densenet_jax.models import create_model
from densenet_jax.native import onednn
from model_checks import assert_trains_as, lowered_train_gradient, loss_and_grads, \
    standard_results, tiny


# Every way of computing a dense block, against the unrolled standard one: (memory_efficient,
# scan_segments, scan_chunk, fused). Scanned blocks of one segment (every layer padded to the
# block's width) and of several; layers reading the buffer in one chunk (64: wider than these
# tiny blocks) or several, the last overlapping; oneDNN's fused first unit allowed (on a CPU
# with oneDNN it is taken where it applies) or turned off (the chunked path of GPUs and TPUs).
PATHS = {
    'unrolled-memory-efficient': (True, 0, 5, True),
    'scanned': (False, 1, 64, True),
    'scanned-chunked': (False, 2, 8, False),
    'scanned-memory-efficient': (True, 2, 64, True),
    'scanned-memory-efficient-chunked': (True, 3, 5, False),
}
# The layers compared: the paper's (ReLU bottleneck, no dropout), and each non-default activation
# with dropout on, one with and one without bottleneck.
LAYERS = {
    'relu-bottleneck': dict(activation='relu', dropout_rate=0.0, bottleneck=True),
    'silu-dropout-bottleneck': dict(activation='silu', dropout_rate=0.5, bottleneck=True),
    'gelu-dropout-plain': dict(activation='gelu', dropout_rate=0.5, bottleneck=False),
}


# Layers without bottleneck never take the fused call: their scanned paths differ only in
# segments and chunks, which one standard and one memory-efficient path cover.
CASES = [(path, variant) for variant in LAYERS for path in PATHS
         if LAYERS[variant]['bottleneck'] or path not in ('scanned-chunked',
                                                          'scanned-memory-efficient')]


@pytest.mark.parametrize('path, variant', CASES)
def test_every_path_computes_the_same_layer(path, variant):
  """One definition of the layer (models/layer.py): every implementation computes the unrolled
  standard block's logits, gradients and BatchNorm updates from the very same variables, for
  any activation, and with dropout draws the very same masks for one seed. The memory-efficient
  paths also run their transitions in chunks (of 64, or of 5 channels, the last overlapping)."""
  memory_efficient, scan_segments, scan_chunk, fused = PATHS[path]
  bottleneck = LAYERS[variant]['bottleneck']
  fields = dict(depth=22, **LAYERS[variant])   # 3 layers a block
  standard = tiny(scan_segments=0, **fields)
  other = tiny(memory_efficient=memory_efficient, scan_segments=scan_segments,
               scan_chunk=scan_chunk, **fields)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  key = jax.random.key(3) if fields['dropout_rate'] else None
  onednn.set_bottleneck_enabled(fused)
  try:
    assert_trains_as(other, standard, x, dropout_key=key)
    # The fused call computes ReLU bottleneck layers only, and is taken only for them.
    calls_fused = 'densenet_onednn_bottleneck' in lowered_train_gradient(
        other, x.shape).as_text()
    assert calls_fused == (fused and scan_segments > 0 and bottleneck and
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
