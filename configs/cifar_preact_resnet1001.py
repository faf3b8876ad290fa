"""Pre-activation ResNet-1001 ("Identity Mappings") on CIFAR-10/100 or SVHN.

    python train.py --config=configs/cifar_preact_resnet1001.py --workdir=$HOME/runs/cifar_preact_resnet1001
    python train.py --config=configs/cifar_preact_resnet1001.py:cifar100 --workdir=$HOME/runs/c100_preact_resnet1001

Published test error (%): C10+ 4.92, C100+ 22.71.
Config arguments: configs/cifar_base.py; recipe: cifar_base.resnet_config.
"""

from configs import cifar_base


def get_config(variant: str = 'cifar10'):
  return cifar_base.resnet_config('preact_resnet1001', variant)
