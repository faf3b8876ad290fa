"""DenseNet-BC (L=190, k=40) on CIFAR-10/100 or SVHN, Table 2 of the paper.

    python train.py --config=configs/cifar_densenet_bc190_k40.py --workdir=$HOME/runs/cifar_densenet_bc190_k40
    python train.py --config=configs/cifar_densenet_bc190_k40.py:cifar100 --workdir=$HOME/runs/c100_densenet_bc190_k40

Published test error (%): C10 / C10+ - / 3.46; C100 / C100+ - / 17.18; SVHN -.
Config arguments and recipe: configs/cifar_base.py.
"""

from configs import cifar_base


def get_config(variant: str = 'cifar10'):
  return cifar_base.get_config('densenet_bc190_k40', variant)
