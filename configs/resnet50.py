"""ResNet-50 (torchvision's) on ImageNet with the recipe the DenseNets use.

    python train.py --config=configs/resnet50.py --workdir=$HOME/runs/resnet50 \
        --config.dataset.data_dir=$TFDS_DATA_DIR

fb.resnet.torch's ResNet-50 with this recipe: top-1 error 24.01 %, top-5 7.02 %.
Recipe (configs/base.py): global batch 256, 90 epochs, SGD with Nesterov momentum 0.9,
learning rate 0.1 (for batch 256, scaled linearly) divided by 10 at epochs 30 and 60, weight
decay 1e-4; Inception-style crops and flips; 224x224 single center crop for evaluation.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'resnet50'
  return config
