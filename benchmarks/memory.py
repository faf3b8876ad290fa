"""Compiled train-step memory of the standard and memory-efficient DenseNet modes.

    python benchmarks/memory.py --model=densenet_bc100_k12 --batch_size=64 --image_size=32
    python benchmarks/memory.py --model=densenet121 --batch_size=8 --image_size=224
    python benchmarks/memory.py --model=densenet_bc250_k24 --scan_segments=0   # unrolled

Prints XLA's `memory_analysis()` of the compiled gradient step (forward, backward, BatchNorm
updates) for both modes: temporary bytes are the activations and workspace that the
memory-efficient mode exists to shrink. Nothing is executed, only compiled.
"""

import json
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from densenet_jax.models import create_model
from densenet_jax.models import min_image_size
from densenet_jax.training import train_lib

_MODEL = flags.DEFINE_string('model', 'densenet_bc100_k12', 'A create_model name.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size.', lower_bound=1)
_SIZE = flags.DEFINE_integer('image_size', 32, 'Image height and width.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_SCAN = flags.DEFINE_integer('scan_segments', 1, 'Scanned loops per dense block; 0: unrolled.')


def compiled_memory(name, batch_size, image_size, dtype, memory_efficient, scan_segments):
  model = create_model(name, dtype=jnp.dtype(dtype), memory_efficient=memory_efficient,
                       scan_segments=scan_segments)
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                    compiler_options=train_lib.compiler_options(train_lib.create_mesh()))
  start = time.perf_counter()
  compiled = grad_fn.lower(variables['params'], variables['batch_stats'], images,
                           labels).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  return dict(model=name, batch_size=batch_size, image_size=image_size, dtype=dtype,
              memory_efficient=memory_efficient, scan_segments=scan_segments,
              compile_s=round(seconds, 1),
              temp_mib=round(mem.temp_size_in_bytes / 2**20, 1),
              argument_mib=round(mem.argument_size_in_bytes / 2**20, 1),
              output_mib=round(mem.output_size_in_bytes / 2**20, 1))


def main(argv):
  del argv
  try:   # Both modes, so that a field one of them lacks (ResNets) is named before compiling.
    models = [create_model(_MODEL.value, memory_efficient=eff, scan_segments=_SCAN.value)
              for eff in (False, True)]
  except (TypeError, ValueError) as e:
    sys.exit(f'memory: --model={_MODEL.value}: {e}')
  if _SIZE.value < min_image_size(models[0]):
    sys.exit(f'memory: --image_size={_SIZE.value}: {_MODEL.value} needs at least '
             f'{min_image_size(models[0])} pixels.')
  rows = [compiled_memory(_MODEL.value, _BATCH.value, _SIZE.value, _DTYPE.value, eff,
                          _SCAN.value) for eff in (False, True)]
  for row in rows:
    print(json.dumps(row))
  print(f'memory-efficient / standard temp: {rows[1]["temp_mib"] / rows[0]["temp_mib"]:.3f}')


if __name__ == '__main__':
  app.run(main)
