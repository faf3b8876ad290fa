"""The published numbers (densenet_jax/experiments/paper.py): lookups by a run's config, and
Table 2's parameter counts against the models we build."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax.experiments import paper
from densenet_jax.models import create_model
from densenet_jax.models import variants
from test_models import PARAM_COUNTS


def _run_config(config_module: str, variant: str):
  """A config as results.json saves it."""
  return importlib.import_module(f'configs.{config_module}').get_config(variant).to_dict()


@pytest.mark.parametrize('model', [
    {'name': 'densenet_bc100_k12'},
    {'name': 'densenet_bc', 'depth': 100, 'growth_rate': 12},
    # A saved config.model: unset fields are None; computation-only fields do not matter.
    {'name': 'densenet_bc100_k12', 'depth': None, 'growth_rate': None, 'compression': None,
     'dropout_rate': 0.0, 'memory_efficient': True, 'scan_segments': 0, 'num_classes': 10},
])
def test_densenet_bc100_k12_on_c10_plus(model):
  result = paper.paper_result(model, 'cifar10', augmented=True)
  assert result == paper.PaperResult(
      4.51, 'test error', 'Huang et al. 2017, Table 2, DenseNet-BC (k=12) L=100, C10+', 300)


def test_densenet40_on_c100_without_augmentation():
  result = paper.paper_result({'name': 'densenet40_k12', 'dropout_rate': 0.2}, 'cifar100', False)
  assert (result.error, result.epochs) == (27.55, 300)
  assert result.source.endswith('DenseNet (k=12) L=40, C100')
  generic = paper.paper_result({'name': 'densenet_cifar', 'depth': 40, 'growth_rate': 12},
                               'cifar100', False)
  assert generic == result


def test_missing_entries_are_none():
  bc190 = {'name': 'densenet_bc190_k40'}
  assert paper.paper_result(bc190, 'cifar10', augmented=False) is None
  assert paper.paper_result(bc190, 'svhn_cropped', augmented=False) is None
  assert paper.paper_result(bc190, 'cifar10', augmented=True).error == 3.46
  # SVHN has no "+" column; a dataset the paper does not use has none at all.
  assert paper.paper_result({'name': 'densenet100_k24'}, 'svhn_cropped', False).error == 1.59
  assert paper.paper_result({'name': 'densenet100_k24'}, 'svhn_cropped', True) is None
  assert paper.paper_result({'name': 'densenet100_k24'}, 'mnist', True) is None
  for row in paper.TABLE2:
    assert 0 not in row[4], row


def test_densenet121_on_imagenet():
  result = paper.paper_result({'name': 'densenet121', 'growth_rate': None}, 'imagenet2012', True)
  assert (result.error, result.top5_error) == (25.02, 7.71)
  assert result.metric == 'single-crop top-1 error' and result.epochs == 90
  assert 'Table 3' in result.source
  top5 = {name: paper.paper_result({'name': name}, 'imagenet2012', True).top5_error
          for name in paper.TABLE3}
  assert top5 == {'densenet121': 7.71, 'densenet169': 6.85, 'densenet201': 6.34,
                  'densenet264': 6.12}
  # Table 3 has no DenseNet-161, and a DenseNet-121 trained on CIFAR is no row of Table 2.
  assert paper.paper_result({'name': 'densenet161'}, 'imagenet2012', True) is None
  assert paper.paper_result({'name': 'densenet121'}, 'cifar10', True) is None


@pytest.mark.parametrize('model', [
    {'name': 'densenet_bc', 'depth': 22, 'growth_rate': 12},
    {'name': 'densenet_bc100_k12', 'growth_rate': 24},
    {'name': 'densenet_bc100_k12', 'compression': 1.0},
    {'name': 'densenet_bc100_k12', 'bottleneck': False},
    {'name': 'densenet_bc100_k12', 'activation': 'silu'},
    {'name': 'densenet_cifar', 'depth': 100, 'growth_rate': 12, 'compression': 0.5},
    {'name': 'densenet_bc', 'depth': 21, 'growth_rate': 12},   # builds no model at all
    {'name': 'densenet121', 'block_sizes': (6, 12, 24, 24)},
    {'name': 'resnet_cifar', 'depth': 56},
    {'name': 'densenet_bc100_k12', 'preactivation': True},     # a ResNet field
    {'growth_rate': 12},
    {},
])
def test_other_configurations_have_no_paper_number(model):
  for dataset in ('cifar10', 'cifar100', 'svhn_cropped', 'imagenet2012'):
    for augmented in (False, True):
      assert paper.paper_result(model, dataset, augmented) is None


def test_resnet_baselines():
  resnet110 = {'name': 'resnet110', 'dropout_rate': None}
  he = paper.paper_result(resnet110, 'cifar10', True)
  assert he.error == 6.61 and 'ResNet (He et al.) L=110, C10+' in he.source
  huang = paper.paper_result({'name': 'resnet_cifar', 'depth': 110}, 'cifar100', True)
  assert huang.error == 27.22 and 'reported by Huang et al. 2016' in huang.source
  assert paper.paper_result(resnet110, 'svhn_cropped', False).error == 2.01
  assert paper.paper_result({'name': 'resnet110', 'scan_blocks': False}, 'cifar10', False).error \
      == 13.63
  preact = paper.paper_result({'name': 'preact_resnet164'}, 'cifar10', False)
  assert preact.error == 11.26 and '*' in preact.source
  assert '*' not in paper.paper_result({'name': 'preact_resnet164'}, 'cifar10', True).source
  assert paper.paper_result({'name': 'preact_resnet_cifar', 'depth': 1001}, 'cifar100',
                            True).error == 22.71
  assert paper.paper_result({'name': 'preact_resnet164'}, 'svhn_cropped', False) is None


@pytest.mark.parametrize('config_module,variant,expected', [
    ('cifar_densenet_bc100_k12', 'cifar10', 4.51),
    ('cifar_densenet_bc100_k12', 'cifar10_noaug', 5.92),
    ('cifar_densenet_bc100_k12', 'cifar100_noaug', 24.15),
    ('cifar_densenet_bc100_k12', 'svhn', 1.76),
    ('cifar_densenet40_k12', 'cifar100', 24.42),
    ('cifar_densenet_bc250_k24', 'cifar100', 17.60),
    ('cifar_densenet_bc190_k40', 'cifar10_noaug', None),
    ('cifar_preact_resnet1001', 'cifar10', 4.62),
])
def test_lookup_from_a_saved_config(config_module, variant, expected):
  config = _run_config(config_module, variant)
  assert paper.is_augmented(config) == (variant in ('cifar10', 'cifar100'))
  result = paper.paper_result(config['model'], config['dataset']['name'],
                              paper.is_augmented(config))
  assert (result and result.error) == expected


def test_imagenet_config_lookup():
  config = importlib.import_module('configs.densenet121').get_config().to_dict()
  assert paper.is_augmented(config)
  result = paper.paper_result(config['model'], config['dataset']['name'], True)
  assert result.error == 25.02
  assert paper.budget(config, 5004) == '90 of 90 epochs'


def test_budget():
  config = _run_config('cifar_densenet_bc100_k12', 'cifar10')
  config['num_train_steps'] = 1200   # 50,000 images / batch 64 = 781 steps per epoch
  assert paper.budget(config, 781) == '1.5 of 300 epochs'
  config['num_train_steps'] = 10
  assert paper.budget(config, 781) == '0.013 of 300 epochs'
  config['num_train_steps'] = -1
  assert paper.budget(config, 781) == '300 of 300 epochs'
  config['num_epochs'] = 2
  assert paper.budget(config, None) == '2 of 300 epochs'
  svhn = _run_config('cifar_densenet_bc100_k12', 'svhn')
  assert paper.budget(svhn, 9443) == '40 of 40 epochs'
  config['dataset']['name'] = 'sklearn_digits'
  assert paper.budget(config, 781) == ''


def test_torchvision_accuracy():
  assert paper.torchvision_accuracy('densenet121').acc1 == 74.434
  assert paper.torchvision_accuracy('densenet121').acc5 == 91.972
  assert paper.torchvision_accuracy('resnet50').acc5 == 92.862
  assert paper.torchvision_accuracy('densenet264') is None
  # Every name is one of our models, and ours has torchvision's parameter count (test_models).
  assert set(paper.TORCHVISION) <= set(variants.MODEL_NAMES)


def _params(name: str):
  """(all parameters, all but BatchNorm's scales and offsets) of our model `name`, 10 classes."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(create_model(name).init, jax.random.key(0), images)
  leaves = jax.tree_util.tree_leaves_with_path(variables['params'])
  sizes = [(int(np.prod(x.shape)), any('norm' in str(key) for key in path)) for path, x in leaves]
  return sum(n for n, _ in sizes), sum(n for n, norm in sizes if not norm)


@pytest.mark.parametrize('row', [r for r in paper.TABLE2 if r[1] and r[1].startswith('densenet')],
                         ids=lambda r: r[1])
def test_table2_densenet_params_match_our_models(row):
  """Our model of each DenseNet row of Table 2 has the parameters the paper prints, to its
  rounding (0.1 M): e.g. 769,162 for DenseNet-BC (k=12) L=100, printed 0.8M. (The exact counts
  are test_models.PARAM_COUNTS, which test_models.py checks against the models.)"""
  _, name, depth, params, _ = row
  assert round(PARAM_COUNTS[name] / 1e6, 1) == params
  assert str(depth) in name   # the row is the model its name says


@pytest.mark.parametrize('name', ['resnet110', 'preact_resnet164', 'preact_resnet1001'])
def test_table2_resnet_params_match_without_batchnorm(name):
  """The ResNet rows' parameters are their papers' counts, which leave out BatchNorm: our
  pre-activation ResNet-1001 has 10,327,706 in all (10.3 M) and 10,178,490 without (the
  printed 10.2 M)."""
  params = next(r[3] for r in paper.TABLE2 if r[1] == name)
  total, without_batchnorm = _params(name)
  assert round(without_batchnorm / 1e6, 1) == params
  assert abs(total / 1e6 - params) < 0.15


def test_table_names_are_our_models():
  assert {r[1] for r in paper.TABLE2 if r[1]} <= set(variants.MODEL_NAMES)
  assert set(paper.TABLE3) <= set(variants.IMAGENET_MODELS)
  dense = {r[1] for r in paper.TABLE2 if r[1] and r[1].startswith('densenet')}
  assert dense == set(variants.CIFAR_MODELS)
