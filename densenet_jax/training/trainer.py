"""`train_and_evaluate`: the training loop that `train.py` runs.

Derived values (steps per epoch, the learning rate for the global batch, the number of classes)
are computed here from the config. Everything that can be wrong with a config or dataset is
checked before the first compilation. A run always resumes from the latest checkpoint in its
workdir; the input position is a function of the step, so the resumed run sees exactly the
batches, augmentations and dropout masks that the uninterrupted run would have seen.
"""

import collections
import json
import time
from typing import Any, Dict, Iterator, Optional

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from densenet_jax.data import input_pipeline
from densenet_jax.models import create_model
from densenet_jax.models import family
from densenet_jax.native import onednn
from densenet_jax.runtime import buckets
from densenet_jax.runtime import coordination
from densenet_jax.runtime import paths
from densenet_jax.runtime import provenance
from densenet_jax.runtime import run_guard
from densenet_jax.training import checkpointing
from densenet_jax.training import metric_writer
from densenet_jax.training import optimization
from densenet_jax.training import pretrained
from densenet_jax.training import records
from densenet_jax.training import staged_checkpoints
from densenet_jax.training import train_lib
from densenet_jax.training import validation


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The config's model: model.name plus every model field that is not None."""
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()
               if k != 'name' and v is not None}
  overrides.setdefault('num_classes', num_classes)
  if config.half_precision:
    overrides['dtype'] = jnp.bfloat16
  try:
    return create_model(config.model.name, **overrides)
  except ValueError as e:
    raise validation.ConfigError(f'config.model: {e}') from None


class Plan:
  """The numbers of a run that follow from the config and the dataset."""

  def __init__(self, config, info: input_pipeline.DatasetInfo):
    self.process_count = jax.process_count()
    self.global_batch = config.batch_size
    self.local_batch = config.batch_size // self.process_count
    self.eval_global_batch = config.eval_batch_size or config.batch_size
    self.eval_local_batch = self.eval_global_batch // self.process_count
    self.steps_per_epoch = info.num_train_examples // self.global_batch
    if config.num_train_steps > 0:
      self.num_train_steps = config.num_train_steps
    else:
      self.num_train_steps = config.num_epochs * self.steps_per_epoch
    self.num_eval_batches = input_pipeline.num_eval_batches(info, self.eval_global_batch)
    self.eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                       else self.steps_per_epoch)

  def input_position(self, step: int) -> Dict[str, int]:
    epoch, batch = divmod(step, self.steps_per_epoch)
    return {'step': step, 'epoch': epoch, 'batches_in_epoch': batch}


def _prefetch(iterator: Iterator, mesh, size: int = 2) -> Iterator:
  """Puts the next `size` batches on the devices while the current step runs."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(train_lib.to_global(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _train_batches(config, plan: Plan, start_step: int, mesh) -> Iterator:
  """Global training batches from `start_step` on, epoch after epoch."""
  epoch, skip = divmod(start_step, plan.steps_per_epoch)
  while True:
    yield from _prefetch(input_pipeline.train_iterator(
        config.dataset, seed=config.seed, local_batch_size=plan.local_batch, epoch=epoch,
        skip_batches=skip, process_index=jax.process_index(),
        process_count=plan.process_count), mesh)
    epoch, skip = epoch + 1, 0


def evaluate(p_eval, state, config, plan: Plan, mesh) -> Dict[str, float]:
  """Loss, top-1 and top-5 over the whole eval split, every example counted exactly once."""
  batches = input_pipeline.eval_iterator(
      config.dataset, local_batch_size=plan.eval_local_batch,
      num_batches=plan.num_eval_batches, process_index=jax.process_index(),
      process_count=plan.process_count)
  totals = None
  for batch in _prefetch(batches, mesh):
    sums = p_eval(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'eval_loss': float(totals['loss']) / count, 'eval_top1': float(totals['top1']) / count,
          'eval_top5': float(totals['top5']) / count, 'eval_examples': count}


def _check_finite(history, first_step: int) -> None:
  """Raises FloatingPointError naming the first step whose loss was NaN or infinite."""
  losses = np.asarray(jax.device_get([m['loss'] for m in history]))
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    raise FloatingPointError(
        f'Loss is {losses[bad[0]]} at step {step}; stopping. The last checkpoint saved before '
        'it is intact; lower the learning rate or enable grad_clip_norm and rerun.')


def model_description(model) -> Dict[str, Any]:
  """The model's architectural fields, as JSON values, for comparison across restarts.

  Fields that change how the same network is computed, not the network nor its variables
  (compute dtype, a DenseNet's memory_efficient and scanning: `family.architecture`), are left
  out: they may differ between the machines a run moves across. A ResNet's scan_blocks stays:
  it changes the checkpoint's layout.
  """
  return json.loads(json.dumps(family.architecture(model)))


def _flat_hparams(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  """Every config field under its dotted name ('model.growth_rate'), for TensorBoard."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_hparams(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value if isinstance(value, (int, float, bool)) else str(value)
  return flat


def _initialise(state, init_checkpoint: str, model):
  """`state` with params and batch statistics from converted weights (fine-tuning, eval)."""
  merged = pretrained.merge(pretrained.read_init_checkpoint(init_checkpoint), state.params,
                            state.batch_stats, model)
  shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.batch_stats))
  params, batch_stats = jax.device_put((merged['params'], merged['batch_stats']), shardings)
  return state.replace(params=params, batch_stats=batch_stats)


def run_description(config, model, info: input_pipeline.DatasetInfo) -> Dict[str, Any]:
  """What a checkpoint must agree with to be resumed (saved with every checkpoint, checked on
  restore): the network, the optimizer fields that change the train state's structure, and the
  classes where the labels are made here (a folder dataset: label i is the i-th class folder)."""
  return {'model': model_description(model), 'dataset': config.dataset.name,
          'optimizer': optimization.state_description(config),
          'labels': {'classes': list(info.class_names) if info.class_names else None}}


def _restore(checkpointer, state, plan: Plan, model, run_info: Dict[str, Any],
             init_checkpoint=None):
  """The latest good checkpoint of the workdir, after checking it belongs to this run; for a
  new run, the converted weights of `init_checkpoint` if given."""

  def check_run_info(saved_info):
    differing = []
    for part in ('model', 'optimizer', 'labels'):
      if part not in saved_info:  # Written before this part was recorded: nothing to compare.
        continue
      saved, current = saved_info[part], run_info[part]
      differing += [f'{part}.{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
                    for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differing:
      raise validation.ConfigError(
          f'The checkpoints in {checkpointer.directory} hold another train state; refusing to '
          f'resume with: {"; ".join(differing)}. Change these back, or use a new --workdir.')

  restored = coordination.restore_as_process_0_decides(
      lambda: checkpointer.restore_latest_good(state, check_run_info),
      lambda step: checkpointer.restore_step(state, step, check_run_info),
      errors=(validation.ConfigError, checkpointing.RestoreError))
  if restored is None:
    return state if init_checkpoint is None else _initialise(state, init_checkpoint, model)
  state, position, _, step = restored
  expected = plan.input_position(step)
  if position != expected:
    raise validation.ConfigError(
        f'Checkpoint {step} was written at input position {position}, but this config puts '
        f'step {step} at {expected}: batch_size or the dataset changed. Use a new --workdir.')
  return state


def prepare(config: ml_collections.ConfigDict, device_count: int, process_count: int):
  """The dataset's info and the model of `config`, after every check that needs no compilation.

  Raises:
    validation.ConfigError: naming the field (or file) that this run cannot use.
  """
  try:
    info = input_pipeline.get_info(config.dataset)
  except (ValueError, FileNotFoundError) as e:
    message = str(e)
    raise validation.ConfigError(message if message.startswith('config.') else
                                 f'config.dataset: {message}') from None
  # Hosts that list a folder dataset differently would train on different data: all stop.
  coordination.check_same_listing(lambda: input_pipeline.folder_listing(config.dataset))
  model = build_model(config, info.num_classes)
  validation.validate_run(config, model, info, device_count, process_count)
  if config.init_checkpoint:
    pretrained.check_model(config.init_checkpoint, model)
  return info, model


def _has_checkpoints(workdir: str) -> bool:
  directory = paths.resolve(workdir) / 'checkpoints'
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (resuming from WORKDIR/checkpoints if present), evaluates, writes results.json.

  Args:
    config: an experiment config (see configs/base.py).
    workdir: where checkpoints, TensorBoard events and results.json go.

  Returns:
    The final step and evaluation metrics; 'preempted': True if a signal stopped the run
    early (after saving a checkpoint to resume from).
  """
  # A bucket that cannot be used is one line, before the dataset is read or anything written.
  buckets.check(workdir)
  unsupported = checkpointing.unsupported(workdir)
  if unsupported:
    raise buckets.BucketError(f'Workdir {workdir}: {unsupported}.')
  info, model = prepare(config, jax.device_count(), jax.process_count())
  if config.eval_only and not config.init_checkpoint and not _has_checkpoints(workdir):
    raise validation.ConfigError(
        f'config.eval_only=True: {workdir} has no checkpoint to evaluate and '
        'config.init_checkpoint is not set; train first, or point init_checkpoint at weights.')
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  with run_guard.WorkdirLock(workdir):
    return _run(config, workdir, info, model)


def _run(config, workdir, info, model) -> Dict[str, Any]:
  """train_and_evaluate after validation, holding the workdir."""
  plan = Plan(config, info)
  schedule = optimization.learning_rate_schedule(
      config, global_batch_size=plan.global_batch, steps_per_epoch=plan.steps_per_epoch,
      num_train_steps=plan.num_train_steps)
  tx = optimization.create_optimizer(config, schedule)
  mesh = train_lib.create_mesh()
  logging.info('Model %s: %s', config.model.name, model)
  logging.info('%d devices in %d processes; global batch %d; %d steps per epoch; %d steps.',
               jax.device_count(), plan.process_count, plan.global_batch,
               plan.steps_per_epoch, plan.num_train_steps)
  if jax.default_backend() == 'cpu':
    # Built here on first use (seconds), before anything is traced.
    logging.info('CPU convolutions: %s.', 'oneDNN' if onednn.available() else
                 f'XLA\'s ({onednn.unavailable_reason()})')
  for line in family.block_paths(model, mesh.devices.flat[0].platform):
    logging.info('Dense %s', line)

  start = time.perf_counter()
  state, state_shardings = train_lib.create_train_state(
      model, tx, config.seed, info.image_shape, mesh)
  jax.block_until_ready(state)
  logging.info('Initialised %d parameters in %.1f s.',
               sum(x.size for x in jax.tree.leaves(state.params)), time.perf_counter() - start)
  checkpointer = staged_checkpoints.checkpointer_for(workdir, keep=config.keep_checkpoints)
  run_info = run_description(config, model, info)
  state = _restore(checkpointer, state, plan, model, run_info, config.init_checkpoint)
  if info.class_names:  # Which class each output is, for whoever uses the trained model.
    records.write_json(paths.resolve(workdir) / 'classes.json',
                       {'classes': dict(enumerate(info.class_names))})
  start_step = int(state.step)
  p_train, p_eval = train_lib.compile_steps(model, tx, schedule, config.label_smoothing,
                                            state_shardings, mesh)

  writer = metric_writer.create(workdir, just_logging=jax.process_index() > 0)
  run_provenance = provenance.describe()
  if config.eval_only:
    eval_metrics = evaluate(p_eval, state, config, plan, mesh)
    writer.write_scalars(start_step, eval_metrics)
    records.write_results(workdir, start_step, eval_metrics, config,
                          run_provenance=run_provenance)
    checkpointer.close()
    return {'step': start_step, **eval_metrics}
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config.to_dict()))

  report_progress = periodic_actions.ReportProgress(
      num_train_steps=plan.num_train_steps, writer=writer)
  preemption = run_guard.Preemption()
  history, history_start = [], start_step
  eval_metrics: Optional[Dict[str, float]] = None
  timer = records.TrainTimer(workdir, plan.num_train_steps, plan.global_batch, run={
      'params': sum(x.size for x in jax.tree.leaves(state.params)),
      'gmacs': family.gmacs(model, info.image_shape[0], info.image_shape[-1]),
      'steps_per_epoch': plan.steps_per_epoch, 'global_batch': plan.global_batch,
      'model': model_description(model), 'provenance': run_provenance})
  timer.write(start_step)
  eval_seconds = 0.0  # Spent evaluating since the last log point: not training time.
  last_log = time.perf_counter()
  step = start_step
  batches = _train_batches(config, plan, start_step, mesh)
  try:
    while step < plan.num_train_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = p_train(state, next(batches))
      step += 1
      history.append(metrics)
      report_progress(step)
      is_last = step == plan.num_train_steps
      if step % config.log_every_steps == 0 or is_last:
        _check_finite(history, history_start)
        values = jax.device_get(history)
        now = time.perf_counter()
        summary = {f'train_{k}': float(np.mean([m[k] for m in values])) for k in values[0]}
        seconds = now - last_log - eval_seconds
        summary['steps_per_sec'] = len(values) / seconds
        summary['examples_per_sec'] = summary['steps_per_sec'] * plan.global_batch
        writer.write_scalars(step, summary)
        timer.add(step, len(values), seconds)
        history, history_start, last_log, eval_seconds = [], step, now, 0.0
      if step % plan.eval_every == 0 or is_last:
        eval_start = time.perf_counter()
        eval_metrics = evaluate(p_eval, state, config, plan, mesh)
        writer.write_scalars(step, eval_metrics)
        eval_seconds += time.perf_counter() - eval_start
      stop = preemption.should_stop(step)
      if step % config.checkpoint_every_steps == 0 or is_last or stop:
        _check_finite(history, history_start)  # Never save a state that went non-finite.
        checkpointer.save(step, state, plan.input_position(step), run_info)
      if stop and not is_last:
        writer.flush()
        logging.warning('Stopped by %s after saving step %d; run the same command to resume.',
                        preemption.reason, step)
        return {'step': step, 'preempted': True}
  finally:
    preemption.close()
    checkpointer.close()
  writer.flush()
  if eval_metrics is None:  # Resumed at the final step: evaluate what was restored.
    eval_metrics = evaluate(p_eval, state, config, plan, mesh)
  records.write_results(workdir, step, eval_metrics, config, timer)
  logging.info('Finished at step %d: %s', step, eval_metrics)
  return {'step': step, **eval_metrics}
