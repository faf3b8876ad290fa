"""Images per second per host core of the ImageNet input pipeline, beside torchvision's DataLoader.

    python benchmarks/input_pipeline.py                  # 512 JPEGs, 1 and 2 cores, 3 rounds
    python benchmarks/input_pipeline.py --cores=1 --rounds=5 --sources=folder
    python benchmarks/input_pipeline.py --markdown=out.md --json=out.json

An accelerator waits for its host whenever the host decodes and augments fewer images per second
than the step consumes, and nobody had measured how many our pipeline delivers. This script
writes ImageNet-like JPEGs once into --cache_dir (sizes drawn from ImageNet's common ones,
quality 90, smooth gradients, shapes and noise so that files are about as large as ImageNet's),
as a folder dataset (ROOT/train/<class>/*.jpg, data_sources.FolderSource) and as TFDS
`imagenet2012` records (encoded JPEG bytes, as `tfds build imagenet2012` writes them). Then it
measures, each in a fresh process:

  * ours: `input_pipeline.train_iterator` and `eval_iterator`, the trainer's own tf.data
    pipelines with configs/base.py's ImageNet settings (random resized crop to 224, flip,
    normalise; evaluation resizes the shorter side to 256 and takes the central 224), read from
    the folder and from the TFDS records, yielding numpy batches;
  * torchvision: `ImageFolder` (PIL decoding) with `RandomResizedCrop(224)`,
    `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(...)` (evaluation: `Resize(256)`,
    `CenterCrop(224)`, ...) in a `DataLoader` with num_workers equal to the cores.

Cores are limited alike for both: each measuring process pins itself, before it imports
TensorFlow or torch, to the first N CPUs with `sched_setaffinity` (what `taskset` does), and
torch's DataLoader workers inherit the mask. TensorFlow sizes its thread pools (tf.data's
included) from the CPUs the process may run on, so they have N threads; the DataLoader runs N
worker processes (single-threaded, torch's default for workers) beside its main process.

A rate is the images of one whole epoch over its time, pipeline start-up included as a trainer
pays it every epoch; each process discards its first epoch (warm-up) and reports the median of
the others. Rates are per wall second and per CPU second: user and system time of the process
and of its reaped children (the DataLoader's workers, which torch joins at the end of each epoch
by default). On a machine shared with other jobs the wall rates move by tens of percent from one
process to the next and the CPU rates far less; per CPU second is what one fully used core
delivers. Processes of the pipelines alternate round by round, so that the machine's drift falls
on all of them alike; the table gives medians over rounds. `--baseline=DIR` measures another
checkout's pipeline in the same rounds, how a change to the pipeline is judged.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

_CACHE_DIR = flags.DEFINE_string(
    'cache_dir', os.path.join(os.path.expanduser('~'), '.cache', 'densenet_jax_input_bench'),
    'Where the generated JPEGs and records are kept between runs.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 512, 'JPEGs to generate.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 8, 'Class folders they are spread over.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per batch, both pipelines.')
_EPOCHS = flags.DEFINE_integer('epochs', 3, 'Epochs per process; the first is a warm-up.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Processes per pipeline and core count.')
_CORES = flags.DEFINE_list('cores', ['1', '2'], 'Host cores to measure with.')
_SOURCES = flags.DEFINE_list('sources', ['folder', 'tfds'], 'Our sources: folder, tfds.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also measure torchvision.')
_BASELINE = flags.DEFINE_string(
    'baseline', None, 'A checkout of the repository (`git worktree add /tmp/base HEAD~1`) whose '
    'pipeline is measured too, as base-folder and base-tfds, in the same rounds: how a change to '
    'the pipeline is judged on a machine whose speed drifts.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Write the table here as markdown.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: measure PIPELINE:CORES here.')

IMAGE_SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (width, height) and weight: most ImageNet photos are 500 pixels on their longer side.
SIZES = (((500, 375), 30), ((375, 500), 15), ((500, 333), 20), ((333, 500), 5),
         ((500, 400), 8), ((500, 500), 7), ((640, 480), 7), ((800, 600), 5), ((1024, 768), 3))
JPEG_QUALITY = 90


# Data.


def synthetic_photo(rng, width: int, height: int):
  """uint8 [height, width, 3]: a smooth colour field, a few shapes and sensor-like noise.

  Pure noise would make JPEGs several times larger than photos (and slower to decode), flat
  colour far smaller; this mix gives files of about ImageNet's size at quality 90.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(4, 12)):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape((x0, y0, x1, y1), fill=colour)
  pixels = np.asarray(image, np.float32)
  # Texture at a few scales: photos are not smooth at the pixel level.
  for scale in (1, 4):
    noise = rng.normal(0, 12, (height // scale + 1, width // scale + 1, 3))
    pixels += np.repeat(np.repeat(noise, scale, 0), scale, 1)[:height, :width]
  return np.clip(pixels, 0, 255).astype(np.uint8)


def write_data(cache_dir: str, num_images: int, num_classes: int) -> dict:
  """Writes the folder dataset and the TFDS records once; returns their description."""
  done = os.path.join(cache_dir, f'done-{num_images}-{num_classes}.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  sizes, weights = zip(*SIZES)
  folder = os.path.join(cache_dir, f'folder-{num_images}-{num_classes}')
  jpegs = []
  for i in range(num_images):
    width, height = sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]
    buffer = io.BytesIO()
    Image.fromarray(synthetic_photo(rng, width, height)).save(buffer, 'JPEG',
                                                              quality=JPEG_QUALITY)
    label = i % num_classes
    path = os.path.join(folder, 'train', f'n{label:08d}', f'{i:05d}.JPEG')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(buffer.getvalue())
    jpegs.append((buffer.getvalue(), label, os.path.basename(path)))
  tfds_dir = os.path.join(cache_dir, f'tfds-{num_images}-{num_classes}')
  _write_imagenet_records(tfds_dir, jpegs)
  about = dict(folder=folder, tfds=tfds_dir, num_images=num_images,
               mean_jpeg_kib=sum(len(j) for j, _, _ in jpegs) / num_images / 1024)
  with open(done, 'w') as f:
    json.dump(about, f)
  return about


def _write_imagenet_records(data_dir: str, jpegs: list) -> None:
  """Writes `imagenet2012`'s train split as `tfds build` does: one record per encoded JPEG."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_path, dataset_name='imagenet2012',
                                           split='train', filetype_suffix='tfrecord')
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=[len(jpegs)], num_bytes=sum(len(j) for j, _, _ in jpegs),
      filename_template=template)]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  features = builder.info.features
  import io  # pylint: disable=g-import-not-at-top
  with tf.io.TFRecordWriter(os.fspath(template.sharded_filepaths(1)[0])) as writer:
    for jpeg, label, name in jpegs:
      writer.write(features.serialize_example(
          {'image': io.BytesIO(jpeg), 'label': label, 'file_name': name}))
  builder.info.write_to_directory(builder.data_path)


# Measuring, in a process pinned to `cores` CPUs.


def _cpu_seconds() -> float:
  """User and system time of this process and its waited-for children (DataLoader workers)."""
  return sum(os.times()[:4])


def _epoch_rates(run_epoch, epochs: int) -> dict:
  """Median images per wall second and per CPU second of run_epoch() (which returns its image
  count), after one warm-up epoch."""
  wall, cpu = [], []
  for _ in range(epochs):
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    images = run_epoch()
    wall.append(images / (time.perf_counter() - start))
    cpu.append(images / (_cpu_seconds() - start_cpu))
  keep = slice(1 if epochs > 1 else 0, None)
  return dict(wall=statistics.median(wall[keep]), cpu=statistics.median(cpu[keep]))


def measure_ours(source: str, data: dict, batch_size: int, epochs: int) -> dict:
  """The trainer's train and eval iterators over the folder or the TFDS records."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from densenet_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location('base', os.path.join(root, 'configs', 'base.py'))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  config = base.get_config().dataset
  config.name = 'folder' if source == 'folder' else 'imagenet2012'
  config.data_dir = data[source]
  config.eval_split = 'train'
  assert (config.image_size, config.mean, config.std) == (IMAGE_SIZE, MEAN, STD)
  info = input_pipeline.get_info(config)
  num_batches = input_pipeline.num_eval_batches(info, batch_size)
  epoch = [0]

  def train():
    epoch[0] += 1
    batches = input_pipeline.train_iterator(config, seed=0, local_batch_size=batch_size,
                                            epoch=epoch[0])
    return sum(len(b['label']) for b in batches)

  def evaluate():
    batches = input_pipeline.eval_iterator(config, local_batch_size=batch_size,
                                           num_batches=num_batches)
    return sum(int(b['mask'].sum()) for b in batches)

  return dict(train=_epoch_rates(train, epochs), eval=_epoch_rates(evaluate, epochs),
              code=os.path.dirname(os.path.abspath(input_pipeline.__file__)))


def measure_torch(data: dict, batch_size: int, epochs: int, workers: int) -> dict:
  """torchvision's ImageNet recipe in a DataLoader with `workers` worker processes."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(workers)
  normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
  train_set = datasets.ImageFolder(os.path.join(data['folder'], 'train'), transforms.Compose([
      transforms.RandomResizedCrop(IMAGE_SIZE), transforms.RandomHorizontalFlip(), *normalize]))
  eval_set = datasets.ImageFolder(os.path.join(data['folder'], 'train'), transforms.Compose([
      transforms.Resize(256), transforms.CenterCrop(IMAGE_SIZE), *normalize]))

  def run(dataset, train):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train,
                                         drop_last=train, num_workers=workers)
    return lambda: sum(len(labels) for _, labels in loader)

  return dict(train=_epoch_rates(run(train_set, True), epochs),
              eval=_epoch_rates(run(eval_set, False), epochs))


def _worker(spec: str) -> None:
  pipeline, cores = spec.rsplit(':', 1)
  cores = int(cores)
  # Before TensorFlow or torch start: both size their thread pools from this mask.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  data = write_data(_CACHE_DIR.value, _NUM_IMAGES.value, _NUM_CLASSES.value)
  if pipeline == 'torchvision':
    result = measure_torch(data, _BATCH_SIZE.value, _EPOCHS.value, cores)
  else:
    result = measure_ours(pipeline.split('-')[1], data, _BATCH_SIZE.value, _EPOCHS.value)
  print('RESULT ' + json.dumps(dict(pipeline=pipeline, cores=cores, **result)), flush=True)


def run_worker(pipeline: str, cores: int, flags_: list) -> dict:
  """Measures one pipeline in a fresh process; {'pipeline', 'cores', 'train', 'eval'}."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  if pipeline.startswith('base-'):
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [_BASELINE.value, env.get('PYTHONPATH')]))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                         f'--worker={pipeline}:{cores}', *flags_],
                        capture_output=True, text=True, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{pipeline} on {cores} core(s) failed:\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def _summary(result: dict) -> str:
  return ', '.join(f'{k} {result[k]["wall"]:.0f} img/s ({result[k]["cpu"]:.0f} per CPU-s)'
                   for k in ('train', 'eval'))


def table(results: list) -> str:
  """Markdown: medians over rounds, and ours / torchvision at the same cores."""
  rows = {}
  for r in results:
    rows.setdefault((r['pipeline'], r['cores']), []).append(r)
  median = {key: {(k, m): statistics.median(r[k][m] for r in rs)
                  for k in ('train', 'eval') for m in ('wall', 'cpu')}
            for key, rs in rows.items()}
  lines = ['| pipeline | cores | train img/s | eval img/s | train img per CPU-s | '
           'eval img per CPU-s | ours / torchvision: img/s (train, eval) | per CPU-s |',
           '|---|---|---|---|---|---|---|---|']
  for (pipeline, cores), m in sorted(median.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    ratios = ['', '']
    torch = median.get(('torchvision', cores))
    if torch and pipeline != 'torchvision':
      ratios = [f'{m["train", w] / torch["train", w]:.2f}x, {m["eval", w] / torch["eval", w]:.2f}x'
                for w in ('wall', 'cpu')]
    lines.append(f'| {pipeline} | {cores} | {m["train", "wall"]:.0f} | {m["eval", "wall"]:.0f} | '
                 f'{m["train", "cpu"]:.0f} | {m["eval", "cpu"]:.0f} | {ratios[0]} | {ratios[1]} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  if not all(c.isdigit() and int(c) > 0 for c in _CORES.value):
    sys.exit(f'input_pipeline: --cores={",".join(_CORES.value)}: expected positive integers.')
  unknown = sorted(set(_SOURCES.value) - {'folder', 'tfds'})
  if unknown:
    sys.exit(f'input_pipeline: --sources={",".join(_SOURCES.value)}: {unknown} unknown; '
             'expected folder, tfds or both.')
  data = write_data(_CACHE_DIR.value, _NUM_IMAGES.value, _NUM_CLASSES.value)
  print(f'{data["num_images"]} JPEGs, mean {data["mean_jpeg_kib"]:.0f} KiB, in '
        f'{_CACHE_DIR.value}', flush=True)
  pipelines = [f'ours-{s}' for s in _SOURCES.value]
  if _BASELINE.value:
    pipelines += [f'base-{s}' for s in _SOURCES.value]
  if _TORCH.value:
    pipelines.append('torchvision')
  passed = [f'--{name}={flags.FLAGS[name].serialize().split("=", 1)[1]}' for name in
            ('cache_dir', 'num_images', 'num_classes', 'batch_size', 'epochs')]
  results = []
  for round_ in range(_ROUNDS.value):
    for cores in (int(c) for c in _CORES.value):
      # Alternate the order too: whoever runs first in a round does not always run first.
      for pipeline in (pipelines if round_ % 2 == 0 else pipelines[::-1]):
        result = run_worker(pipeline, cores, passed)
        print(f'round {round_}: {pipeline} on {cores} core(s): {_summary(result)}', flush=True)
        results.append(result)
  markdown = table(results)
  print(markdown)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(dict(data=data, batch_size=_BATCH_SIZE.value, results=results), f, indent=1)
  if _MARKDOWN.value:
    with open(_MARKDOWN.value, 'w') as f:
      f.write(markdown + '\n')


if __name__ == '__main__':
  app.run(main)
