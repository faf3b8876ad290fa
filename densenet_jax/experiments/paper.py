"""The published numbers our runs are measured against, in one table, each with its source.

A report that prints "4.9 % test error" beside "the paper: 4.51 %" must say which row and
column of which table it compares with, and whether the run trained as long as the paper did:
a 2-epoch smoke run is not a failed reproduction. So every published figure lives here, once,
with the table it was copied from, and `paper_result` finds the one that matches a run's model
exactly (or none), while `budget` says how much of the paper's training the run had.

Sources (what each group was checked against is in the commit message that added it):
* Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR 2017,
  arXiv:1608.06993v5. Table 2: test error (%) on CIFAR and SVHN; "+" is the standard
  translation and mirroring augmentation, the other columns train with dropout 0.2 and no
  augmentation. Table 3: ImageNet validation error, single-crop and 10-crop. Section 4.2:
  batch 64 for 300 epochs (CIFAR) or 40 (SVHN), batch 256 for 90 epochs (ImageNet). The
  ResNet rows of Table 2 are the cited papers' numbers as Table 2 prints them.
* torchvision's model documentation and `torchvision/models/{densenet,resnet}.py`
  (`Weights.meta['_metrics']['ImageNet-1K']`): accuracy (%) of its IMAGENET1K_V1 weights on
  the ImageNet-1k validation set, 224x224 center crop.
"""

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional

from densenet_jax.models import create_model
from densenet_jax.models import family

PAPER = 'Huang et al. 2017'

# Section 4.2 "Training": epochs and batch size per dataset (TFDS names).
PAPER_EPOCHS = {'cifar10': 300, 'cifar100': 300, 'svhn_cropped': 40, 'imagenet2012': 90}
PAPER_BATCH = {'cifar10': 64, 'cifar100': 64, 'svhn_cropped': 64, 'imagenet2012': 256}

# Table 2's error columns: (name, TFDS dataset, augmented). SVHN has no "+" column.
TABLE2_COLUMNS = (('C10', 'cifar10', False), ('C10+', 'cifar10', True),
                  ('C100', 'cifar100', False), ('C100+', 'cifar100', True),
                  ('SVHN', 'svhn_cropped', False))

# Table 2, rows in the paper's order (the earlier baselines, Network in Network to FractalNet,
# are left out). Model: the `models.create_model` name of the same network, None where we
# have none. Params in millions as printed: ours match them to that rounding, the ResNets'
# without BatchNorm's scales and offsets, which their papers leave out (our pre-activation
# ResNet-1001: 10.33 M in all, 10.18 M without). None: the paper has no number ("-").
# (method, model, depth, params, (C10, C10+, C100, C100+, SVHN))
TABLE2 = (
    ('ResNet (He et al.)', 'resnet110', 110, 1.7, (None, 6.61, None, None, None)),
    ('ResNet (reported by Huang et al. 2016)', 'resnet110', 110, 1.7,
     (13.63, 6.41, 44.74, 27.22, 2.01)),
    ('ResNet with Stochastic Depth', None, 110, 1.7, (11.66, 5.23, 37.80, 24.58, 1.75)),
    ('ResNet with Stochastic Depth', None, 1202, 10.2, (None, 4.91, None, None, None)),
    ('ResNet (pre-activation)', 'preact_resnet164', 164, 1.7,
     (11.26, 5.46, 35.58, 24.33, None)),
    ('ResNet (pre-activation)', 'preact_resnet1001', 1001, 10.2,
     (10.56, 4.62, 33.47, 22.71, None)),
    ('DenseNet (k=12)', 'densenet40_k12', 40, 1.0, (7.00, 5.24, 27.55, 24.42, 1.79)),
    ('DenseNet (k=12)', 'densenet100_k12', 100, 7.0, (5.77, 4.10, 23.79, 20.20, 1.67)),
    ('DenseNet (k=24)', 'densenet100_k24', 100, 27.2, (5.83, 3.74, 23.42, 19.25, 1.59)),
    ('DenseNet-BC (k=12)', 'densenet_bc100_k12', 100, 0.8, (5.92, 4.51, 24.15, 22.27, 1.76)),
    ('DenseNet-BC (k=24)', 'densenet_bc250_k24', 250, 15.3, (5.19, 3.62, 19.64, 17.60, 1.74)),
    ('DenseNet-BC (k=40)', 'densenet_bc190_k40', 190, 25.6, (None, 3.46, None, 17.18, None)),
)
# Table 2 marks with * the pre-activation ResNets' C10 and C100 errors: the DenseNet authors'
# own runs, not He et al.'s.
TABLE2_OWN_RUNS = {('preact_resnet164', 'C10'), ('preact_resnet164', 'C100'),
                   ('preact_resnet1001', 'C10'), ('preact_resnet1001', 'C100')}

# Table 3: ImageNet validation error (%):
# model: (single-crop top-1, single-crop top-5, 10-crop top-1, 10-crop top-5).
TABLE3 = {
    'densenet121': (25.02, 7.71, 23.61, 6.66),
    'densenet169': (23.80, 6.85, 22.08, 5.92),
    'densenet201': (22.58, 6.34, 21.46, 5.54),
    'densenet264': (22.15, 6.12, 20.80, 5.29),
}

# torchvision's IMAGENET1K_V1 weights: model: (acc@1, acc@5) in %. The DenseNets are the
# authors' LuaTorch weights, ported; resnet50 is torchvision's own training.
TORCHVISION = {
    'densenet121': (74.434, 91.972),
    'densenet161': (77.138, 93.560),
    'densenet169': (75.600, 92.806),
    'densenet201': (76.896, 93.370),
    'resnet50': (76.130, 92.862),
}

# Fields that are the training recipe, numerics or a variables layout, not the network: a run
# that sets them still trains the paper's model (dropout follows augmentation, the classifier
# the dataset; a ResNet's scan_blocks only stacks its blocks' variables).
_NOT_ARCHITECTURE = ('num_classes', 'dropout_rate', 'bn_epsilon', 'bn_momentum', 'scan_blocks')
# (dataset, augmented) -> index of its Table 2 column.
_COLUMN = {(dataset, aug): i for i, (_, dataset, aug) in enumerate(TABLE2_COLUMNS)}


@dataclasses.dataclass(frozen=True)
class PaperResult:
  """One published error of the model and dataset of a run."""
  error: float                         # percent
  metric: str                          # 'test error', 'single-crop top-1 error'
  source: str                          # table, row and column it was copied from
  epochs: int                          # the paper's training budget for it
  top5_error: Optional[float] = None   # ImageNet only, same crop


@dataclasses.dataclass(frozen=True)
class TorchvisionAccuracy:
  """torchvision's published ImageNet-1k validation accuracy of its weights, in percent."""
  acc1: float
  acc5: float
  weights: str
  source: str


def _architecture(name: str, fields: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
  """The network `create_model(name, **fields)` builds, as comparable fields; None if the
  fields do not build one."""
  try:
    model = create_model(name, **fields)
    described = family.architecture(model)
  except (ValueError, TypeError):
    return None
  described = {k: v for k, v in described.items() if k not in _NOT_ARCHITECTURE}
  return {'class': type(model).__name__, **{
      k: tuple(v) if isinstance(v, list) else v for k, v in described.items()}}


def _is_model(model: Mapping[str, Any], paper_name: str) -> bool:
  """Whether a run's config.model builds exactly the network the paper calls `paper_name`.

  The run's model is built as the trainer builds it (its name with every field that is not
  None), so 'densenet_bc' with depth=100 and growth_rate=12 is 'densenet_bc100_k12', and
  'densenet_bc100_k12' with growth_rate=24, compression=1.0 or another stem is not.
  """
  name = model.get('name')
  if not name:
    return False
  fields = {k: v for k, v in model.items() if k != 'name' and v is not None}
  ours = _architecture(name, fields)
  return ours is not None and ours == _paper_architecture(paper_name)


@functools.lru_cache(maxsize=None)
def _paper_architecture(paper_name: str) -> Dict[str, Any]:
  return _architecture(paper_name, {})


def paper_result(model: Mapping[str, Any], dataset: str,
                 augmented: bool) -> Optional[PaperResult]:
  """The paper's error for a run's model on its dataset, or None.

  Args:
    model: the run's `config.model` as a dict ('name' and the fields it overrides; None or
      missing fields keep the named model's own values).
    dataset: the TFDS name: 'cifar10', 'cifar100', 'svhn_cropped' or 'imagenet2012'.
    augmented: whether the run trained with the standard augmentation (`is_augmented`): the
      "+" columns of Table 2. SVHN and ImageNet have one setting each: none, and the
      standard crops and flips.

  Returns:
    The matching Table 2 or Table 3 entry, or None when the model is not exactly one of the
    paper's networks or the paper has no number for that dataset and augmentation. A
    ResNet-110 takes He et al.'s own number where Table 2 has it (C10+), else Huang et al.'s.
  """
  if dataset == 'imagenet2012':
    if not augmented:
      return None
    for name, (top1, top5, _, _) in TABLE3.items():
      if _is_model(model, name):
        return PaperResult(top1, 'single-crop top-1 error',
                           f'{PAPER}, Table 3, DenseNet-{name[8:]}, single-crop',
                           PAPER_EPOCHS[dataset], top5_error=top5)
    return None
  index = _COLUMN.get((dataset, bool(augmented)))
  if index is None:
    return None
  column = TABLE2_COLUMNS[index][0]
  for method, name, depth, _, errors in TABLE2:
    error = errors[index]
    if name is None or error is None or not _is_model(model, name):
      continue
    note = ' (*: run by Huang et al.)' if (name, column) in TABLE2_OWN_RUNS else ''
    return PaperResult(error, 'test error', f'{PAPER}, Table 2, {method} L={depth}, {column}'
                       f'{note}', PAPER_EPOCHS[dataset])
  return None


def is_augmented(config: Mapping[str, Any]) -> bool:
  """Whether a run trained with random augmentation: `config['dataset']['augment']`.

  `config` is the run's config as results.json saves it (`config.to_dict()`). The CIFAR/SVHN
  configs (configs/cifar_base.py) set `dataset.augment` True for 'cifar10'/'cifar100' (the
  paper's C10+/C100+: 4-pixel pad, random crop, flip, `dataset.preprocess='cifar'`) and False
  for the '_noaug' variants and SVHN; the base config's default, for a config without the
  field, is True.
  """
  return bool((config.get('dataset') or {}).get('augment', True))


def _epochs_text(epochs: float) -> str:
  if epochs == int(epochs):
    return str(int(epochs))
  return f'{epochs:.1f}' if epochs >= 0.1 else f'{epochs:.2g}'


def budget(config: Mapping[str, Any], steps_per_epoch: Optional[float]) -> str:
  """How much of the paper's training a run had, e.g. '1.5 of 300 epochs'.

  The run's epochs are `num_train_steps / steps_per_epoch` when num_train_steps > 0, else
  `num_epochs`, as trainer.Plan derives them; `steps_per_epoch` is the run's (results.json's
  'steps_per_epoch'). Epochs count passes over the data whatever the batch size; the paper's
  are in PAPER_EPOCHS, its batches in PAPER_BATCH.

  Returns:
    '' when the dataset is not one of the paper's, or the run's length is unknown.
  """
  paper_epochs = PAPER_EPOCHS.get((config.get('dataset') or {}).get('name'))
  if paper_epochs is None:
    return ''
  steps = config.get('num_train_steps') or -1
  if steps > 0:
    if not steps_per_epoch:
      return ''
    epochs = steps / steps_per_epoch
  elif config.get('num_epochs') is not None:
    epochs = config['num_epochs']
  else:
    return ''
  return f'{_epochs_text(epochs)} of {paper_epochs} epochs'


def torchvision_accuracy(model_name: str) -> Optional[TorchvisionAccuracy]:
  """torchvision's published accuracy of its IMAGENET1K_V1 weights for `model_name` (ours and
  torchvision's names agree: 'densenet121', 'resnet50'...), or None if it publishes none."""
  if model_name not in TORCHVISION:
    return None
  acc1, acc5 = TORCHVISION[model_name]
  return TorchvisionAccuracy(acc1, acc5, 'IMAGENET1K_V1',
                             f'torchvision {model_name} IMAGENET1K_V1, ImageNet-1K acc@1/acc@5')
