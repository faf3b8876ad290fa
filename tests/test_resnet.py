"""The ResNets: the papers' parameter counts and GMACs, scanned blocks, torchvision's weights,
and a CIFAR ResNet through the trainer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax.models import create_model
from densenet_jax.models import family
from densenet_jax.models import resnet
from densenet_jax.models import resnet_variants
from densenet_jax.models.resnet import ResNet
from densenet_jax.tools import convert
from densenet_jax.training import pretrained
from densenet_jax.training import trainer
from model_checks import abstract_variables, assert_count_and_logits, count
from test_training import tiny_config

# Parameter counts (ImageNet heads 1000 classes: torchvision's; CIFAR heads 10: the papers').
PARAM_COUNTS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'resnet110': 1_727_962,
    'preact_resnet164': 1_703_258,
    'preact_resnet1001': 10_327_706,
}


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_parameter_count_and_output_shape(name):
  imagenet = name in resnet_variants.IMAGENET_MODELS
  assert_count_and_logits(name, 224 if imagenet else 32, PARAM_COUNTS[name],
                          1000 if imagenet else 10)


def test_every_named_resnet_is_checked():
  assert set(resnet_variants.IMAGENET_MODELS) | set(resnet_variants.CIFAR_MODELS) == set(
      PARAM_COUNTS)


def test_cifar_families_take_any_valid_depth():
  assert create_model('resnet_cifar', depth=56).stage_sizes == (9, 9, 9)
  assert create_model('preact_resnet_cifar', depth=164).stage_sizes == (18, 18, 18)
  assert create_model('resnet110', depth=20).stage_sizes == (3, 3, 3)
  model = create_model('resnet_cifar', depth=110)
  variables, _ = abstract_variables(model, 32)
  assert count(variables['params']) == PARAM_COUNTS['resnet110']


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='resnet_cifar', depth=21), r'^depth=21 does not fit a basic-block CIFAR ResNet: '
     r'expected 6n \+ 2'),
    (dict(name='preact_resnet_cifar', depth=100), r'^depth=100 .* expected 9n \+ 2'),
    (dict(name='resnet_cifar'), r'needs depth='),
    (dict(name='resnet50', depth=50), 'depth applies to CIFAR models only'),
    (dict(name='resnet50', growth_rate=12), r"Unknown ResNet field\(s\) \['growth_rate'\]"),
    (dict(name='resnet50', stage_sizes=(3, 0)), r'stage_sizes=\(3, 0\): expected'),
    (dict(name='resnet50', widths=(64, 128)), r'widths=\(64, 128\): expected 4 positive'),
    (dict(name='resnet50', shortcut='B'), r"shortcut='B': expected one of"),
    (dict(name='resnet50', stem='densenet'), r"stem='densenet'"),
    (dict(name='resnet_cifar', depth=20, widths=(64, 32, 16)), r'widths=.*non-decreasing'),
    (dict(name='resnet18', bn_momentum=1.0), 'bn_momentum=1.0'),
])
def test_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match) as error:
    create_model(**kwargs)
  assert '\n' not in str(error.value)


def test_gmacs_match_torchvision():
  # torchvision's published `_ops` (GMACs at 224x224).
  for name, published in (('resnet18', 1.814), ('resnet34', 3.664), ('resnet50', 4.089),
                          ('resnet101', 7.801), ('resnet152', 11.514)):
    assert round(family.gmacs(create_model(name), 224), 3) == published, name


def test_gmacs_count_every_convolution_of_a_small_resnet():
  # Pre-activation bottleneck, depth 11 (one block per stage), widths 16/32/64, 8x8 grey images.
  model = create_model('preact_resnet_cifar', depth=11)
  stem = 9 * 1 * 16 * 64
  stage1 = (16 * 16 + 9 * 16 * 16 + 16 * 64 + 16 * 64) * 64          # + projection 16 -> 64
  stage2 = (64 * 32 * 64) + (9 * 32 * 32 + 32 * 128 + 64 * 128) * 16  # 1x1 at 8x8, rest 4x4
  stage3 = (128 * 64 * 16) + (9 * 64 * 64 + 64 * 256 + 128 * 256) * 4
  assert family.gmacs(model, 8, channels=1) * 1e9 == pytest.approx(
      stem + stage1 + stage2 + stage3 + 256 * 10)
  # Option A shortcuts cost nothing: resnet_cifar counts the 3x3 convolutions only.
  plain = create_model('resnet_cifar', depth=8)
  assert family.gmacs(plain, 8, channels=1) * 1e9 == pytest.approx(
      9 * 16 * 64 + 2 * 9 * 16 * 16 * 64 + 9 * (16 + 32) * 32 * 16 + 9 * (32 + 64) * 64 * 4
      + 64 * 10)


def test_min_image_size_and_description():
  assert family.min_image_size(create_model('resnet50')) == 32
  assert family.min_image_size(create_model('resnet110')) == 4
  description = trainer.model_description(create_model('resnet110', dtype=jnp.bfloat16))
  assert description == trainer.model_description(create_model('resnet110'))
  # Scanned blocks keep their variables stacked: a checkpoint of the other layout is refused.
  assert description['stage_sizes'] == [18, 18, 18] and description['scan_blocks']


def _train_apply(model, variables, x):
  def loss(params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return jnp.sum(logits * jnp.arange(logits.shape[-1])), (logits, updates['batch_stats'])

  return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])


# Small ResNets with two scanned blocks: basic blocks behind an option A (zero-pad) shortcut,
# and pre-activation bottlenecks behind a projection.
SMALL = {
    'basic': dict(stage_sizes=(1, 3), widths=(4, 8), shortcut='zero_pad'),
    'preact_bottleneck': dict(stage_sizes=(3,), widths=(4,), bottleneck=True,
                              preactivation=True),
}


def small(kind, **overrides):
  return ResNet(stem='cifar', num_classes=10, **{**SMALL[kind], **overrides})


def random_variables(model, x, seed=0):
  """Variables of `model` for images like `x`, random, BatchNorm averages included (far
  quicker than compiling model.init for a test)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ('bias', 'mean'):
      return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    return (rng.normal(0, 1, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.slow
def test_scanned_blocks_equal_unrolled(kind='basic'):
  """Same variables (stacked), same logits, batch statistics and gradients, in train and eval
  mode. One kind of block is enough: the scan is the stage's, the same for every block."""
  scanned, unrolled = small(kind), small(kind, scan_blocks=False)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = random_variables(unrolled, x)
  last = f'stage{len(scanned.stage_sizes)}'
  assert sorted(variables['params'][last]) == ['block1', 'block2', 'block3']
  stacked = resnet.to_layout(scanned, variables)
  assert sorted(stacked['params'][last]) == ['block1', 'blocks']
  assert jax.tree.structure(stacked) == jax.tree.structure(random_variables(scanned, x))
  jax.tree.map(np.testing.assert_array_equal, resnet.to_layout(unrolled, stacked), variables)
  stacked = resnet.to_layout(scanned, variables)
  grads_s, (logits_s, stats_s) = _train_apply(scanned, stacked, x)
  grads_u, (logits_u, stats_u) = _train_apply(unrolled, variables, x)
  np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-5)
  unstacked = resnet.to_layout(unrolled, {'params': grads_s, 'batch_stats': stats_s})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               unstacked['batch_stats'], stats_u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               unstacked['params'], grads_u)
  before = variables['batch_stats'][last]['block3']['norm2']['mean']
  assert not np.allclose(unstacked['batch_stats'][last]['block3']['norm2']['mean'], before)
  evaluate = jax.jit(lambda m, v: m.apply(v, x), static_argnums=0)
  np.testing.assert_allclose(evaluate(scanned, stacked), evaluate(unrolled, variables),
                             rtol=1e-5, atol=1e-5)


def _count(jaxpr, primitives) -> int:
  """Equations of `jaxpr` whose primitive is in `primitives`, counting every call of a
  sub-program (pjit, custom_vjp) and a loop body once."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name in primitives
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _count(sub.jaxpr, primitives)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _count(sub, primitives)
  return total


def _convolutions_in_train_program(depth, scan_blocks):
  model = create_model('preact_resnet_cifar', depth=depth, scan_blocks=scan_blocks)
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  jaxpr = jax.make_jaxpr(lambda v, x: _train_apply(model, v, x))(variables, images)
  convolutions = _count(jaxpr.jaxpr, ('conv_general_dilated', 'dot_general'))
  assert convolutions > 0
  return convolutions


@pytest.mark.slow
def test_scanned_program_does_not_grow_with_depth():
  """Why preact_resnet1001 compiles about as fast as preact_resnet164: the train step holds as
  many convolutions for 6 blocks per stage as for 3; unrolled, twice as many."""
  assert _convolutions_in_train_program(56, True) == _convolutions_in_train_program(29, True)
  assert _convolutions_in_train_program(56, False) > 1.5 * _convolutions_in_train_program(
      29, False)


def test_bfloat16_computes_in_bfloat16_with_float32_params():
  model = small('preact_bottleneck', dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  grads, (logits, _) = jax.eval_shape(lambda v, x: _train_apply(model, v, x), variables, x)
  assert logits.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  convolutions = [line for line in str(jax.make_jaxpr(model.apply)(variables, x)).splitlines()
                  if 'conv_general_dilated' in line or 'dot_general' in line]
  assert convolutions and all('bf16' in line for line in convolutions[:-1])  # not the head


@pytest.mark.parametrize('config_file, name', [
    ('cifar_resnet110', 'resnet110'), ('cifar_preact_resnet164', 'preact_resnet164'),
    ('cifar_preact_resnet1001', 'preact_resnet1001'), ('resnet50', 'resnet50')])
def test_configs_build_their_model(config_file, name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{config_file}').get_config()
  assert config.model.name == name
  model = trainer.build_model(config, 1000 if name == 'resnet50' else 10)
  assert trainer.model_description(model) == trainer.model_description(create_model(name))
  if name != 'resnet50':   # the no-augmentation variants, which add dropout to DenseNets
    noaug = importlib.import_module(f'configs.{config_file}').get_config('cifar100_noaug')
    assert trainer.build_model(noaug, 100).num_classes == 100


@pytest.mark.slow
def test_cifar_resnet_trains_checkpoints_and_evaluates(tmp_path):
  """resnet_cifar L=20 (3 blocks a stage: two scanned) through the trainer on the digits."""
  workdir = str(tmp_path / 'run')
  config = tiny_config(**{'model.name': 'resnet_cifar', 'model.depth': 20,
                          'model.growth_rate': None, 'num_train_steps': 8,
                          'eval_every_steps': 8})
  out = trainer.train_and_evaluate(config, workdir)
  assert out['step'] == 8 and out['eval_examples'] == 360 and np.isfinite(out['eval_loss'])
  record = json.loads(open(os.path.join(workdir, 'results.json')).read())
  assert record['params'] == count(random_variables(create_model('resnet_cifar', depth=20),
                                                    jnp.zeros((1, 8, 8, 1)))['params'])
  assert record['model']['scan_blocks']
  assert record['gmacs'] > 0 and sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '4', '8']


torch = pytest.importorskip('torch', reason='torch is a test-only requirement (CPU is enough)')
torchvision = pytest.importorskip('torchvision', reason='torchvision is a test-only requirement')


def _randomized_torch(name, seed):
  """torchvision's `name` with random weights and BatchNorm statistics (test_convert's), the
  last BatchNorm of each residual branch scaled by 0.2: otherwise the sum of 16 random
  branches grows resnet50's logits to hundreds, where float32 rounding alone (torch against
  itself in float64) differs by 4e-4."""
  from test_convert import randomize_torch  # pylint: disable=g-import-not-at-top
  model = randomize_torch(getattr(torchvision.models, name)(weights=None), seed)
  with torch.no_grad():
    for block in model.modules():
      if isinstance(block, torchvision.models.resnet.Bottleneck):
        block.bn3.weight.mul_(0.2)
      elif isinstance(block, torchvision.models.resnet.BasicBlock):
        block.bn2.weight.mul_(0.2)
  return model


@pytest.mark.slow
@pytest.mark.parametrize('name, source', [('resnet18', 'pth'), ('resnet50', 'safetensors')])
def test_torchvision_logits_match(name, source, tmp_path):
  model = _randomized_torch(name, 0)
  state = model.state_dict()
  path = str(tmp_path / f'{name}.{source}')
  if source == 'pth':
    torch.save(state, path)
  else:   # timm's files of these models: the same keys, without num_batches_tracked
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: v.numpy() for k, v in state.items() if 'num_batches' not in k}, path)
  x = np.random.default_rng(2).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  variables, meta = convert.convert(path, name)
  assert meta['num_classes'] == 1000 and meta['overrides'] == {}
  jax_model = create_model(name)
  got = np.asarray(jax.jit(lambda v, x: jax_model.apply(v, x))(variables, x))
  diff = float(np.max(np.abs(got - expected)))
  print(f'{name} ({source}) max |logit difference| = {diff:.2e}')
  assert diff <= 1e-4
  # The converted (scanned) layout starts an unrolled model too (config.init_checkpoint).
  unrolled = create_model(name, scan_blocks=False)
  abstract = jax.eval_shape(unrolled.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, 224, 224, 3), jnp.float32))
  merged = pretrained.merge(variables, abstract['params'], abstract['batch_stats'], unrolled)
  assert 'blocks' not in merged['params']['stage1'] and 'block2' in merged['params']['stage1']
  jax.tree.map(np.testing.assert_array_equal, resnet.to_layout(jax_model, merged), variables)


def test_conversion_names_the_mismatch(tmp_path):
  path = str(tmp_path / 'resnet34.pth')
  torch.save(_randomized_torch('resnet34', 1).state_dict(), path)
  with pytest.raises(convert.ConversionError, match=r'missing \d+ key.*layer1\.2\.|'
                     r'does not use, e.g. \[.layer1\.2\.'):
    convert.convert(path, 'resnet18')
  with pytest.raises(convert.ConversionError, match=r'does not hold resnet50 weights: '
                     r'\S+ has shape \(\d+, \d+.*\) where resnet50 needs'):
    convert.convert(path, 'resnet50')
  assert os.path.exists(path)
