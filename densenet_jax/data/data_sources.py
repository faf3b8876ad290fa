"""Where the images come from: TFDS, a folder of image files, or scikit-learn's digits.

A source knows a dataset's classes, channels and split sizes without reading the data, and cuts
a split into one process's shard of still encoded records; input_pipeline shuffles, decodes,
augments and batches them. Errors name the config field or path at fault and say what to do.
"""

import dataclasses
import difflib
import functools
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax.runtime import paths

FOLDER_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Larger images are refused before decoding (a small file can declare a huge image that would
# take all memory to decode): PIL's limit for decompression bombs, 89.5 megapixels.
MAX_PIXELS = 89_478_485
FOLDER_LAYOUT = 'ROOT/<split>/<class>/*.{png,jpg,jpeg}, e.g. ROOT/train/cat/0001.png'
DIGITS_TEST_EXAMPLES = 360


@dataclasses.dataclass(frozen=True)
class Shard:
  """One process's part of one split.

  `records(shuffle_seed)` gives dicts of a still encoded 'image' and an int32 'label', in a fixed
  order for shuffle_seed=None, else in a file order drawn from it; `decode` turns a record's
  image into `[height, width, channels]` pixels (uint8, or float32 in [0, 1]).
  """
  num_examples: int
  channels: int
  records: Callable[[Optional[int]], tf.data.Dataset]
  decode: Callable[[tf.Tensor], tf.Tensor]
  # Records hold JPEGs that preprocessing can decode only the random crop of.
  jpeg: bool = False
  # Folder only, where records are paths: a record's file contents, checked against MAX_PIXELS,
  # and their decoding. With them, training decodes only the random crop of the files that are
  # JPEGs (is_jpeg), and the others whole.
  read: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
  decode_contents: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
  # Paths of the shard's files that cannot be read or decoded (folder only), to name them.
  find_unreadable: Optional[Callable[[], list]] = None


def _in_memory_shard(images: np.ndarray, labels: np.ndarray, channels: int, index: int,
                     count: int, drop_remainder: bool,
                     decode: Callable[[tf.Tensor], tf.Tensor] = lambda image: image,
                     find_unreadable: Optional[Callable[[np.ndarray], list]] = None) -> Shard:
  """A contiguous shard of arrays (pixels or file paths), as tfds.split_for_jax_process cuts."""
  n = len(labels)
  if drop_remainder:
    start, stop = index * (n // count), (index + 1) * (n // count)
  else:  # The first n % count processes take one example more.
    start = index * (n // count) + min(index, n % count)
    stop = start + n // count + (index < n % count)
  images, labels = images[start:stop], labels[start:stop]

  def records(shuffle_seed):
    order = np.arange(len(labels))
    if shuffle_seed is not None:  # The whole shard is in memory: shuffle all of it.
      order = np.random.default_rng(shuffle_seed).permutation(order)
    return tf.data.Dataset.from_tensor_slices({'image': images[order], 'label': labels[order]})

  unreadable = functools.partial(find_unreadable, images) if find_unreadable else None
  return Shard(stop - start, channels, records, decode, find_unreadable=unreadable)


class DigitsSource:
  """scikit-learn's 1797 handwritten digits, 8x8 grayscale; bundled, so nothing is downloaded."""
  channels, num_classes = 1, 10

  @staticmethod
  @functools.cache
  def _splits() -> dict:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top  (only this source)
    digits = datasets.load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # 0..16 -> [0, 1]
    labels = digits.target.astype(np.int32)
    # A fixed split: the same 360 test digits for every run and every version of this code.
    order = np.random.RandomState(0).permutation(len(labels))
    train, test = order[:-DIGITS_TEST_EXAMPLES], order[-DIGITS_TEST_EXAMPLES:]
    return {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}

  def _split(self, split: str, field: str) -> tuple:
    splits = self._splits()
    if split not in splits:
      raise ValueError(f"{field}={split!r} is not a split of 'sklearn_digits'; available: "
                       f'{sorted(splits)}.')
    return splits[split]

  def num_examples(self, split: str, field: str) -> int:
    return len(self._split(split, field)[1])

  def shard(self, split: str, field: str, index: int, count: int,
            drop_remainder: bool) -> Shard:
    images, labels = self._split(split, field)
    return _in_memory_shard(images, labels, 1, index, count, drop_remainder)


# The folder dataset's paths, local or gs://, go through the package's file layer.
def _join(directory: str, name: str) -> str:
  return os.fspath(paths.Path(directory) / name)


def _isdir(directory: str) -> bool:
  return paths.Path(directory).is_dir()


def _image_files(directory: str) -> list:
  return sorted(os.fspath(p) for p in paths.Path(directory).iterdir()
                if p.name.lower().endswith(FOLDER_EXTENSIONS) and not p.name.startswith('.'))


def _subdirs(directory: str) -> list:
  # Hidden directories (.ipynb_checkpoints, ...) are not classes.
  return sorted(p.name for p in paths.Path(directory).iterdir()
                if not p.name.startswith('.') and p.is_dir())



def display_path(path) -> str:
  """A path as text that can always be printed (file names need not be UTF-8)."""
  return os.fsencode(path).decode('utf-8', 'backslashreplace')


def _check_subdirs(directory: str, classes) -> None:
  """Class folders with no image, or with folders inside (not read), are errors naming them."""
  empty, nested = [], []
  for name in classes:
    path = _join(directory, name)
    if not _isdir(path):
      continue
    if _subdirs(path):
      nested.append(display_path(path))
    if not _image_files(path):
      empty.append(display_path(path))
  problems = []
  if empty:
    problems.append(f'class folders without a {"/".join(FOLDER_EXTENSIONS)} image: {empty}')
  if nested:
    problems.append(f'class folders holding folders, which are not read (the layout is one '
                    f'folder per class, images directly inside): {nested}')
  if problems:
    raise ValueError(f'{display_path(directory)}: ' + '; '.join(problems) + '.')


@functools.lru_cache(maxsize=8)
def _folder_listing(root: str, train_split: str, split: str, field: str) -> tuple:
  """(classes, paths, labels) of ROOT/split; listed once per process, as it may take long."""
  layout = (f'The folder dataset (config.dataset.data_dir={root}) must be laid out as '
            f'{FOLDER_LAYOUT}.')
  directory = _join(root, split)
  if not _isdir(directory):
    raise FileNotFoundError(f'{field}={split!r}: no directory {directory}. {layout}')
  classes = _subdirs(_join(root, train_split))
  unknown = sorted(set(_subdirs(directory)) - set(classes))
  if unknown:
    raise ValueError(f'{directory} has classes {unknown} that the training split '
                     f'{_join(root, train_split)} does not have; the classes are the '
                     'subdirectories of the training split, and evaluation may only use them.')
  if not classes:
    raise FileNotFoundError(f'No class folders in {display_path(_join(root, train_split))}. '
                            f'{layout}')
  _check_subdirs(directory, classes)
  paths, labels = [], []
  for label, name in enumerate(classes):
    if _isdir(_join(directory, name)):
      files = _image_files(_join(directory, name))
      paths += [os.fsencode(f) for f in files]  # Bytes: names need not be valid UTF-8.
      labels += [label] * len(files)
  if not paths:
    raise FileNotFoundError(f'No images (*.png, *.jpg, *.jpeg) in class subdirectories of '
                            f'{directory}. {layout}')
  return tuple(classes), np.array(paths), np.array(labels, np.int32)


def _declared_pixels(contents: tf.Tensor) -> tf.Tensor:
  """Height x width that a PNG's or JPEG's header declares (0 for other formats), read
  without decoding."""
  def png():
    # IHDR: width and height, big-endian, at most 2^31 - 1 each (the PNG specification).
    size = tf.io.decode_raw(tf.strings.substr(contents, 16, 8), tf.int32, little_endian=False)
    return tf.cast(size[0], tf.int64) * tf.cast(size[1], tf.int64)

  def jpeg():
    shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
    return shape[0] * shape[1]

  magic = tf.strings.substr(contents, 0, 4)
  return tf.case([(tf.equal(magic, b'\x89PNG'), png),
                  (tf.equal(tf.strings.substr(magic, 0, 2), b'\xff\xd8'), jpeg)],
                 default=lambda: tf.constant(0, tf.int64))


def _read_remote(path: tf.Tensor) -> bytes:
  return paths.Path(path.numpy().decode()).read_bytes()


def _read_file(path: tf.Tensor) -> tf.Tensor:
  """The bytes of the file at `path`: TensorFlow reads local files, the package's file layer
  (paths.py) object-store ones, whose TensorFlow client cannot be pointed at an emulator."""
  return tf.cond(tf.strings.regex_full_match(path, '[a-z][a-z0-9+.-]*://.*'),
                 lambda: tf.reshape(tf.py_function(_read_remote, [path], tf.string), []),
                 lambda: tf.io.read_file(path))


def is_jpeg(contents: tf.Tensor) -> tf.Tensor:
  """Whether encoded image bytes are a JPEG, by the magic number tf.io.decode_image reads."""
  return tf.equal(tf.strings.substr(contents, 0, 3), b'\xff\xd8\xff')


def _read_checked(path: tf.Tensor) -> tf.Tensor:
  """The file's contents, once its header is known to declare at most MAX_PIXELS pixels."""
  contents = _read_file(path)
  check = tf.debugging.assert_less_equal(
      _declared_pixels(contents), tf.constant(MAX_PIXELS, tf.int64),
      message=f'image larger than data_sources.MAX_PIXELS={MAX_PIXELS} pixels (a '
      'decompression bomb?), refused before decoding')
  with tf.control_dependencies([check]):
    return tf.identity(contents)


def _decode_contents(contents: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_image(contents, channels=3, expand_animations=False)


def _decode_file(path: tf.Tensor) -> tf.Tensor:
  return _decode_contents(_read_checked(path))


def _unreadable_files(paths: np.ndarray) -> list:
  """The paths among `paths` that cannot be read or decoded.

  A decoding error inside tf.data carries TensorFlow's message but not the file's name. When one
  occurs, this second pass decodes every file of the shard in a pipeline that drops failing
  elements (`ignore_errors`); the indices missing from its output name the culprits.
  """
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
  ds = ds.map(lambda i, path: (i, tf.shape(_decode_file(path))),
              num_parallel_calls=tf.data.AUTOTUNE)
  readable = {int(i) for i, _ in ds.ignore_errors().as_numpy_iterator()}
  return [display_path(p) for i, p in enumerate(paths) if i not in readable]


class FolderSource:
  """Images in ROOT/<split>/<class>/; the classes are the sorted subdirectories of the train split.

  Images are decoded by tf.io.decode_image to 3 channels (grayscale and RGBA files included).
  A file that cannot be read or decoded stops the pipeline with an error naming it: see
  _unreadable_files for how it is found.
  """
  channels = 3

  def __init__(self, root: Optional[str], train_split: str):
    if not root:
      raise ValueError("config.dataset.name='folder' needs config.dataset.data_dir: the "
                       f'directory ROOT of {FOLDER_LAYOUT}.')
    if not _isdir(root):
      raise FileNotFoundError(f'config.dataset.data_dir={root}: no such directory. The folder '
                              f'dataset must be laid out as {FOLDER_LAYOUT}.')
    self._root, self._train_split = root, train_split
    self.class_names = self._listing(train_split, 'config.dataset.train_split')[0]
    self.num_classes = len(self.class_names)

  def _listing(self, split: str, field: str) -> tuple:
    return _folder_listing(self._root, self._train_split, split, field)

  def num_examples(self, split: str, field: str) -> int:
    return len(self._listing(split, field)[2])

  def files(self, split: str, field: str) -> dict:
    """{class: [file names]} of a split, names relative to the class folder, in label order."""
    classes, paths, labels = self._listing(split, field)
    names = {name: [] for name in classes}
    for path, label in zip(paths, labels):
      names[classes[label]].append(display_path(os.path.basename(path)))
    return names

  def shard(self, split: str, field: str, index: int, count: int,
            drop_remainder: bool) -> Shard:
    _, paths, labels = self._listing(split, field)
    if drop_remainder:
      # Files are listed class by class; a fixed mix spreads the classes over the shards.
      order = np.random.RandomState(0).permutation(len(labels))
      paths, labels = paths[order], labels[order]
    shard = _in_memory_shard(paths, labels, 3, index, count, drop_remainder, _decode_file,
                             _unreadable_files)
    return dataclasses.replace(shard, read=_read_checked, decode_contents=_decode_contents)


def _tfds_builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The builder of a prepared TFDS dataset; errors say how to prepare it."""
  origin = 'config.dataset.data_dir'
  if not data_dir:
    # Read here, not at TFDS's import, so that the variable may be set after importing TFDS.
    data_dir, origin = os.environ.get('TFDS_DATA_DIR') or None, '$TFDS_DATA_DIR'
    if not data_dir:
      origin = "TFDS's default, as neither config.dataset.data_dir nor $TFDS_DATA_DIR is set"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    known = tfds.list_builders(with_community_datasets=False) + ['folder', 'sklearn_digits']
    close = difflib.get_close_matches(name, known, n=3)
    raise ValueError(
        f"config.dataset.name={name!r} is unknown. Accepted: 'sklearn_digits' (bundled with "
        "scikit-learn), 'folder' (images in config.dataset.data_dir laid out as "
        f"{FOLDER_LAYOUT}), or a TFDS image classification dataset such as 'cifar10', "
        "'cifar100', 'svhn_cropped' or 'imagenet2012' (tfds.list_builders() lists them)."
        + (f' Did you mean {close}?' if close else '')) from e
  if not builder.is_prepared():
    path = builder.data_path  # ROOT/name[/config]/version
    root = path.parents[2 if builder.builder_config else 1]
    found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
    how = f'`tfds build {name} --data_dir={root}` on a machine with network access'
    if name.startswith('imagenet2012'):
      how = ('placing ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) '
             f'in {root}/downloads/manual and running `tfds build {name} --data_dir={root}`')
    raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in {root} (data dir from {origin}): no {path}'
        + (f' (found versions {found} there)' if found else '') + '. This pipeline never '
        f'downloads. Prepare it by {how}, or point $TFDS_DATA_DIR or '
        '--config.dataset.data_dir at a directory that holds a prepared copy.')
  return builder


class TfdsSource:
  """A prepared TFDS dataset with an 'image' and a 'label' (ClassLabel) feature."""

  def __init__(self, name: str, data_dir: Optional[str]):
    self._builder = builder = _tfds_builder(name, data_dir)
    features = builder.info.features
    if not ('image' in features and isinstance(features['image'], tfds.features.Image) and
            'label' in features and isinstance(features['label'], tfds.features.ClassLabel)):
      raise ValueError(f'TFDS dataset {name!r} has features {list(features)}; image '
                       "classification needs an Image feature 'image' and a ClassLabel 'label'.")
    self._image = features['image']
    self.channels = self._image.shape[-1]
    self.num_classes = features['label'].num_classes

  def num_examples(self, split: str, field: str) -> int:
    try:
      return self._builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(f'{field}={split!r} is not a split of TFDS dataset '
                       f'{self._builder.name!r}; available: '
                       f'{list(self._builder.info.splits)}.') from e

  def shard(self, split: str, field: str, index: int, count: int,
            drop_remainder: bool) -> Shard:
    self.num_examples(split, field)  # Validates the split.
    sub = tfds.split_for_jax_process(split, process_index=index, process_count=count,
                                     drop_remainder=drop_remainder)

    def records(shuffle_seed):
      options = tf.data.Options()
      options.deterministic = True
      read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                    options=options)
      ds = self._builder.as_dataset(split=sub, shuffle_files=shuffle_seed is not None,
                                    read_config=read_config,
                                    decoders={'image': tfds.decode.SkipDecoding()})
      return ds.map(lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)})

    return Shard(self._builder.info.splits[sub].num_examples, self.channels, records,
                 self._image.decode_example, jpeg=self._image.encoding_format == 'jpeg')


def open_source(name: str, data_dir: Optional[str], train_split: str):
  """The source of config.dataset.name: a DigitsSource, FolderSource or TfdsSource.

  Args:
    name: config.dataset.name.
    data_dir: config.dataset.data_dir (TFDS data dir, or the folder's ROOT).
    train_split: config.dataset.train_split; a folder's classes are its subdirectories.

  Returns:
    The source, with `channels`, `num_classes`, `num_examples(split, field)` and
    `shard(split, field, index, count, drop_remainder)`; `field` names the config field of the
    split in errors.
  """
  if name == 'sklearn_digits':
    return DigitsSource()
  if name == 'folder':
    return FolderSource(data_dir, train_split)
  return TfdsSource(name, data_dir)
