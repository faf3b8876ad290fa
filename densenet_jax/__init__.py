"""densenet_jax: Densely Connected Convolutional Networks in JAX/Flax.

The folders, from the bottom up (each imports only its own and lower ones):

  runtime/      what a run stands on: paths and object stores, leases, several hosts, preemption
  native/       oneDNN convolutions for CPUs, called from XLA (optional; a fast path)
  models/       the networks: dense layers, blocks and transitions, ResNet, the named variants
  data/         where images come from, the paper's augmentations, batches per process
  training/     the train state and steps, the loop that train.py runs, checkpoints, records
  experiments/  sweeps of many runs, their report and figures, the paper's numbers
  tools/        command-line tools beside training: model summaries, weight conversion

tests/test_layout.py checks the layering, that there are no import cycles and that no module
grows past 400 lines.
"""

__version__ = '0.1.0'
