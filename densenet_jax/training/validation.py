"""Checks of a run's config against its model, dataset and devices, before any compilation.

Each error names the config field, the value and what was expected, so that a mistake costs
seconds instead of the hours a pod would spend compiling and training before it surfaces.
"""

from densenet_jax.models import family


class ConfigError(ValueError):
  """A config field that cannot run."""


def _require(condition: bool, field: str, value, expected: str) -> None:
  if not condition:
    raise ConfigError(f'config.{field}={value!r}: expected {expected}.')


def _positive_int(config, field: str) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value,
           'a positive integer')


def validate_run(config, model, info, device_count: int, process_count: int) -> None:
  """Raises ConfigError for the first field of `config` that this run cannot use.

  Args:
    config: the experiment config.
    model: the model built from it (its own fields were validated when it was built).
    info: the dataset's `input_pipeline.DatasetInfo`.
    device_count: devices of all processes.
    process_count: processes of the run.
  """
  for field in ('batch_size', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
    _positive_int(config, field)
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field] if config[field] is not None else config.batch_size
    _require(value > 0 and value % device_count == 0 and value % process_count == 0, field,
             value, f'a positive multiple of the number of devices ({device_count}) so that '
             'every device gets an equal share of the global batch')
  steps_per_epoch = info.num_train_examples // config.batch_size
  _require(steps_per_epoch >= 1, 'batch_size', config.batch_size,
           f'at most the {info.num_train_examples} training examples of '
           f'{config.dataset.name}')
  _require(config.num_train_steps > 0 or
           (isinstance(config.num_epochs, (int, float)) and config.num_epochs > 0),
           'num_epochs', config.num_epochs, 'a positive number (or num_train_steps > 0)')
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else config.num_epochs * steps_per_epoch)
  height = info.image_shape[0]
  smallest = family.min_image_size(model)
  _require(min(info.image_shape[:2]) >= smallest, 'dataset.image_size', height,
           f'at least {smallest} pixels: {config.model.name} halves the resolution '
           f'{smallest.bit_length() - 1} times')
  _require(model.num_classes >= info.num_classes, 'model.num_classes', model.num_classes,
           f'at least the {info.num_classes} classes of {config.dataset.name}')
  _require(config.schedule in ('step', 'cosine'), 'schedule', config.schedule,
           "'step' or 'cosine'")
  _require(config.optimizer == 'sgd', 'optimizer', config.optimizer, "'sgd'")
  _require(config.learning_rate > 0, 'learning_rate', config.learning_rate, 'a positive number')
  _require(config.reference_batch_size > 0, 'reference_batch_size',
           config.reference_batch_size, 'a positive integer')
  _require(config.warmup_epochs >= 0 and config.warmup_epochs * steps_per_epoch < num_steps,
           'warmup_epochs', config.warmup_epochs,
           f'a non-negative number of epochs shorter than the run ({num_steps} steps = '
           f'{num_steps / steps_per_epoch:g} epochs)')
  _require(0 <= config.label_smoothing < 1, 'label_smoothing', config.label_smoothing,
           'a number in [0, 1)')
  _require(config.grad_clip_norm is None or config.grad_clip_norm > 0, 'grad_clip_norm',
           config.grad_clip_norm, 'a positive number or None')
  if config.schedule == 'step':
    fractions = list(config.lr_decay_at)
    _require(fractions == sorted(fractions) and all(
        isinstance(f, (int, float)) and 0 < f < 1 for f in fractions), 'lr_decay_at',
             config.lr_decay_at, 'increasing fractions of the run in (0, 1), e.g. (0.5, 0.75)')
