"""DenseNet-BC (L=100, k=12) on CIFAR-10/100 or SVHN, Table 2 of the paper.

    python train.py --config=configs/cifar_densenet_bc100_k12.py --workdir=$HOME/runs/cifar_densenet_bc100_k12
    python train.py --config=configs/cifar_densenet_bc100_k12.py:cifar100 --workdir=$HOME/runs/c100_densenet_bc100_k12

Published test error (%): C10 / C10+ 5.92 / 4.51; C100 / C100+ 24.15 / 22.27; SVHN 1.76.
Config arguments and recipe: configs/cifar_base.py.
"""

from configs import cifar_base


def get_config(variant: str = 'cifar10'):
  return cifar_base.get_config('densenet_bc100_k12', variant)
