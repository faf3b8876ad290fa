"""DenseNet (L=40, k=12) on CIFAR-10/100 or SVHN, Table 2 of the paper.

    python train.py --config=configs/cifar_densenet40_k12.py --workdir=$HOME/runs/cifar_densenet40_k12
    python train.py --config=configs/cifar_densenet40_k12.py:cifar100 --workdir=$HOME/runs/c100_densenet40_k12

Published test error (%): C10 / C10+ 7.00 / 5.24; C100 / C100+ 27.55 / 24.42; SVHN 1.79.
Config arguments and recipe: configs/cifar_base.py.
"""

from configs import cifar_base


def get_config(variant: str = 'cifar10'):
  return cifar_base.get_config('densenet40_k12', variant)
