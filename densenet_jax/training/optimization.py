"""Learning-rate schedules and the Optax optimizer, derived from the config by the trainer."""

import optax


def scaled_learning_rate(config, global_batch_size: int) -> float:
  """The config's learning rate, given for reference_batch_size, scaled linearly to the batch.

  Linear scaling (Goyal et al., 2017) keeps a recipe valid when the same experiment runs on more
  or fewer accelerators with a proportionally different global batch.
  """
  return config.learning_rate * global_batch_size / config.reference_batch_size


def learning_rate_schedule(config, *, global_batch_size: int, steps_per_epoch: int,
                           num_train_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step.

  'step' is the paper's schedule: the rate is multiplied by lr_decay_factor at each fraction of
  the run in lr_decay_at (ImageNet: 1/3 and 2/3, epochs 30 and 60 of 90; CIFAR: 50 % and 75 %),
  so that a longer or shorter run keeps the recipe's shape. 'cosine' decays
  to zero at num_train_steps. Both start with warmup_epochs of linear warmup from zero.
  """
  base = scaled_learning_rate(config, global_batch_size)
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == 'step':
    boundaries = {int(round(f * num_train_steps)): config.lr_decay_factor
                  for f in config.lr_decay_at}
    main = optax.piecewise_constant_schedule(base, boundaries)
    if warmup_steps:
      # Boundaries are absolute steps; the joined schedule restarts its count after warmup.
      shifted = {b - warmup_steps: f for b, f in boundaries.items()}
      main = optax.piecewise_constant_schedule(base, shifted)
  elif config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(base, max(1, num_train_steps - warmup_steps))
  else:
    raise ValueError(f"schedule={config.schedule!r}: expected 'step' or 'cosine'.")
  if not warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, base, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def state_description(config) -> dict:
  """The config fields that decide the optimizer state's structure (`create_optimizer`):
  clipping and weight decay add chain stages, momentum adds a trace. Their values may change
  between sessions of a run; whether they are on may not, or the saved state would not fit."""
  return {'optimizer': config.optimizer, 'grad_clip_norm': config.grad_clip_norm is not None,
          'weight_decay': bool(config.weight_decay), 'momentum': bool(config.momentum)}


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and L2 weight decay on every parameter, as the paper trains.

  The decay is added to the gradient before momentum (PyTorch's and the official Torch code's
  `weight_decay`), not decoupled: that is what the published recipe's 1e-4 means.
  """
  parts = []
  if config.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  if config.optimizer == 'sgd':
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov))
  else:
    raise ValueError(f"optimizer={config.optimizer!r}: expected 'sgd'.")
  return optax.chain(*parts)
