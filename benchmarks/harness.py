"""What throughput.py and ab.py share: the trainer's train step, compiled for a benchmark."""

import statistics
import time


def compiled_train_step(model, batch):
  """The trainer's jitted train step (SGD, BatchNorm updates) for `model` on one random batch,
  compiled: (compiled step, train state, batch, compile seconds, temp MiB)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax
  from densenet_jax.training import train_lib

  size = 224 if model.stem == 'imagenet' else 32
  mesh = train_lib.create_mesh()
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  schedule = optax.constant_schedule(0.1)
  state, shardings = train_lib.create_train_state(model, tx, 0, (size, size, 3), mesh)
  p_train, _ = train_lib.compile_steps(model, tx, schedule, 0.0, shardings, mesh)
  rng = np.random.default_rng(0)
  batch_np = {'image': rng.standard_normal((batch, size, size, 3), np.float32),
              'label': rng.integers(0, model.num_classes, batch).astype(np.int32)}
  data = train_lib.to_global(batch_np, mesh)
  start = time.perf_counter()
  compiled = p_train.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return compiled, state, data, compile_s, temp_mib


def timed(fn, steps, after_warmup=None):
  """Median seconds of fn() over `steps` calls after two warm-up calls (then after_warmup())."""
  for _ in range(2):
    fn()
  if after_warmup:
    after_warmup()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
