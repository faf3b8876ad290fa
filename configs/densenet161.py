"""DenseNet-161 (torchvision's k=48 model; not in the paper's Table 3) on ImageNet with the paper's recipe.

    python train.py --config=configs/densenet161.py --workdir=$HOME/runs/densenet161 \
        --config.dataset.data_dir=$TFDS_DATA_DIR

torchvision's published single-crop top-1 accuracy: 77.14 % (top-5 93.56 %).
Recipe (configs/base.py): global batch 256, 90 epochs, SGD with Nesterov momentum 0.9,
learning rate 0.1 (for batch 256, scaled linearly) divided by 10 at epochs 30 and 60, weight
decay 1e-4; Inception-style crops and flips; 224x224 single center crop for evaluation.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'densenet161'
  return config
