"""DenseNet (L=100, k=24) on CIFAR-10/100 or SVHN, Table 2 of the paper.

    python train.py --config=configs/cifar_densenet100_k24.py --workdir=$HOME/runs/cifar_densenet100_k24
    python train.py --config=configs/cifar_densenet100_k24.py:cifar100 --workdir=$HOME/runs/c100_densenet100_k24

Published test error (%): C10 / C10+ 5.83 / 3.74; C100 / C100+ 23.42 / 19.25; SVHN 1.59.
Config arguments and recipe: configs/cifar_base.py.
"""

from configs import cifar_base


def get_config(variant: str = 'cifar10'):
  return cifar_base.get_config('densenet100_k24', variant)
