"""A first run that works anywhere in a few minutes: a small DenseNet-BC on handwritten digits.

    python train.py --config=configs/quickstart.py --workdir=/tmp/densenet_quickstart

The data is scikit-learn's bundled 8x8 handwritten digits (1,437 training and 360 test images
in a fixed split): no network and no prepared dataset needed. On 2 CPU cores it finishes in
under a minute (26 s measured), compilation included, at a test top-1 accuracy of about 0.99. It checkpoints
like every config: interrupt it and run the same command again to resume.
"""

from configs import base


def get_config():
  config = base.get_config()
  # DenseNet-BC with L = 22 (3 layers per block) and k = 12: small enough to compile quickly.
  config.model.name = 'densenet_bc'
  config.model.depth = 22
  config.model.growth_rate = 12

  config.dataset.name = 'sklearn_digits'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 8
  config.dataset.preprocess = 'cifar'
  # Flipped digits are other symbols: train on the images as they are.
  config.dataset.augment = False
  config.dataset.mean = (0.3,)
  config.dataset.std = (0.4,)
  config.dataset.shuffle_buffer = 2048
  config.dataset.cache = True

  config.batch_size = 64
  config.reference_batch_size = 64
  config.learning_rate = 0.1
  config.num_epochs = 20
  config.lr_decay_at = (0.5, 0.75)
  config.log_every_steps = 50
  config.eval_every_steps = 110
  config.checkpoint_every_steps = 100
  return config
