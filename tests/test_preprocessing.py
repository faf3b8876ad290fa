"""ImageNet preprocessing's fast paths compute what the plain definitions do."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from densenet_jax.data import data_sources
from densenet_jax.data import input_pipeline
from densenet_jax.data import preprocessing

from test_input_pipeline import dataset_config


def photo(height, width, channels=3, seed=0):
  """A smooth picture with edges: JPEG's colour subsampling matters at its window's edges."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  pixels = 128 + 60 * np.sin(x[..., None] / rng.uniform(3, 9, channels) + y[..., None] / 7)
  pixels[rng.integers(0, height):, rng.integers(0, width):] += 50
  return np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('channels,options', [
    (3, dict()), (3, dict(chroma_downsampling=False)), (3, dict(progressive=True)),
    (1, dict())])
def test_decode_jpeg_window_equals_decoding_the_whole_image(channels, options):
  jpeg = tf.io.encode_jpeg(photo(75, 101, channels), quality=90, **options)
  whole = tf.io.decode_jpeg(jpeg, channels=3)
  # Offsets on and off 16-pixel block boundaries, windows reaching either edge.
  windows = [(0, 0, 75, 101), (3, 16, 40, 33), (17, 32, 58, 69), (0, 48, 20, 53), (5, 7, 9, 11)]
  windows += [tuple(preprocessing._crop_window([75, 101, 3], tf.constant([i, 0])).numpy())
              for i in range(10)]
  for y, x, h, w in windows:
    window = preprocessing.decode_jpeg_window(jpeg, tf.constant([y, x, h, w]), channels=3)
    np.testing.assert_array_equal(window, whole[y:y + h, x:x + w], err_msg=str((y, x, h, w)))


def test_folder_training_decodes_crops_to_the_same_batches(tmp_path, monkeypatch):
  for i in range(6):  # JPEGs and a PNG in one folder: the crop-first path dispatches by format.
    os.makedirs(tmp_path / 'train' / f'c{i % 2}', exist_ok=True)
    pixels = photo(40 + 3 * i, 57 - 2 * i, seed=i)
    encoded = tf.io.encode_png(pixels) if i == 4 else tf.io.encode_jpeg(pixels, quality=90)
    tf.io.write_file(str(tmp_path / 'train' / f'c{i % 2}' / f'{i}.{"png" if i == 4 else "jpg"}'),
                     encoded)
  config = dataset_config(name='folder', data_dir=str(tmp_path), eval_split='train',
                          image_size=16, shuffle_buffer=8)

  def batches():
    return list(input_pipeline.train_iterator(config, seed=3, local_batch_size=3, epoch=1))

  crop_first = batches()
  # Without `read`, training decodes every file whole, as before crops were decoded alone.
  shard = data_sources.FolderSource.shard
  monkeypatch.setattr(data_sources.FolderSource, 'shard', lambda *args: dataclasses.replace(
      shard(*args), read=None, decode_contents=None))
  whole = batches()
  assert len(crop_first) == len(whole) == 2
  for a, b in zip(crop_first, whole):
    np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.parametrize('height,width', [(75, 101), (256, 256), (300, 224), (257, 1000)])
def test_resized_center_crop_is_resize_then_crop(height, width):
  image = photo(height, width)
  shape = np.array([height, width], np.float32)
  new_shape = np.maximum(np.round(shape * np.float32(256 / min(height, width))), 256).astype(int)
  resized = tf.image.resize(preprocessing.to_float(image), new_shape, antialias=True)
  top, left = (new_shape - 224) // 2
  window = preprocessing.resized_center_crop(image, 256, 224)
  np.testing.assert_allclose(window, resized[top:top + 224, left:left + 224], atol=1e-4)


def test_normalize_is_per_channel():
  image = tf.random.stateless_uniform([5, 7, 3], [0, 1])
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  expected = (image - tf.constant(mean)) / tf.constant(std)
  np.testing.assert_array_equal(preprocessing.normalize(image, mean, std), expected)
