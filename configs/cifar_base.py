"""The paper's CIFAR-10/100 and SVHN recipe, which the cifar_*.py configs build on; the CIFAR
ResNet baselines train with the same recipe (`resnet_config`).

Select the dataset and augmentation with the config argument after a colon:
    python train.py --config=configs/cifar_densenet_bc100_k12.py:cifar100 --workdir=DIR
'cifar10' (default) and 'cifar100' are the paper's C10+/C100+ (translation and mirroring
augmentation); 'cifar10_noaug' and 'cifar100_noaug' are C10/C100 (no augmentation, dropout 0.2);
'svhn' is SVHN (train + extra, no augmentation, dropout 0.2, 40 epochs).
"""

from configs import base

# Per-channel mean and standard deviation of the training images, pixels in [0, 1].
_STATS = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'svhn_cropped': ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
VARIANTS = ('cifar10', 'cifar10_noaug', 'cifar100', 'cifar100_noaug', 'svhn')


def get_config(model_name: str, variant: str = 'cifar10'):
  """The paper's recipe for `model_name` on one of `VARIANTS`."""
  variant = variant or 'cifar10'
  if variant not in VARIANTS:
    raise ValueError(f'Config argument {variant!r}: expected one of {VARIANTS}.')
  config = base.get_config()
  config.model.name = model_name

  dataset = 'svhn_cropped' if variant == 'svhn' else variant.replace('_noaug', '')
  augment = variant in ('cifar10', 'cifar100')
  config.dataset.name = dataset
  # SVHN: the paper trains on the training and the extra images.
  config.dataset.train_split = 'train+extra' if dataset == 'svhn_cropped' else 'train'
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 32
  # Zero-pad 4 pixels, random 32x32 crop, random horizontal flip: the paper's "+".
  config.dataset.preprocess = 'cifar'
  config.dataset.augment = augment
  config.dataset.mean, config.dataset.std = _STATS[dataset]
  config.dataset.shuffle_buffer = 50_000
  config.dataset.cache = True
  # Without augmentation the paper adds dropout 0.2 after every convolution but the first.
  config.model.dropout_rate = 0.0 if augment else 0.2

  # Batch 64 for 300 epochs (SVHN: 40); learning rate 0.1 divided by 10 at 50 % and 75 %.
  config.batch_size = 64
  config.reference_batch_size = 64
  config.learning_rate = 0.1
  config.num_epochs = 40 if dataset == 'svhn_cropped' else 300
  config.lr_decay_at = (0.5, 0.75)
  config.weight_decay = 1e-4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config


def resnet_config(model_name: str, variant: str = 'cifar10'):
  """A CIFAR ResNet baseline on `variant`, with the DenseNets' recipe above, so that a
  comparison differs in the architecture only. ResNets have no dropout, so the no-augmentation
  variants train without it.

  He et al.'s own runs used batch 128 and 64k iterations (164 epochs) with the same decays at
  50 % and 75 %, and 400 warm-up iterations for the deepest models: `--config.batch_size=128
  --config.reference_batch_size=128 --config.num_epochs=164 --config.warmup_epochs=1` comes
  closest to it.
  """
  config = get_config(model_name, variant)
  config.model.dropout_rate = None
  return config
