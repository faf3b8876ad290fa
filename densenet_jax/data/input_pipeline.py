"""Input pipeline: batches of normalised images for training and evaluation, one epoch at a time.

Three sources (data_sources.py), chosen by config.dataset.name, feed one tf.data pipeline:
  * a TFDS image classification dataset (features 'image' and 'label'), read from a data dir
    where it is already prepared; this module never lets TFDS download;
  * 'folder': a directory ROOT/<split>/<class>/*.{png,jpg,jpeg};
  * 'sklearn_digits': scikit-learn's bundled 8x8 handwritten digits, the offline quickstart.

An epoch is a pure function of (seed, epoch, process_index, process_count): the file order,
the shuffle buffer and every example's augmentation are seeded from it, the augmentation by the
example's position in the epoch. Resuming mid-epoch with skip_batches=k therefore reproduces
batches k, k+1, ... exactly, and the skipped examples are dropped before they are decoded.
(tf.data's seeded shuffles also depend on TensorFlow's global seed if a program sets one with
tf.random.set_seed; then it must set the same one when it resumes.)

Each process reads its own disjoint shard: training shards have exactly floor(N / P) examples,
so that every process runs the same number of steps; evaluation shards cover the split exactly
once and are padded to a common number of batches, the padding marked by mask=False.
"""

import dataclasses
import functools
from typing import Any, Dict, Iterator, Optional

import numpy as np
import tensorflow as tf

from densenet_jax.data import data_sources
from densenet_jax.data import preprocessing

# tf.data only needs the CPU; a TensorFlow that sees an accelerator would take its memory from JAX.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow already initialised its devices; nothing left to do.
  pass

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know of a dataset before it builds and compiles anything."""
  num_classes: int
  # Whole splits, all processes together.
  num_train_examples: int
  num_eval_examples: int
  # (height, width, channels) of the images the model receives.
  image_shape: tuple
  # Label i's class name, where the labels are made here (folder datasets); else None.
  class_names: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class _Spec:
  """config.dataset as plain, hashable values (a key for the memoised caches below)."""
  name: str
  data_dir: Optional[str]
  train_split: str
  eval_split: str
  image_size: int
  preprocess: str
  augment: bool
  mean: tuple
  std: tuple
  shuffle_buffer: int
  cache: bool


def _spec(config: Any) -> _Spec:
  """Reads and validates the fields of config.dataset that need no data."""
  if config.preprocess not in preprocessing.PREPROCESS:
    raise ValueError(f'config.dataset.preprocess={config.preprocess!r}; expected one of '
                     f'{preprocessing.PREPROCESS}.')
  size = config.image_size
  if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
    raise ValueError(f'config.dataset.image_size={size!r}; expected a positive integer.')
  mean, std = tuple(float(m) for m in config.mean), tuple(float(s) for s in config.std)
  if len(mean) != len(std) or min(std, default=0.0) <= 0:
    raise ValueError(f'config.dataset.mean={mean} and config.dataset.std={std} must have one '
                     'value per channel each, and every std must be > 0.')
  if config.shuffle_buffer <= 0:
    raise ValueError(f'config.dataset.shuffle_buffer={config.shuffle_buffer}; expected > 0.')
  return _Spec(config.name, config.data_dir, config.train_split, config.eval_split, size,
               config.preprocess, bool(config.augment), mean, std, int(config.shuffle_buffer),
               bool(config.cache))


def _source(spec: _Spec):
  source = data_sources.open_source(spec.name, spec.data_dir, spec.train_split)
  if len(spec.mean) != source.channels:
    raise ValueError(f'Dataset {spec.name!r} has {source.channels}-channel images, but '
                     f'config.dataset.mean={spec.mean} and config.dataset.std={spec.std} have '
                     f'{len(spec.mean)} value(s); give one per channel.')
  return source


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep their order: an epoch is reproducible.
  return options


def _open(spec: _Spec, split: str, field: str, index: int, count: int,
          drop_remainder: bool) -> tuple:
  """(shard, examples): examples are the decoded, cached shard with config.dataset.cache, else None.

  Decoded examples are cached in memory in a fixed order and reshuffled by the shuffle buffer
  each epoch; the dataset is memoised so that its cache outlives the epoch that filled it.
  """
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} must be in [0, process_count={count}).')
  if spec.cache:
    return _open_cached(spec, split, field, index, count, drop_remainder)
  return _source(spec).shard(split, field, index, count, drop_remainder), None


@functools.lru_cache(maxsize=4)
def _open_cached(spec, split, field, index, count, drop_remainder) -> tuple:
  shard = _source(spec).shard(split, field, index, count, drop_remainder)
  examples = shard.records(None).map(
      lambda ex: {'image': shard.decode(ex['image']), 'label': ex['label']},
      num_parallel_calls=AUTOTUNE)
  return shard, examples.cache()


def _numpy_batches(ds: tf.data.Dataset, shard: data_sources.Shard) -> Iterator[dict]:
  """Yields ds as numpy; a file that cannot be decoded is named in the error."""
  batches = ds.with_options(_options()).as_numpy_iterator()
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      unreadable = shard.find_unreadable() if shard.find_unreadable else []
      if not unreadable:
        raise
      raise ValueError(f'Cannot read or decode image file(s) {unreadable}: {e.message}') from e
    yield batch


def get_info(dataset_config: Any) -> DatasetInfo:
  """Validates config.dataset and describes the dataset, without a pass over the data.

  Call it before compiling anything: a missing or unprepared dataset, an unknown split or
  normalisation that does not fit the images fails here with an error that says what to do.

  Args:
    dataset_config: config.dataset (see configs/base.py).

  Returns:
    The DatasetInfo of the dataset.
  """
  spec = _spec(dataset_config)
  source = _source(spec)
  return DatasetInfo(
      num_classes=source.num_classes,
      num_train_examples=source.num_examples(spec.train_split, 'config.dataset.train_split'),
      num_eval_examples=source.num_examples(spec.eval_split, 'config.dataset.eval_split'),
      image_shape=(spec.image_size, spec.image_size, source.channels),
      class_names=getattr(source, 'class_names', None))


def folder_listing(dataset_config: Any) -> Optional[Dict[str, Dict[str, list]]]:
  """{split: {class: [file names]}} of a folder dataset's train and eval splits, else None."""
  spec = _spec(dataset_config)
  source = _source(spec)
  if not hasattr(source, 'files'):
    return None
  return {spec.train_split: source.files(spec.train_split, 'config.dataset.train_split'),
          spec.eval_split: source.files(spec.eval_split, 'config.dataset.eval_split')}


def _epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple:
  """Independent seeds for one process's epoch: file order, shuffle buffer, augmentation."""
  state = np.random.SeedSequence([seed % 2**64, epoch, process_index]).generate_state(4)
  return int(state[0]), int(state[1]), tf.constant(state[2:], tf.int64)


def train_iterator(dataset_config: Any, *, seed: int, local_batch_size: int, epoch: int,
                   skip_batches: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """One epoch of this process's shuffled, augmented shard of the training split.

  Every process yields num_train_examples // (local_batch_size * process_count) batches (each
  shard has floor(N / P) examples; the last partial batch is dropped).

  Args:
    dataset_config: config.dataset.
    seed: the run's seed; with epoch and process_index it fixes order and augmentation.
    local_batch_size: examples per batch of this process.
    epoch: 0-based epoch; each epoch has its own order and augmentation.
    skip_batches: batches of this epoch already trained on; they are skipped before decoding.
    process_index: this process's index, jax.process_index().
    process_count: jax.process_count().

  Returns:
    An iterator of {'image': float32 [local_batch_size, H, W, C] normalised,
    'label': int32 [local_batch_size]}.
  """
  spec = _spec(dataset_config)
  if local_batch_size <= 0 or skip_batches < 0 or epoch < 0:
    raise ValueError(f'local_batch_size={local_batch_size} must be > 0, and epoch={epoch} and '
                     f'skip_batches={skip_batches} >= 0.')
  shard, ds = _open(spec, spec.train_split, 'config.dataset.train_split', process_index,
                    process_count, drop_remainder=True)
  decoded = ds is not None
  if shard.num_examples < local_batch_size:
    raise ValueError(f'Process {process_index} has {shard.num_examples} training examples of '
                     f'{spec.name!r}, fewer than one batch of {local_batch_size}; use a smaller '
                     'config.batch_size.')
  file_seed, shuffle_seed, augment_seed = _epoch_seeds(seed, epoch, process_index)
  if not decoded:
    ds = shard.records(file_seed)
  ds = ds.shuffle(spec.shuffle_buffer, seed=shuffle_seed)
  ds = ds.skip(skip_batches * local_batch_size).enumerate(start=skip_batches * local_batch_size)
  # ImageNet's random crop can be decoded alone from a JPEG's bytes (_crop_from_encoded).
  crop_first = (spec.augment and spec.preprocess == 'imagenet' and not decoded and
                (shard.jpeg or shard.read is not None))

  def augment(position, example):
    image = example['image']
    kwargs = dict(preprocess=spec.preprocess, image_size=spec.image_size, mean=spec.mean,
                  std=spec.std)
    if crop_first:
      example_seed = tf.random.experimental.stateless_fold_in(augment_seed, position)
      return {'image': _crop_from_encoded(shard, image, example_seed, kwargs),
              'label': example['label']}
    if not decoded:
      image = shard.decode(image)
    if spec.augment:
      example_seed = tf.random.experimental.stateless_fold_in(augment_seed, position)
      image = preprocessing.train_image(image, example_seed, **kwargs)
    else:
      image = preprocessing.eval_image(image, **kwargs)
    return {'image': image, 'label': example['label']}

  ds = ds.map(augment, num_parallel_calls=AUTOTUNE)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _numpy_batches(ds, shard)


def _crop_from_encoded(shard: data_sources.Shard, record: tf.Tensor, seed: tf.Tensor,
                       kwargs: dict) -> tf.Tensor:
  """ImageNet's training view of a record, decoding only the random crop of a JPEG.

  The crop is about half of the picture, so this saves 30% of the decoding time; the output
  is the same as decoding the whole image (preprocessing.decode_jpeg_window). TFDS's JPEG
  datasets hold the bytes; a folder's records are paths, and its files that are not JPEGs are
  decoded whole.
  """
  def from_jpeg(jpeg):
    return preprocessing.train_image(jpeg, seed, jpeg=True, channels=shard.channels, **kwargs)

  if shard.jpeg:
    return from_jpeg(record)
  contents = shard.read(record)
  return tf.cond(data_sources.is_jpeg(contents), lambda: from_jpeg(contents),
                 lambda: preprocessing.train_image(shard.decode_contents(contents), seed,
                                                   **kwargs))


def num_eval_batches(info: DatasetInfo, global_eval_batch: int) -> int:
  """Batches of evaluation per process: ceil(num_eval_examples / global_eval_batch).

  A process's shard has at most ceil(N / P) examples, and ceil(ceil(N / P) / b) equals
  ceil(N / (P * b)), so every process can pad its shard to this many batches of
  b = global_eval_batch / P.
  """
  if global_eval_batch <= 0:
    raise ValueError(f'global_eval_batch={global_eval_batch} must be > 0.')
  return -(-info.num_eval_examples // global_eval_batch)


def eval_iterator(dataset_config: Any, *, local_batch_size: int, num_batches: int,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """This process's shard of the evaluation split, unaugmented, padded to num_batches batches.

  Args:
    dataset_config: config.dataset.
    local_batch_size: examples per batch of this process.
    num_batches: batches to yield, num_eval_batches(info, local_batch_size * process_count).
    process_index: this process's index, jax.process_index().
    process_count: jax.process_count().

  Returns:
    An iterator of exactly num_batches {'image': float32 [local_batch_size, H, W, C],
    'label': int32 [local_batch_size], 'mask': bool [local_batch_size]}; mask is False for
    the padding at the end, whose image and label are zeros.
  """
  spec = _spec(dataset_config)
  shard, ds = _open(spec, spec.eval_split, 'config.dataset.eval_split', process_index,
                    process_count, drop_remainder=False)
  decoded = ds is not None
  capacity = num_batches * local_batch_size
  if local_batch_size <= 0 or shard.num_examples > capacity:
    raise ValueError(f'{num_batches} batches of {local_batch_size} cannot hold the '
                     f'{shard.num_examples} evaluation examples of process {process_index}; '
                     'use num_eval_batches() for num_batches.')
  if not decoded:
    ds = shard.records(None)

  def prepare(example):
    image = example['image'] if decoded else shard.decode(example['image'])
    image = preprocessing.eval_image(image, preprocess=spec.preprocess,
                                     image_size=spec.image_size, mean=spec.mean, std=spec.std)
    return {'image': image, 'label': example['label'], 'mask': True}

  padding = {'image': tf.zeros([spec.image_size, spec.image_size, shard.channels]),
             'label': tf.constant(0, tf.int32), 'mask': False}
  ds = ds.map(prepare, num_parallel_calls=AUTOTUNE).concatenate(
      tf.data.Dataset.from_tensors(padding).repeat(capacity - shard.num_examples))
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _numpy_batches(ds, shard)
