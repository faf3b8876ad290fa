"""The train state, its sharded creation, the train and eval steps.

Everything runs under `jax.jit` over a one-axis `Mesh` named 'data' that holds every device of
every process: batches are sharded on their first axis, the train state is replicated and
donated to the step. BatchNorm therefore sees global-batch statistics with no `axis_name`.
"""

import functools
import os
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from densenet_jax.models import initializers

Batch = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: saved and restored as one unit.

  Attributes:
    step: number of optimizer steps taken.
    params: model parameters (float32).
    batch_stats: BatchNorm running averages.
    opt_state: Optax state (momentum).
    rng: raw PRNG key for dropout; each step folds in its step number.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def create_mesh() -> Mesh:
  """A mesh of all devices of all processes with a single 'data' axis."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       image_shape: Tuple[int, ...], mesh: Mesh) -> Tuple[TrainState, Any]:
  """Initialises the train state directly with its final (replicated) sharding.

  Returns:
    (state, state_shardings); the shardings are reused for the step and for restoring.
  """

  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    # The kernels are drawn in a few batched calls after model.init (initializers.py): XLA
    # compiles every random draw separately, and one per kernel made this program compile for
    # longer than the train step.
    with initializers.deferred() as kernels:
      variables = model.init({'params': params_rng}, jnp.zeros((1,) + tuple(image_shape)),
                             train=False)
    params = kernels.fill(variables['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), rng=dropout_rng)

  # Traced on the mesh as the steps are: the model's convolutions may be oneDNN's, which are
  # not used over several devices without one (and say so, densenet_jax/native/shards.py).
  init = on_mesh(init, mesh)
  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy, with optional label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               label_smoothing: float) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One SGD step on a global batch.

  Args:
    state: the current train state (donated by the caller's jit).
    batch: 'image' [batch, height, width, channels] float32 and 'label' [batch] int32,
      sharded over the mesh's 'data' axis.
    model: the DenseNet.
    tx: the optimizer.
    schedule: the learning rate schedule (for logging only; tx applies it).
    label_smoothing: label smoothing of the loss.

  Returns:
    (new state, metrics): loss and accuracy of this batch and the learning rate used.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss = cross_entropy(logits, batch['label'], logits.shape[-1], label_smoothing).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'learning_rate': schedule(state.step),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model: nn.Module) -> Dict[str, jax.Array]:
  """Sums of loss, top-1 and top-5 hits and example count over the real (mask) examples."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['label']
  loss = cross_entropy(logits, labels, logits.shape[-1])
  top1 = jnp.argmax(logits, -1) == labels
  k = min(5, logits.shape[-1])
  topk = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  return {
      'loss': jnp.sum(loss * mask),
      'top1': jnp.sum(top1 * mask),
      'top5': jnp.sum(topk * mask),
      'count': jnp.sum(mask),
  }


# XLA:CPU hands dot products, reductions and each convolution to YNNPACK by default. Its
# convolution kernel runs on one core, where Eigen's, used once convolutions are left out of the
# list, runs on all, so the steps are faster without it (docs/performance.md, "What each design
# choice is worth"); leaving out more (the reductions or single dot products) made them slower.
# Other platforms ignore xla_cpu_ options.
_CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': ','.join(
        'LIBRARY_FUSION_TYPE_' + kind for kind in ('DOT', 'REDUCE', 'INDIVIDUAL_DOT')),
}


def compiler_options(mesh: Mesh) -> Optional[Dict[str, str]]:
  """XLA options for programs that run on `mesh`'s devices (None: XLA's defaults).

  An option the user sets in XLA_FLAGS wins: it is left out here.
  """
  if mesh.devices.flat[0].platform != 'cpu':
    return None
  user_flags = os.environ.get('XLA_FLAGS', '')
  return {name: value for name, value in _CPU_COMPILER_OPTIONS.items()
          if name not in user_flags} or None


def on_mesh(step: Callable, mesh: Mesh) -> Callable:
  """`step`, traced with `mesh` as the current mesh: code inside that needs to know how the
  batch is split sees it (each device runs the native CPU calls on its own part of the batch,
  densenet_jax/native/shards.py)."""
  @functools.wraps(step)
  def traced_on_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(*args, **kwargs)
  return traced_on_mesh


def compile_steps(model, tx, schedule, label_smoothing, state_shardings, mesh):
  """Jitted train and eval steps with explicit shardings; the train state is donated."""
  data = batch_sharding(mesh)
  repl = replicated(mesh)
  options = compiler_options(mesh)
  p_train = jax.jit(
      on_mesh(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                label_smoothing=label_smoothing), mesh),
      in_shardings=(state_shardings, data),
      out_shardings=(state_shardings, repl),
      donate_argnums=0,
      compiler_options=options,
  )
  p_eval = jax.jit(on_mesh(functools.partial(eval_step, model=model), mesh),
                   in_shardings=(state_shardings, data), out_shardings=repl,
                   compiler_options=options)
  return p_train, p_eval


def to_global(batch: Dict[str, np.ndarray], mesh: Mesh) -> Batch:
  """Assembles a global batch, sharded on 'data', from this process's local part."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
