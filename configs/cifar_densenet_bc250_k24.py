"""DenseNet-BC (L=250, k=24) on CIFAR-10/100 or SVHN, Table 2 of the paper.

    python train.py --config=configs/cifar_densenet_bc250_k24.py --workdir=$HOME/runs/cifar_densenet_bc250_k24
    python train.py --config=configs/cifar_densenet_bc250_k24.py:cifar100 --workdir=$HOME/runs/c100_densenet_bc250_k24

Published test error (%): C10 / C10+ 5.19 / 3.62; C100 / C100+ 19.64 / 17.60; SVHN 1.74.
Config arguments and recipe: configs/cifar_base.py.
"""

from configs import cifar_base


def get_config(variant: str = 'cifar10'):
  return cifar_base.get_config('densenet_bc250_k24', variant)
