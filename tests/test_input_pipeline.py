"""The input pipeline: sources, sharding over processes, determinism, resumption and errors."""

import collections
import importlib.util
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax.data import data_sources
from densenet_jax.data import input_pipeline

REPO = pathlib.Path(__file__).resolve().parent.parent
CIFAR_DATA_DIR = REPO.parent / 'shared' / 'tensorflow_datasets'
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _base_dataset_config():
  spec = importlib.util.spec_from_file_location('base_config', REPO / 'configs' / 'base.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().dataset


def dataset_config(**fields):
  config = _base_dataset_config()
  for name, value in fields.items():
    setattr(config, name, value)
  return config


def digits_config(**fields):
  fields = {'name': 'sklearn_digits', 'train_split': 'train', 'eval_split': 'test',
            'image_size': 8, 'preprocess': 'cifar', 'mean': (0.3,), 'std': (0.4,), **fields}
  return dataset_config(**fields)


def digits_split(split):
  """The split as the pipeline defines it, recomputed independently: (images in [0, 1], labels)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  order = np.random.RandomState(0).permutation(len(digits.target))
  order = order[-360:] if split == 'test' else order[:-360]
  return digits.images[order] / 16.0, digits.target[order]


def unnormalise(images, config):
  return images * np.array(config.std) + np.array(config.mean)


def keys(batches, config):
  """A hashable identity per example: its unaugmented pixels (digits are all distinct) and label."""
  return [(np.round(unnormalise(image, config) * 16).astype(np.int8).tobytes(), int(label))
          for batch in batches for image, label in zip(batch['image'], batch['label'])]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


# sklearn_digits: the offline quickstart dataset.


def test_digits_info():
  info = input_pipeline.get_info(digits_config())
  assert info == input_pipeline.DatasetInfo(num_classes=10, num_train_examples=1437,
                                            num_eval_examples=360, image_shape=(8, 8, 1))
  assert input_pipeline.get_info(digits_config(image_size=16)).image_shape == (16, 16, 1)


def test_digits_train_batches_are_normalised():
  config = digits_config(augment=False)
  batches = list(input_pipeline.train_iterator(config, seed=0, local_batch_size=32, epoch=0))
  assert len(batches) == 1437 // 32
  batch = batches[0]
  assert batch['image'].shape == (32, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  # Undoing (x - mean) / std gives the original pixels: sixteenths in [0, 1].
  pixels = unnormalise(batch['image'], config) * 16
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)
  assert pixels.min() > -1e-4 and pixels.max() < 16 + 1e-4
  # An epoch visits distinct examples, and only training examples.
  train_keys = set(keys([{'image': (digits_split('train')[0][..., None] - 0.3) / 0.4,
                          'label': digits_split('train')[1]}], config))
  epoch_keys = keys(batches, config)
  assert len(set(epoch_keys)) == len(epoch_keys) and set(epoch_keys) <= train_keys


def test_digits_augmented_batches_resized():
  batch = next(input_pipeline.train_iterator(digits_config(image_size=12, preprocess='imagenet'),
                                             seed=0, local_batch_size=8, epoch=0))
  assert batch['image'].shape == (8, 12, 12, 1) and np.isfinite(batch['image']).all()


def test_digits_epoch_determinism():
  config = digits_config()

  def epoch(e, seed=0):
    return list(input_pipeline.train_iterator(config, seed=seed, local_batch_size=64, epoch=e))

  first = epoch(0)
  assert_same_batches(first, epoch(0))
  for other in (epoch(1), epoch(0, seed=1)):
    assert not np.array_equal(first[0]['label'], other[0]['label'])


@pytest.mark.parametrize('cache', [False, True])
def test_digits_skip_batches_resumes_the_epoch(cache):
  config = digits_config(cache=cache)
  full = list(input_pipeline.train_iterator(config, seed=3, local_batch_size=50, epoch=2))
  resumed = list(input_pipeline.train_iterator(config, seed=3, local_batch_size=50, epoch=2,
                                               skip_batches=5))
  assert len(full) == 1437 // 50
  assert_same_batches(full[5:], resumed)


def test_digits_processes_read_disjoint_examples():
  config = digits_config(augment=False)
  per_process = [
      list(input_pipeline.train_iterator(config, seed=0, local_batch_size=16, epoch=0,
                                         process_index=i, process_count=2)) for i in range(2)]
  assert [len(b) for b in per_process] == [1437 // (16 * 2)] * 2
  first, second = (set(keys(batches, config)) for batches in per_process)
  assert not first & second


@pytest.mark.parametrize('process_count', [1, 2])
def test_digits_eval_covers_every_example_once(process_count):
  config = digits_config()
  info = input_pipeline.get_info(config)
  local_batch = 64
  num_batches = input_pipeline.num_eval_batches(info, local_batch * process_count)
  batches = []
  for index in range(process_count):
    shard = list(input_pipeline.eval_iterator(config, local_batch_size=local_batch,
                                              num_batches=num_batches, process_index=index,
                                              process_count=process_count))
    assert len(shard) == num_batches
    batches += shard
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.dtype == np.bool_ and mask.sum() == info.num_eval_examples
  images = np.concatenate([b['image'] for b in batches])[mask]
  labels = np.concatenate([b['label'] for b in batches])[mask]
  want_images, want_labels = digits_split('test')
  assert collections.Counter(labels.tolist()) == collections.Counter(want_labels.tolist())
  # Unaugmented and covering each test digit once.
  got = sorted(keys([{'image': images, 'label': labels}], config))
  want = sorted(keys([{'image': (want_images[..., None] - 0.3) / 0.4, 'label': want_labels}],
                     config))
  assert got == want


# The real CIFAR-10, prepared in TFDS format next to the repository.

needs_cifar = pytest.mark.skipif(not (CIFAR_DATA_DIR / 'cifar10').is_dir(),
                                 reason=f'no prepared CIFAR-10 in {CIFAR_DATA_DIR}')


def cifar_config(**fields):
  fields = {'name': 'cifar10', 'data_dir': str(CIFAR_DATA_DIR), 'eval_split': 'test',
            'image_size': 32, 'preprocess': 'cifar', 'mean': CIFAR_MEAN, 'std': CIFAR_STD,
            'shuffle_buffer': 1024, **fields}
  return dataset_config(**fields)


@needs_cifar
def test_cifar10_train_and_eval():
  config = cifar_config()
  info = input_pipeline.get_info(config)
  assert info == input_pipeline.DatasetInfo(10, 50_000, 10_000, (32, 32, 3))

  def first_batches():
    batches = input_pipeline.train_iterator(config, seed=0, local_batch_size=128, epoch=0)
    return [next(batches), next(batches)]

  batches = first_batches()
  assert batches[0]['image'].shape == (128, 32, 32, 3)
  assert batches[0]['label'].shape == (128,)
  assert_same_batches(batches, first_batches())
  images = np.concatenate([b['image'] for b in batches])
  # Normalised with CIFAR-10's statistics; the mean-coloured padding pulls the mean to 0.
  assert np.all(np.abs(images.mean(axis=(0, 1, 2))) < 0.25)
  assert np.all(np.abs(images.std(axis=(0, 1, 2)) - 1) < 0.25)

  num_batches = input_pipeline.num_eval_batches(info, 100)
  assert num_batches == 100
  batch = next(input_pipeline.eval_iterator(config, local_batch_size=100, num_batches=num_batches))
  assert batch['mask'].all()
  raw = tfds.builder('cifar10', data_dir=str(CIFAR_DATA_DIR)).as_dataset(split='test[:100]')
  raw = next(raw.batch(100).as_numpy_iterator())
  np.testing.assert_allclose(unnormalise(batch['image'], config), raw['image'] / 255, atol=1e-5)
  np.testing.assert_array_equal(batch['label'], raw['label'])


@needs_cifar
def test_cifar10_processes_share_a_subsplit():
  config = cifar_config(train_split='train[:1000]', eval_split='test[:250]', augment=False)
  assert input_pipeline.get_info(config).num_train_examples == 1000
  seen = []
  for index in range(3):
    batches = list(input_pipeline.train_iterator(config, seed=0, local_batch_size=50, epoch=0,
                                                 process_index=index, process_count=3))
    assert len(batches) == 1000 // (50 * 3)
    seen += [image.tobytes() for batch in batches for image in batch['image']]
  assert len(set(seen)) == len(seen)
  num_batches = input_pipeline.num_eval_batches(input_pipeline.get_info(config), 2 * 64)
  masks = [batch['mask'] for index in range(2) for batch in input_pipeline.eval_iterator(
      config, local_batch_size=64, num_batches=num_batches, process_index=index, process_count=2)]
  assert len(masks) == 2 * num_batches and np.concatenate(masks).sum() == 250


# TFDS's mock of imagenet2012: random JPEGs of random sizes, nothing downloaded.


def write_mock_metadata(data_dir, name, split_sizes):
  """Writes the dataset_info.json a prepared dataset has, so that the builder counts as prepared."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0,
                          filename_template=tfds.core.ShardedFileTemplate(
                              data_dir=builder.data_path, dataset_name=name, split=split,
                              filetype_suffix='tfrecord'))
      for split, n in split_sizes.items()]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


def test_imagenet2012_mock(tmp_path):
  write_mock_metadata(str(tmp_path), 'imagenet2012', {'train': 16, 'validation': 16})
  config = dataset_config(data_dir=str(tmp_path), image_size=64, shuffle_buffer=16)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path)):
    info = input_pipeline.get_info(config)
    assert info == input_pipeline.DatasetInfo(1000, 16, 16, (64, 64, 3))
    train = list(input_pipeline.train_iterator(config, seed=0, local_batch_size=8, epoch=0))
    evaluation = list(input_pipeline.eval_iterator(config, local_batch_size=8, num_batches=2))
  assert len(train) == 2 and len(evaluation) == 2
  for batch in train + evaluation:
    assert batch['image'].shape == (8, 64, 64, 3) and np.isfinite(batch['image']).all()
    assert batch['label'].shape == (8,) and (0 <= batch['label']).all()
  assert all(batch['mask'].all() for batch in evaluation)


# 'folder': ROOT/<split>/<class>/*.png.


def make_folder(root, counts, size=(10, 12)):
  """Writes `counts[split][class]` random PNGs; returns the root."""
  rng = np.random.default_rng(0)
  for split, classes in counts.items():
    for name, n in classes.items():
      os.makedirs(root / split / name)
      for i in range(n):
        pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        tf.io.write_file(str(root / split / name / f'{i}.png'), tf.io.encode_png(pixels))
  return root


def folder_config(root, **fields):
  fields = {'name': 'folder', 'data_dir': str(root), 'eval_split': 'test', 'image_size': 8,
            'preprocess': 'cifar', **fields}
  return dataset_config(**fields)


def test_folder(tmp_path):
  root = make_folder(tmp_path / 'images', {'train': {'cat': 5, 'dog': 4, 'emu': 3},
                                           'test': {'cat': 2, 'emu': 1}})
  config = folder_config(root)
  info = input_pipeline.get_info(config)
  assert info == input_pipeline.DatasetInfo(3, 12, 3, (8, 8, 3), ('cat', 'dog', 'emu'))
  train = list(input_pipeline.train_iterator(config, seed=0, local_batch_size=4, epoch=0))
  assert len(train) == 3 and train[0]['image'].shape == (4, 8, 8, 3)
  assert sorted(np.concatenate([b['label'] for b in train])) == [0] * 5 + [1] * 4 + [2] * 3
  evaluation = list(input_pipeline.eval_iterator(config, local_batch_size=2, num_batches=2))
  labels = np.concatenate([b['label'] for b in evaluation])
  mask = np.concatenate([b['mask'] for b in evaluation])
  assert mask.tolist() == [True] * 3 + [False] and sorted(labels[mask]) == [0, 0, 2]


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.*ROOT/<split>/<class>'):
    input_pipeline.get_info(folder_config(tmp_path / 'missing'))
  root = make_folder(tmp_path / 'extra', {'train': {'cat': 1}, 'test': {'cow': 1}})
  with pytest.raises(ValueError, match=r"classes \['cow'\]"):
    input_pipeline.get_info(folder_config(root))
  root = make_folder(tmp_path / 'images', {'train': {'cat': 3, 'dog': 3}, 'test': {'cat': 1}})
  corrupt = root / 'train' / 'dog' / '1.png'
  corrupt.write_bytes(b'not an image')
  config = folder_config(root)
  with pytest.raises(ValueError, match=f'Cannot read or decode.*{corrupt}'):
    list(input_pipeline.train_iterator(config, seed=0, local_batch_size=2, epoch=0))


def test_folder_layout_errors_name_the_folders(tmp_path):
  root = make_folder(tmp_path / 'empty', {'train': {'cat': 2, 'dog': 0, 'emu': 0},
                                          'test': {'cat': 1}})
  (root / 'train' / 'emu' / 'notes.txt').write_text('not an image')
  with pytest.raises(ValueError, match=r"class folders without a .png/.jpg/.jpeg image: "
                                       r"\['.*train/dog', '.*train/emu'\]"):
    input_pipeline.get_info(folder_config(root))
  root = make_folder(tmp_path / 'nested', {'train': {'cat': 2, 'dog': 2}, 'test': {'cat': 1}})
  os.makedirs(root / 'train' / 'dog' / 'puppies')
  with pytest.raises(ValueError, match=r"class folders holding folders.*train/dog'\]"):
    input_pipeline.get_info(folder_config(root))


def test_folder_non_utf8_names_and_oversized_images(tmp_path, monkeypatch):
  root = make_folder(tmp_path / 'images', {'train': {'cat': 2, 'dog': 2}, 'test': {'cat': 1}})
  odd = os.path.join(os.fsencode(root / 'train' / 'cat'), b'caf\xe9.png')
  with open(odd, 'wb') as f:
    f.write((root / 'train' / 'cat' / '0.png').read_bytes())
  config = folder_config(root)
  info = input_pipeline.get_info(config)
  assert info.num_train_examples == 5
  batches = list(input_pipeline.train_iterator(config, seed=0, local_batch_size=5, epoch=0))
  assert batches[0]['image'].shape == (5, 8, 8, 3)
  # Images are 10x12 = 120 pixels: over a limit of 100 they are refused, by name.
  monkeypatch.setattr(data_sources, 'MAX_PIXELS', 100)
  with pytest.raises(ValueError, match=r"(?s)Cannot read or decode.*caf\\\\xe9.png.*larger than "
                                       r"data_sources.MAX_PIXELS=100"):
    list(input_pipeline.train_iterator(config, seed=1, local_batch_size=5, epoch=0))


# get_info's errors.


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match=r"(?s)cifar11.*'sklearn_digits'.*'folder'.*cifar10"):
    input_pipeline.get_info(dataset_config(name='cifar11'))


def test_unprepared_dataset_fails_fast(tmp_path, monkeypatch):
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.get_info(dataset_config(name='cifar100', data_dir=str(tmp_path)))
  message = str(error.value)
  assert str(tmp_path) in message and 'TFDS_DATA_DIR' in message
  assert f'tfds build cifar100 --data_dir={tmp_path}' in message
  with pytest.raises(FileNotFoundError, match='downloads/manual'):
    input_pipeline.get_info(dataset_config(name='imagenet2012', data_dir=str(tmp_path)))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'env'))
  with pytest.raises(FileNotFoundError, match=r'env.*from \$TFDS_DATA_DIR'):
    input_pipeline.get_info(dataset_config(name='cifar100'))


@needs_cifar
def test_bad_split_lists_the_splits():
  with pytest.raises(ValueError, match=r"eval_split='validation'.*\['train', 'test'\]"):
    input_pipeline.get_info(cifar_config(eval_split='validation'))


@pytest.mark.parametrize('fields, match', [
    ({'eval_split': 'validation'}, r"eval_split='validation'.*\['test', 'train'\]"),
    ({'preprocess': 'vgg'}, 'preprocess'),
    ({'image_size': 0}, 'image_size'),
    ({'std': (0.0,)}, 'std'),
    ({'mean': (0.1, 0.2, 0.3), 'std': (1.0, 1.0, 1.0)}, '1-channel'),
])
def test_config_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    input_pipeline.get_info(digits_config(**fields))
