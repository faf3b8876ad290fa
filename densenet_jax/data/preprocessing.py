"""Image preprocessing: the paper's training augmentations and the evaluation crops.

Every function works on one image, `[height, width, channels]`, inside a tf.data map. Images
arrive as uint8 (0..255) or as float32 already scaled to [0, 1]; all leave as float32
`[image_size, image_size, channels]`, normalised per channel as (x - mean) / std.

Randomness is stateless: a training function takes `seed`, a `[2]` integer tensor, and returns
the same crop and flip for the same seed, on any machine and in any order of evaluation. The
input pipeline derives that seed from the run's seed, the epoch and the example's position in
the epoch, which is what makes a resumed epoch reproduce the interrupted one exactly.
"""

from typing import Sequence

import tensorflow as tf

# Names accepted by config.dataset.preprocess.
PREPROCESS = ('imagenet', 'cifar')

# The "+" augmentation of the paper's CIFAR and SVHN experiments pads 4 pixels on each side.
CIFAR_PADDING = 4

# ImageNet evaluation resizes the shorter side to 256 for a 224 crop; other sizes keep the ratio.
IMAGENET_RESIZE_RATIO = 256 / 224

# Inception-style random resized crop (Szegedy et al. 2015), as torchvision's defaults.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_MAX_ATTEMPTS = 10


def to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 0..255 becomes float32 0..1; float images are taken to be in [0, 1] already."""
  return tf.image.convert_image_dtype(image, tf.float32)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """(x - mean) / std per channel, for a float image `[height, width, channels]` in [0, 1].

  The same arithmetic, bit for bit, on rows `[height, width * channels]` with the constants
  tiled along a row: TensorFlow's CPU kernels broadcast a `[channels]` vector over the innermost
  axis several times slower, and at ImageNet's sizes that was a large part of the augmentation.
  """
  shape = tf.shape(image)
  rows = tf.reshape(image, [shape[0], -1])
  mean = tf.tile(tf.constant(mean, tf.float32), [shape[1]])
  std = tf.tile(tf.constant(std, tf.float32), [shape[1]])
  return tf.reshape((rows - mean) / std, shape)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Resizes to image_size x image_size unless the image has that size already.

  Antialiasing makes downscaling average over the source pixels (as PIL does) instead of
  sampling a few of them, which would alias fine textures.
  """
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return to_float(image)
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
  return tf.cond(
      same,
      lambda: to_float(image),
      lambda: tf.image.resize(to_float(image), [image_size, image_size], antialias=True))


def resized_center_crop(image: tf.Tensor, shorter_side: int, size: int) -> tf.Tensor:
  """The central size x size window of the image resized, aspect ratio kept, so that its shorter
  side has `shorter_side` pixels (antialiased as tf.image.resize, which calls the same op).

  Only the window's pixels are computed: the op's translation shifts the output grid to the
  window instead of the whole resized image. The result equals resizing the whole image and
  cropping it up to float rounding of the sample positions ((x + top + 0.5) / scale against
  (x + 0.5) / scale + top / scale): below 1e-4 for pixels in [0, 1] in our checks, where one
  step of an 8-bit pixel is 4e-3.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  new_shape = tf.cast(tf.round(shape * (shorter_side / tf.reduce_min(shape))), tf.int32)
  # Rounding must not leave the shorter side a pixel short of the crop.
  new_shape = tf.maximum(new_shape, shorter_side)
  offset = (new_shape - size) // 2
  window = tf.raw_ops.ScaleAndTranslate(
      images=to_float(image)[None], size=tf.constant([size, size]),
      scale=tf.cast(new_shape, tf.float32) / shape,  # As tf.image.resize computes it.
      translation=-tf.cast(offset, tf.float32), kernel_type='triangle', antialias=True)
  return window[0]


def _crop_window(image_shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Samples an Inception-style crop: `[offset_y, offset_x, height, width]`.

  If no window of the allowed area and aspect ratio is found in CROP_MAX_ATTEMPTS tries (it
  happens for extreme aspect ratios), the op returns the whole image.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed,
      # The area range alone bounds the crop; the default of 0.1 would raise its minimum.
      min_object_covered=0.0,
      aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
      area_range=CROP_AREA_RANGE,
      max_attempts=CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
  """A random crop of 8% to 100% of the area, resized to image_size x image_size."""
  window = _crop_window(tf.shape(image), seed)
  crop = image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
  return tf.image.resize(to_float(crop), [image_size, image_size], antialias=True)


def decode_jpeg_window(jpeg: tf.Tensor, window: tf.Tensor, channels: int) -> tf.Tensor:
  """The pixels of `window`, `[offset_y, offset_x, height, width]`, of an encoded JPEG, equal bit
  for bit to decoding the whole image and slicing it.

  libjpeg-turbo decodes only the window's rows and blocks, but upsamples subsampled colour at the
  window's left and right edges without the neighbouring columns, which changes the colour of
  the edge column (by up to 16 of 255 in our files). Decoding one column more on each side, where
  the image has one, and dropping it restores the whole decode's pixels (checked for 4:2:0,
  4:2:2, 4:4:4, progressive, grayscale and CMYK files).
  """
  width = tf.image.extract_jpeg_shape(jpeg)[1]
  left = tf.minimum(window[1], 1)
  right = tf.minimum(width - window[1] - window[3], 1)
  wider = window + tf.stack([0, -left, 0, left + right])
  pixels = tf.image.decode_and_crop_jpeg(jpeg, wider, channels=channels)
  return pixels[:, left:left + window[3]]


def random_resized_crop_jpeg(jpeg: tf.Tensor, seed: tf.Tensor, image_size: int,
                             channels: int) -> tf.Tensor:
  """As random_resized_crop, but decodes only the crop of an encoded JPEG.

  The crop is a fraction of the picture, so decoding only it saves much of the JPEG's decoding
  time. The window is sampled from the header's shape exactly as from a decoded image, and
  decode_jpeg_window decodes its pixels exactly, so both paths give the same result for the same
  seed.
  """
  window = _crop_window(tf.image.extract_jpeg_shape(jpeg), seed)
  crop = decode_jpeg_window(jpeg, window, channels)
  return tf.image.resize(to_float(crop), [image_size, image_size], antialias=True)


def _cifar_pad_crop(image: tf.Tensor, seed: tf.Tensor, image_size: int,
                    channels: int) -> tf.Tensor:
  """Pads CIFAR_PADDING zeros on each side and takes a random image_size crop."""
  pad = CIFAR_PADDING
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, [image_size, image_size, channels], seed)


def eval_image(image: tf.Tensor, *, preprocess: str, image_size: int, mean: Sequence[float],
               std: Sequence[float]) -> tf.Tensor:
  """The deterministic evaluation view of an image (also training's when augment is False).

  Args:
    image: `[height, width, channels]`, uint8 or float32 in [0, 1].
    preprocess: 'imagenet' (resize the shorter side to image_size * 256 / 224, then center crop)
      or 'cifar' (the image as it is, resized only if its size differs).
    image_size: side of the square output.
    mean: per-channel mean of pixels in [0, 1].
    std: per-channel standard deviation of pixels in [0, 1].

  Returns:
    float32 `[image_size, image_size, channels]`, normalised.
  """
  channels = image.shape[-1]
  if preprocess == 'imagenet':
    image = resized_center_crop(image, round(image_size * IMAGENET_RESIZE_RATIO), image_size)
  else:
    image = resize(image, image_size)
  image = normalize(image, mean, std)
  return tf.ensure_shape(image, [image_size, image_size, channels])


def train_image(image: tf.Tensor, seed: tf.Tensor, *, preprocess: str, image_size: int,
                mean: Sequence[float], std: Sequence[float], jpeg: bool = False,
                channels: int = 3) -> tf.Tensor:
  """The randomly augmented training view of an image.

  'imagenet': random resized crop and horizontal flip. 'cifar': the paper's "+" augmentation,
  a 4-pixel pad, random crop and horizontal flip. CIFAR images are padded *after*
  normalisation, so the padding is the mean colour rather than black: the paper's Torch code
  (fb.resnet.torch's transforms) normalises before its zero-padded RandomCrop, and the zeros
  then carry no signal the network could learn the border from.

  Args:
    image: `[height, width, channels]`, uint8 or float32 in [0, 1]; with jpeg=True, a scalar
      string holding an encoded JPEG (only for 'imagenet', which then decodes just the crop).
    seed: `[2]` integer tensor; the same seed gives the same augmentation.
    preprocess: 'imagenet' or 'cifar'.
    image_size: side of the square output.
    mean: per-channel mean of pixels in [0, 1].
    std: per-channel standard deviation of pixels in [0, 1].
    jpeg: whether `image` is an encoded JPEG.
    channels: channels to decode a JPEG to (ignored otherwise).

  Returns:
    float32 `[image_size, image_size, channels]`, normalised.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if preprocess == 'imagenet':
    if jpeg:
      image = random_resized_crop_jpeg(image, crop_seed, image_size, channels)
    else:
      channels = image.shape[-1]
      image = random_resized_crop(image, crop_seed, image_size)
    image = normalize(image, mean, std)
  else:
    channels = image.shape[-1]
    image = normalize(resize(image, image_size), mean, std)
    image = _cifar_pad_crop(image, crop_seed, image_size, channels)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return tf.ensure_shape(image, [image_size, image_size, channels])
