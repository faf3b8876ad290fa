"""DenseNet-264 on ImageNet with the paper's recipe.

    python train.py --config=configs/densenet264.py --workdir=$HOME/runs/densenet264 \
        --config.dataset.data_dir=$TFDS_DATA_DIR

Published single-crop error: top-1 22.15 %, top-5 6.12 %.
Recipe (configs/base.py): global batch 256, 90 epochs, SGD with Nesterov momentum 0.9,
learning rate 0.1 (for batch 256, scaled linearly) divided by 10 at epochs 30 and 60, weight
decay 1e-4; Inception-style crops and flips; 224x224 single center crop for evaluation.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'densenet264'
  return config
