"""The model family: the paper's parameter counts, shapes, validation, modes and dtypes."""

import re

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import models
from densenet_jax.models import create_model
from densenet_jax.native import onednn
import xla_flags
from model_checks import abstract_variables, assert_count_and_logits, count, infer, \
    loss_and_grads, lowered_train_gradient, tiny

# Parameter counts of the paper's models (ImageNet heads 1000 classes, CIFAR heads 10); the
# ImageNet ones equal torchvision's.
PARAM_COUNTS = {
    'densenet121': 7_978_856,
    'densenet161': 28_681_000,
    'densenet169': 14_149_480,
    'densenet201': 20_013_928,
    'densenet264': 33_337_704,
    'densenet40_k12': 1_019_722,
    'densenet100_k12': 6_979_642,
    'densenet100_k24': 27_249_082,
    'densenet_bc100_k12': 769_162,
    'densenet_bc250_k24': 15_324_406,
    'densenet_bc190_k40': 25_624_430,
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_parameter_count_and_output_shape(name):
  imagenet = name in models.IMAGENET_MODELS
  assert_count_and_logits(name, 224 if imagenet else 32, PARAM_COUNTS[name],
                          1000 if imagenet else 10)


def test_every_named_model_is_checked():
  named = set(models.IMAGENET_MODELS) | set(models.CIFAR_MODELS)
  assert named == set(PARAM_COUNTS)


def test_imagenet_feature_map_sizes():
  """224x224 input: stem to 56x56, transitions halve it to 7x7 before the head."""
  model = create_model('densenet121')
  variables, images = abstract_variables(model, 224)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, images)
  inter = state['intermediates']
  assert inter['block1']['__call__'][0].shape == (2, 56, 56, 64 + 6 * 32)
  assert inter['transition1']['__call__'][0].shape == (2, 28, 28, 128)
  assert inter['block4']['__call__'][0].shape == (2, 7, 7, 1024)


def test_cifar_feature_map_sizes():
  model = create_model('densenet_bc100_k12')
  variables, images = abstract_variables(model, 32)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, images)
  inter = state['intermediates']
  assert inter['block1']['__call__'][0].shape == (2, 32, 32, 24 + 16 * 12)
  assert inter['transition1']['__call__'][0].shape == (2, 16, 16, 108)
  assert inter['block3']['__call__'][0].shape == (2, 8, 8, 342)


def test_overrides_and_depth():
  model = create_model('densenet_bc', depth=190, growth_rate=40)
  assert count(abstract_variables(model, 32)[0]['params']) == PARAM_COUNTS['densenet_bc190_k40']
  model = create_model('densenet121', num_classes=100, growth_rate=24, compression=0.6)
  assert (model.num_classes, model.growth_rate, model.compression) == (100, 24, 0.6)
  assert create_model('densenet_bc100_k12', depth=250).block_sizes == (41, 41, 41)
  assert create_model('densenet40_k12', depth=100).block_sizes == (32, 32, 32)


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='densenet_bc', depth=101, growth_rate=12), r'depth=101 .*\(L - 4\) divisible by 6'),
    (dict(name='densenet_cifar', depth=41, growth_rate=12), r'divisible by 3'),
    (dict(name='densenet_bc', depth=100), 'needs depth= and growth_rate='),
    (dict(name='densenet122'), r"Unknown model name 'densenet122'.*densenet121"),
    (dict(name='densenet121', growth=12), r"Unknown DenseNet field\(s\) \['growth'\].*growth_rate"),
    (dict(name='densenet121', depth=121), 'depth applies to CIFAR models only'),
    (dict(name='densenet121', compression=0.0), r'compression=0.0: expected a number in \(0, 1\]'),
    (dict(name='densenet121', compression=1.5), r'compression=1.5'),
    (dict(name='densenet121', growth_rate=0), 'growth_rate=0: expected a positive integer'),
    (dict(name='densenet121', block_sizes=()), 'block_sizes=()'),
    (dict(name='densenet121', stem='resnet'), "stem='resnet'"),
    (dict(name='densenet121', dropout_rate=1.0), 'dropout_rate=1.0'),
    (dict(name='densenet121', num_classes=0), 'num_classes=0'),
    (dict(name='densenet121', scan_chunk=0), 'scan_chunk=0: expected a positive integer'),
])
def test_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    create_model(**kwargs)


@pytest.mark.slow
def test_scan_chunk_follows_the_layer_widths_unless_set():
  """By default a scanned layer on a CPU reads 48 channels at a time in the first block where
  that pads the layers' inputs at least 5% less than 64 does, and (standard mode) twice as many
  in each later block: DenseNet-BC-100 k=12 (block inputs 24, 108, 150 channels, k=12),
  densenet161 (k=48) and DenseNet L=40 k=12, not densenet121 (k=32) or the other named models.
  An explicit scan_chunk is kept in every block. Guards the chunk rule of docs/design.md#chunks
  (why a chunk of 48 on CPU), not XLA: the table is computed by models/policy.py."""
  chosen = {name: create_model(name).chunk_for('cpu') for name in models.DENSENET_NAMES
            if name not in ('densenet_bc', 'densenet_cifar')}
  assert {name for name, chunk in chosen.items() if chunk == 48} == {
      'densenet_bc100_k12', 'densenet161', 'densenet40_k12'}
  assert set(chosen.values()) == {48, 64}
  d121 = create_model('densenet121')
  assert [d121.chunk_for('cpu', i) for i in range(4)] == [64, 128, 256, 512]
  assert create_model('densenet_bc100_k12').chunk_for('cpu', 2) == 192
  assert create_model('densenet_bc100_k12', scan_chunk=64).chunk_for('cpu') == 64
  assert create_model('densenet121', scan_chunk=16).chunk_for('cpu', 3) == 16

  def program(**overrides):
    model = create_model('densenet_bc100_k12', **overrides)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    previous = onednn._state['enabled']
    onednn.set_enabled(False)   # with oneDNN, bottleneck layers read their exact width instead
    try:
      return jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()
    finally:
      onednn.set_enabled(previous)
  # The choice reaches the scanned layers: they slice the first block's buffer 48 channels at a
  # time, never 64 (the bottleneck's output is 48 wide either way).
  assert 'tensor<1x32x32x64xf32>' not in program()
  assert 'tensor<1x32x32x64xf32>' in program(scan_chunk=64)
  # The third block (8x8) reads 4x as many, 192 channels at a time.
  assert 'tensor<1x8x8x192xf32>' in program()
  assert 'tensor<1x8x8x192xf32>' not in program(scan_chunk=48)


@pytest.mark.slow
def test_scan_chunk_on_accelerators_is_one_chunk_or_a_fixed_workspace():
  """On a GPU or TPU a standard layer runs on its whole buffer in one chunk (as wide as the
  widest input: DenseNet-BC-100's last block ends at 150 + 16 * 12 = 342 channels). A
  memory-efficient one reads 128 channels at a time in the first block and 4x as many in each
  later block (a quarter of the positions), so every block's workspace is the same size. An
  explicit scan_chunk is kept in every block. Guards docs/design.md#chunks: the chunk is the
  lowering platform's, read from the exported program's slice shapes."""
  bc100 = create_model('densenet_bc100_k12')
  assert bc100.chunk_for('cpu') == 48
  assert bc100.chunk_for('gpu') == bc100.chunk_for('tpu', 2) == 342
  assert create_model('densenet121').chunk_for('gpu', 3) == 256 + 24 * 32
  efficient = create_model('densenet121', memory_efficient=True)
  assert [efficient.chunk_for('gpu', i) for i in range(4)] == [128, 512, 2048, 8192]
  assert efficient.chunk_for('cpu', 3) == 64   # one CPU chunk in every block: memory
  assert create_model('densenet121', scan_chunk=32).chunk_for('gpu', 2) == 32

  def chunk_slices(block, platform='cuda', **overrides):
    """The channel widths of `block`'s arrays in the memory-efficient model's inference step,
    lowered for `platform` here, on a CPU host: the chunk is the lowering platform's, not the
    host's."""
    model = create_model('densenet_bc100_k12', memory_efficient=True, **overrides)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    step = jax.jit(lambda v, x: model.apply(v, x, train=False))
    if platform == 'cpu':   # the host's own platform; export refuses oneDNN's custom calls
      text = step.lower(variables, x).as_text()
    else:
      text = export.export(step, platforms=(platform,))(variables, x).mlir_module()
    size = 32 >> block
    return set(re.findall(rf'tensor<2x{size}x{size}x(\d+)xf32>', text))
  # Block 1 (32x32) reads 128-channel chunks; block 3 (8x8, widths up to 342) and the
  # transition before it (300 channels, pooled to 8x8 first) read theirs whole.
  assert '128' in chunk_slices(0)
  assert '128' not in chunk_slices(2)
  assert '128' in chunk_slices(2, scan_chunk=128)
  # Lowered for the CPU, the same model reads the CPU's chunks (48 channels here).
  assert '128' not in chunk_slices(0, 'cpu')


def test_initialisation():
  """He normal (fan_out) convolutions, BN scale 1 / bias 0, zero classifier bias."""
  model = create_model('densenet_bc', depth=16, growth_rate=8)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = variables['params']
  kernel = params['block1']['layer1']['conv2']['kernel']  # 3x3, 32 -> 8 maps.
  expected_std = np.sqrt(2.0 / (3 * 3 * 8))
  assert abs(np.std(kernel) / expected_std - 1) < 0.15
  assert np.all(params['block1']['layer1']['norm1']['scale'] == 1)
  assert np.all(params['block1']['layer1']['norm1']['bias'] == 0)
  assert np.all(params['classifier']['bias'] == 0)
  assert np.all(variables['batch_stats']['final_norm']['var'] == 1)
  # Every implementation starts from these very values: checkpoints move between them.
  for implementation in (dict(scan_segments=0), dict(memory_efficient=True, scan_chunk=5)):
    other = jax.jit(create_model('densenet_bc', depth=16, growth_rate=8, **implementation).init)(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    jax.tree.map(np.testing.assert_array_equal, variables, other)


@pytest.mark.slow
def test_train_and_eval_modes():
  """Training uses batch statistics and updates running averages; eval uses the averages."""
  model = tiny(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3)) * 3 + 1
  variables = jax.jit(model.init)(jax.random.key(0), x)
  eval1 = infer(model, variables, x)
  eval2 = infer(model, variables, x)
  np.testing.assert_array_equal(eval1, eval2)  # No dropout at eval time.
  train = jax.jit(lambda i: model.apply(variables, x, train=True, mutable=['batch_stats'],
                                        rngs={'dropout': jax.random.key(i)}))
  train1, upd = train(0)
  train2, _ = train(1)
  assert not np.allclose(train1, train2)  # Dropout differs with the key.
  # One update of the running mean: 0.9 * 0 + 0.1 * (batch mean of the layer's input).
  kernel = variables['params']['stem_conv']['kernel']
  stem_out = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(upd['batch_stats']['block1']['layer1']['norm1']['mean'],
                             0.1 * jnp.mean(stem_out, axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_segment_bounds_are_optimal():
  """The split of a block into scanned segments covers every layer once and minimises the
  padded width summed over layers (checked against every possible split)."""
  import itertools  # pylint: disable=g-import-not-at-top
  from densenet_jax.models import scanned  # pylint: disable=g-import-not-at-top

  def cost(c0, k, bounds):
    return sum((e - s) * (c0 + (e - 1) * k) for s, e in bounds)

  for c0, k, n, m in [(24, 12, 16, 3), (64, 32, 6, 2), (48, 24, 9, 4), (16, 12, 5, 9)]:
    bounds = scanned.segment_bounds(c0, k, n, m)
    assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) <= m
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:]))
    best = min(cost(c0, k, list(zip((0,) + cuts, cuts + (n,))))
               for r in range(min(m, n)) for cuts in itertools.combinations(range(1, n), r))
    assert cost(c0, k, bounds) == best


def _convolutions_in_train_program(depth, scan_segments):
  model = create_model('densenet_bc', depth=depth, growth_rate=4, scan_segments=scan_segments)
  text = lowered_train_gradient(model, (2, 8, 8, 3)).as_text()
  # XLA's convolutions and, on a CPU with oneDNN, oneDNN's (custom calls).
  convolutions = text.count('convolution(') + text.count('custom_call @densenet_onednn')
  assert convolutions > 0
  return convolutions


@pytest.mark.slow
def test_scanned_program_does_not_grow_with_depth():
  """Guards docs/design.md#why (scanned dense blocks): compile time of the deepest models stays
  flat because with scanned blocks the train step's program has as many convolutions for L=100
  as for L=40; unrolled, it has 2.5x as many."""
  assert _convolutions_in_train_program(100, 2) == _convolutions_in_train_program(40, 2)
  assert _convolutions_in_train_program(100, 0) > 2 * _convolutions_in_train_program(40, 0)


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_with_float32_params():
  model = tiny(dtype=jnp.bfloat16, memory_efficient=True, scan_segments=2)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits, upd, grads = loss_and_grads(model, variables, x)
  assert logits.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert np.all(np.isfinite(logits))
  reference = tiny().apply(variables, x)
  np.testing.assert_allclose(model.apply(variables, x), reference, atol=0.1, rtol=0.1)


def _in_place_updates(hlo: str):
  """The dynamic-update-slices of a compiled program's text, each as (its result type, the
  opcode that made its updated operand within the same computation, or None for a parameter)."""
  updates = []
  for computation in hlo.split('\n\n'):
    made_by = dict(re.findall(r'%([\w.-]+) = \S+ ([\w-]+)\(', computation))
    for result, operand in re.findall(
        r'= (\w+)\[[^\]]*\]\S* dynamic-update-slice\(%([\w.-]+)', computation):
      updates.append((result, made_by.get(operand)))
  return updates


@pytest.mark.parametrize('memory_efficient', [False, True], ids=['standard', 'efficient'])
def test_bfloat16_buffers_are_updated_in_place(memory_efficient):
  """XLA:CPU widens a dynamic-update-slice of a bfloat16 array into a conversion of the whole
  array to float32, the update and a conversion back, so that a block buffer's update in its
  loop rewrote the buffer twice per layer (ops.bits). In the compiled bfloat16 train step no
  update may be on bfloat16, nor update an array converted (or bit-cast) in the same fusion:
  every update writes into its operand's own buffer. Guards docs/design.md#the-feature-buffer."""
  model = create_model('densenet_bc', depth=16, growth_rate=12, dtype=jnp.bfloat16,
                       memory_efficient=memory_efficient)
  updates = _in_place_updates(lowered_train_gradient(model, (8, 16, 16, 3)).compile(
      compiler_options=xla_flags.AS_RUN).as_text())
  assert len(updates) >= 4   # the buffer, its statistics and the stacked outputs, both passes
  assert not [u for u in updates if u[0] == 'bf16' or u[1] in ('convert', 'bitcast-convert')]


def test_min_image_size():
  assert models.min_image_size(create_model('densenet121')) == 32
  assert models.min_image_size(create_model('densenet_bc100_k12')) == 4


@pytest.mark.slow
def test_memory_efficient_halves_compiled_train_memory():
  """The point of the mode (docs/design.md#the-memory-efficient-mode): XLA must not merge the
  recomputation back into the forward pass (it does so for plain jax.checkpoint on CPU), so
  compiled temporary memory really drops."""

  def temp_bytes(memory_efficient, scan_segments=0):   # unrolled unless told
    model = create_model('densenet_bc', depth=40, growth_rate=12,
                         memory_efficient=memory_efficient, scan_segments=scan_segments)
    compiled = lowered_train_gradient(model, (32, 16, 16, 3)).compile(
        compiler_options=xla_flags.AS_RUN)
    return compiled.memory_analysis().temp_size_in_bytes

  standard = temp_bytes(False)
  assert temp_bytes(True) < 0.6 * standard
  # Scanned blocks store only each segment's final buffer (and, not memory-efficient, each
  # layer's 1x1 output): linear in depth as well.
  scanned_standard = temp_bytes(False, scan_segments=1)
  assert temp_bytes(False, scan_segments=2) < 0.6 * standard
  assert scanned_standard < 0.6 * standard
  # And the memory-efficient mode saves on them too: the backward passes of a layer's first
  # convolution and of a transition work chunk by chunk, so each layer's 1x1 output, which only
  # the standard mode stores, is most of the difference.
  assert temp_bytes(True, scan_segments=1) < 0.75 * scanned_standard


@pytest.mark.slow
@pytest.mark.parametrize('use_onednn', [False, True], ids=['xla', 'onednn'])
def test_memory_efficient_stem_keeps_no_activation(use_onednn):
  """The recomputed ImageNet stem must survive compilation
  (docs/design.md#the-memory-efficient-mode): in a model whose stem dominates, the memory-efficient
  train step needs much less memory, with XLA's convolutions and with oneDNN's; storing the stem, as
  the standard mode does, would leave the two nearly equal."""
  onednn.set_enabled(use_onednn)
  if use_onednn and not onednn.available():
    pytest.skip('no oneDNN here')

  def temp_bytes(memory_efficient):
    model = create_model('densenet121', block_sizes=(2, 2), growth_rate=8, num_init_features=16,
                         num_classes=10, memory_efficient=memory_efficient)
    compiled = lowered_train_gradient(model, (16, 64, 64, 3)).compile(
        compiler_options=xla_flags.AS_RUN)
    return compiled.memory_analysis().temp_size_in_bytes

  try:
    assert temp_bytes(True) < 0.85 * temp_bytes(False)
  finally:
    onednn.set_enabled(True)
