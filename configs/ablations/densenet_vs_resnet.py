"""The paper's Figure 4 (middle): DenseNet-BC against pre-activation ResNets on C10+.

    python -m densenet_jax.experiments.sweep --config=configs/ablations/densenet_vs_resnet.py --workdir=DIR
    python -m densenet_jax.experiments.sweep --config=configs/ablations/densenet_vs_resnet.py:cpu \
        --workdir=DIR

Parameter efficiency: test error against parameters, DenseNet-BC (concatenation) beside the
pre-activation ResNets of He et al., "Identity Mappings" (addition), every point trained by the
same trainer with the same recipe (the DenseNet paper's C10+ one: SGD, batch 64, the learning
rate divided by 10 at 50 % and 75 % of the run, no dropout), so that only the architecture
differs. The report draws both families on the same axes (error_vs_params.png).

Default ('full'): DenseNet-BC (L=100, k=12), (L=250, k=24), (L=190, k=40) and pre-activation
ResNet-164 and -1001, 300 epochs each. ':cpu': DenseNet-BC L in {16, 28, 40} with k = 12 and
pre-activation ResNets of depth 11, 20 and 29 (9n + 2, n = 1, 2, 3), 1,200 steps each.
"""

from configs import cifar_base
from configs.ablations import common

# (model, depth, growth rate; None for the ResNets, which have none).
POINTS = {
    'full': (('densenet_bc', 100, 12), ('densenet_bc', 250, 24), ('densenet_bc', 190, 40),
             ('preact_resnet_cifar', 164, None), ('preact_resnet_cifar', 1001, None)),
    'cpu': (('densenet_bc', 16, 12), ('densenet_bc', 28, 12), ('densenet_bc', 40, 12),
            ('preact_resnet_cifar', 11, None), ('preact_resnet_cifar', 20, None),
            ('preact_resnet_cifar', 29, None)),
}


def get_config(arg=None):
  config = cifar_base.get_config('densenet_bc', 'cifar10')
  config.model.depth = 100
  config.model.growth_rate = None   # set by each DenseNet point; a ResNet has none
  config.model.dropout_rate = None   # C10+: no dropout, and the ResNets have none
  if common.size(arg) == 'cpu':
    common.cpu_budget(config)
  return config


def get_sweep(arg=None):
  # A ResNet point leaves growth_rate out: train.py's flags cannot set a field to None.
  return [{'model.name': name, 'model.depth': depth,
           **({'model.growth_rate': k} if k is not None else {})}
          for name, depth, k in POINTS[common.size(arg)]]
