"""Ablation of growth rate k and compression theta: DenseNet-BC on CIFAR-10 (C10+).

    python -m densenet_jax.experiments.sweep --config=configs/ablations/growth_compression.py --workdir=DIR \
        --seeds=3
    python -m densenet_jax.experiments.sweep --config=configs/ablations/growth_compression.py:cpu \
        --workdir=DIR --seeds=3

Default ('full'): DenseNet-BC L=100, k in {12, 24, 32} x theta in {0.25, 0.5, 0.75, 1.0}, each
trained with the paper's recipe (300 epochs, batch 64, learning rate 0.1 divided by 10 at 50 %
and 75 %): 12 configurations, each about a GPU-day's fraction of what BC-100 takes.

':cpu': a study that fits a 2-core CPU with 3 seeds (1 h 42 min, measured while other work
shared the cores): DenseNet-BC L=22 (3 layers per block), k in {12, 24} x theta in {0.5, 1.0},
each trained for the same budget of 600 steps of 64 images (0.77 epochs), the learning rate
divided by 10 at 50 % and 75 % of them, and evaluated on the whole test set at steps 300 and
600. Its errors are far from the paper's; it shows which effects of k and theta so short a
budget resolves, and exercises the whole workflow on real data.
"""

from configs import cifar_base
from configs.ablations import common
from densenet_jax.experiments import hyper


def get_config(arg=None):
  config = cifar_base.get_config('densenet_bc', 'cifar10')
  config.model.depth = 100
  config.model.growth_rate = 12
  if common.size(arg) == 'cpu':
    config.model.depth = 22
    common.cpu_budget(config)
    config.num_train_steps = 600
    config.eval_every_steps = 300
    config.checkpoint_every_steps = 150
  return config


def get_sweep(arg=None):
  if common.size(arg) == 'cpu':
    return hyper.product(hyper.sweep('model.growth_rate', [12, 24]),
                         hyper.sweep('model.compression', [0.5, 1.0]))
  return hyper.product(hyper.sweep('model.growth_rate', [12, 24, 32]),
                       hyper.sweep('model.compression', [0.25, 0.5, 0.75, 1.0]))
