"""DenseNet-121 on ImageNet with the paper's recipe.

    python train.py --config=configs/densenet121.py --workdir=$HOME/runs/densenet121 \
        --config.dataset.data_dir=$TFDS_DATA_DIR

Published single-crop error: top-1 25.02 %, top-5 7.71 %.
Recipe (configs/base.py): global batch 256, 90 epochs, SGD with Nesterov momentum 0.9,
learning rate 0.1 (for batch 256, scaled linearly) divided by 10 at epochs 30 and 60, weight
decay 1e-4; Inception-style crops and flips; 224x224 single center crop for evaluation.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'densenet121'
  return config
