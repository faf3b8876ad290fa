"""ResNet-110 (He et al. 2016, option A shortcuts) on CIFAR-10/100 or SVHN.

    python train.py --config=configs/cifar_resnet110.py --workdir=$HOME/runs/cifar_resnet110
    python train.py --config=configs/cifar_resnet110.py:cifar100 --workdir=$HOME/runs/c100_resnet110

Published test error (%): C10+ 6.43 (best of 5 runs; their mean 6.61 +- 0.16).
Config arguments: configs/cifar_base.py; recipe: cifar_base.resnet_config.
"""

from configs import cifar_base


def get_config(variant: str = 'cifar10'):
  return cifar_base.resnet_config('resnet110', variant)
