"""What the ablation configs share: their sizes and the CPU size's training budget."""

SIZES = ('full', 'cpu')


def size(arg) -> str:
  """The study size named by the config argument ('FILE.py:cpu'); the full study by default."""
  chosen = arg or 'full'
  if chosen not in SIZES:
    raise ValueError(f'Config argument {arg!r}: expected one of {SIZES}.')
  return chosen


def cpu_budget(config):
  """The same short budget for every point of a study that fits on a 2-core CPU in about an
  hour: 1,200 steps of 64 images (1.5 CIFAR epochs), the learning rate divided by 10 at 50 %
  and 75 % of them, the whole test set evaluated every 400 steps."""
  config.num_train_steps = 1200
  config.eval_every_steps = 400
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
