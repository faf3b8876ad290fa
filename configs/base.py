"""The base configuration every experiment builds on; it is not run by itself.

Every field can be overridden on the command line, e.g.
    python train.py --config=configs/densenet201.py --workdir=DIR \
        --config.model.growth_rate=24 --config.model.compression=0.5 --config.batch_size=128

Values that follow from others (steps per epoch, the learning rate for the global batch, the
number of classes) are computed by the trainer, never stored here.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config. Experiment configs call this and override fields."""
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  # A densenet_jax.models.create_model name, e.g. 'densenet121', 'densenet_bc100_k12' or
  # 'resnet50'.
  config.model.name = 'densenet121'
  # Any field below that is not None overrides the named model's value; None keeps the model's
  # own. Each applies to the models that have it (DenseNet or ResNet); set for a model without
  # it, the run stops before compiling with an error naming it.
  # Depth L of a CIFAR DenseNet or ResNet (block or stage sizes follow from it).
  config.model.depth = config_dict.placeholder(int)
  # Number of dense layers in each block, e.g. (6, 12, 24, 16); ImageNet models.
  config.model.block_sizes = config_dict.placeholder(tuple)
  # k: feature maps added by each dense layer.
  config.model.growth_rate = config_dict.placeholder(int)
  # The bottleneck 1x1 convolution has bn_size * growth_rate maps.
  config.model.bn_size = config_dict.placeholder(int)
  # theta in (0, 1]: transitions keep floor(theta * C) maps.
  config.model.compression = config_dict.placeholder(float)
  # BN-ReLU-Conv1x1 before every 3x3 convolution (DenseNet-B); a ResNet's 1x1-3x3-1x1 blocks.
  config.model.bottleneck = config_dict.placeholder(bool)
  # Maps produced by the stem; None: the model's default (2k, or 16 for CIFAR DenseNet).
  config.model.num_init_features = config_dict.placeholder(int)
  # 'imagenet' (7x7/2 conv + max pool) or 'cifar' (3x3 conv); DenseNet and ResNet.
  config.model.stem = config_dict.placeholder(str)
  # Dropout after every convolution but the stem's; the paper uses 0.2 without augmentation.
  config.model.dropout_rate = config_dict.placeholder(float)
  # What follows every BatchNorm: 'relu' (the paper's, and the default), 'silu' or 'gelu'.
  config.model.activation = config_dict.placeholder(str)
  # Squeeze-and-excitation on each dense layer's k new maps, with round(se_ratio * k) hidden
  # units (Hu et al., 2018); None: the DenseNet's default, 0 (off, the paper's layer).
  config.model.se_ratio = config_dict.placeholder(float)
  # Classifier size; None: the number of classes of the dataset.
  config.model.num_classes = config_dict.placeholder(int)
  # BatchNorm epsilon (torchvision 1e-5, Keras 1.001e-5) and decay (Flax convention: 0.9).
  config.model.bn_epsilon = config_dict.placeholder(float)
  config.model.bn_momentum = config_dict.placeholder(float)
  # Recompute concatenation + BN + ReLU + 1x1 conv in the backward pass (less memory).
  # None: the DenseNet's default, False.
  config.model.memory_efficient = config_dict.placeholder(bool)
  # Run each dense block as at most this many scanned loops over one feature buffer (compile
  # time independent of depth); 0 compiles every layer separately. Same variables either way.
  # None: the DenseNet's default, 1.
  config.model.scan_segments = config_dict.placeholder(int)
  # Input channels per step of a scanned layer's first convolution: its work and backward
  # workspace follow the layer's own width in steps of this many channels. None: on a CPU 64
  # in the first block, or 48 where that pads the layers' inputs at least 5% less
  # (DenseNet-BC-100), and unless memory_efficient twice as many in each later block; on a GPU or
  # TPU one chunk as wide as the widest input, or when memory_efficient 128 in the first block
  # and 4x as many in each later one (the same workspace in each; models/policy.py).
  config.model.scan_chunk = config_dict.placeholder(int)
  # Let scanned blocks of the paper's layer take the path written for it (models/scanned.py);
  # False sends them to the generic path any layer takes (models/generic_scan.py), to measure
  # what an unusual layer costs. Same results. None: the DenseNet's default, True.
  config.model.specialised = config_dict.placeholder(bool)
  # ResNet fields (models/resnet.py). Residual blocks per stage, e.g. (3, 4, 6, 3); ImageNet.
  config.model.stage_sizes = config_dict.placeholder(tuple)
  # Maps of each stage's 3x3 convolutions, e.g. (64, 128, 256, 512).
  config.model.widths = config_dict.placeholder(tuple)
  # BN-ReLU before every convolution ("Identity Mappings").
  config.model.preactivation = config_dict.placeholder(bool)
  # 'projection' (1x1 convolution where the shape changes) or 'zero_pad' (option A).
  config.model.shortcut = config_dict.placeholder(str)
  # Run each stage's blocks after the first as one scanned loop (compile time independent of
  # depth); False unrolls them. Same variables either way. None: the ResNet's default, True.
  config.model.scan_blocks = config_dict.placeholder(bool)

  config.dataset = ml_collections.ConfigDict()
  # A TFDS name ('imagenet2012', 'cifar10', 'cifar100', 'svhn_cropped', ...), 'folder' for a
  # directory of images ROOT/{train,test}/<class>/*.{png,jpg}, or 'sklearn_digits'.
  config.dataset.name = 'imagenet2012'
  # TFDS data directory or, for 'folder', ROOT. None: $TFDS_DATA_DIR or TFDS's default.
  config.dataset.data_dir = config_dict.placeholder(str)
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  # Input resolution of the model (height = width).
  config.dataset.image_size = 224
  # 'imagenet': Inception-style random resized crop + flip for training, resize 256 and
  # center crop 224 for evaluation. 'cifar': 4-pixel pad, random crop and flip (the paper's
  # "+" augmentation) for training, the image as it is for evaluation.
  config.dataset.preprocess = 'imagenet'
  # Random augmentation of training images; False trains on the evaluation preprocessing.
  config.dataset.augment = True
  # Per-channel mean and standard deviation of pixels scaled to [0, 1] (ImageNet's).
  config.dataset.mean = (0.485, 0.456, 0.406)
  config.dataset.std = (0.229, 0.224, 0.225)
  # Examples in the shuffle buffer of each process.
  config.dataset.shuffle_buffer = 16_384
  # Keep decoded examples in memory after the first epoch (small datasets only).
  config.dataset.cache = False

  # Global batch size, over all devices of all processes.
  config.batch_size = 256
  # Global batch size of evaluation; None: batch_size.
  config.eval_batch_size = config_dict.placeholder(int)
  # Length of training; num_train_steps > 0 overrides num_epochs.
  config.num_epochs = 90
  config.num_train_steps = -1

  # Optimiser: SGD with Nesterov momentum and L2 weight decay, as in the paper.
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  # Learning rate for a global batch of reference_batch_size; scaled linearly by the trainer.
  config.learning_rate = 0.1
  config.reference_batch_size = 256
  # 'step': divide by lr_decay_factor at each fraction of the run in lr_decay_at (the paper's
  # schedule: epochs 30 and 60 of 90 on ImageNet; the boundaries follow num_epochs);
  # 'cosine': cosine decay to zero. Both after warmup_epochs of linear warmup.
  config.schedule = 'step'
  config.lr_decay_at = (1 / 3, 2 / 3)
  config.lr_decay_factor = 0.1
  config.warmup_epochs = 0.0
  # Label smoothing of the cross-entropy target (0: none).
  config.label_smoothing = 0.0
  # Clip gradients to this global norm (None: no clipping).
  config.grad_clip_norm = config_dict.placeholder(float)

  # Compute in bfloat16 with float32 parameters and optimizer state.
  config.half_precision = False

  # Logging, evaluation and checkpoints, in steps; eval_every_steps <= 0: once per epoch.
  config.log_every_steps = 100
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 1000
  # Checkpoints kept on disk.
  config.keep_checkpoints = 3
  # Only evaluate the latest checkpoint of the workdir (or init_checkpoint), then stop.
  config.eval_only = False
  # A new run starts from these converted weights (`python -m densenet_jax.tools.convert` output);
  # a classifier of another size is left freshly initialised (fine-tuning).
  config.init_checkpoint = config_dict.placeholder(str)

  config.seed = 0

  # How the processes of a multi-process run (several hosts) wait for each other, in seconds.
  config.distributed = ml_collections.ConfigDict()
  # How long every process waits at start-up for all of them to join.
  config.distributed.initialization_timeout_seconds = 300
  # A process silent for this long (dead, hung, unreachable) is lost: every other one stops with
  # an error naming it. JAX's own heartbeat, a backstop, is set to twice this plus 10 s.
  config.distributed.heartbeat_timeout_seconds = 30
  # How long the others wait for process 0's decisions (the checkpoint to restore, which can
  # take long to read) and for each other at the cross-process checks.
  config.distributed.decision_timeout_seconds = 900
  # How long a finished process waits at exit for the others to finish.
  config.distributed.shutdown_timeout_seconds = 120
  return config
