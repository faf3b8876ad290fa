"""Training and inference speed, compile time and memory of densenet_jax, beside torchvision.

    python benchmarks/throughput.py                      # the default grid, this machine
    python benchmarks/throughput.py --cases=densenet121:8:float32:std-scan1 --steps=5
    python benchmarks/throughput.py --torch=False --json=out.json --markdown=out.md
    python benchmarks/throughput.py --cases=resnet50:8:float32:std-scan1,resnet110:64:float32:std-scan1

Each case runs in a fresh process so that its peak resident memory is its own. A case is
MODEL:BATCH:DTYPE:MODE, MODE 'std' (standard), 'eff' (memory-efficient), each
optionally with '-scanN' (each dense block as at most N scanned loops, scanned.py; plain
'std'/'eff' compile every layer separately). ResNets take 'std' (every block compiled
separately) or 'std-scan1' (each stage's blocks after the first as one scanned loop, their
default). Images are 224x224 for ImageNet models and 32x32 for CIFAR ones. For each case the table gives: train images/s and inference
images/s (median over --steps timed steps after two warm-up steps), the train step's compile
time, XLA's compiled temporary memory of the train step, and the process's peak RSS. When torch
and torchvision are importable, torchvision's same model (DenseNet-BC-100 with a CIFAR stem
swapped in; for resnet110 the small torch CIFAR ResNet below) is measured on the same inputs, float32 (and bfloat16 on a GPU, below), and the
ratio jax/torch is printed.

On a GPU or TPU host run the same command after installing the matching jax (jax[cuda12] or
jax[tpu]); `benchmarks/gpu.sh` holds the grid we run on a GPU. Timings block until the device is
done (`block_until_ready`, `torch.cuda.synchronize`), so they are device times. There the table
adds each framework's peak device memory (the allocators' peak bytes in use during the train
steps: JAX's `memory_stats()`, `torch.cuda.max_memory_allocated`); peak RSS is host memory.
torchvision then runs on the GPU too, with `cudnn.benchmark` on (it autotunes its convolutions
as XLA does), and bfloat16 rows get torchvision under `torch.autocast(bfloat16)`. Both
frameworks keep their defaults for float32 convolutions, which on NVIDIA GPUs since Ampere is
TF32 (JAX's default precision, torch's `cudnn.allow_tf32`); the JSON records both settings.

The script restarts itself with glibc's transparent-huge-page tunable
(densenet_jax/runtime/hugepages.py), as train.py does; every worker, torchvision's included,
inherits it. DENSENET_JAX_HUGEPAGES=0 measures both without it.
"""

import json
import os
import resource
import subprocess
import sys

from absl import app
from absl import flags

from densenet_jax.runtime import hugepages
from harness import compiled_train_step
from harness import timed

_CASES = flags.DEFINE_list(
    'cases', ['densenet121:8:float32:std-scan1', 'densenet121:8:float32:eff-scan1',
              'densenet121:8:bfloat16:std-scan1', 'densenet_bc100_k12:64:float32:std-scan1',
              'densenet_bc100_k12:64:float32:eff-scan1',
              'densenet_bc100_k12:64:bfloat16:std-scan1', 'resnet50:8:float32:std-scan1',
              'resnet110:64:float32:std-scan1'],
    'MODEL:BATCH:DTYPE:MODE cases (default: the models\' default scanned blocks).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per measurement.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also measure torchvision when installed.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Write the table here as markdown.')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Only compile the train step: compile time and temp memory, for '
    'models too large or slow to run here.')
_CASE_TIMEOUT = flags.DEFINE_integer(
    'case_timeout', None, 'Seconds one case (one worker process) may take; a case that takes '
    'longer is reported as an error and the next one runs.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: measure one case in this process.')


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_device_mib(device):
  """Peak bytes in use of a JAX device's allocator, MiB; None where it keeps no statistics (CPU)."""
  stats = device.memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / 2**20


def model_options(name, mode):
  """create_model keyword arguments for a MODE string: std, eff, std-scanN or eff-scanN; for a
  ResNet std or std-scan1."""
  from densenet_jax.models import resnet_variants  # pylint: disable=g-import-not-at-top
  if name in resnet_variants.RESNET_NAMES:
    if mode in ('std', 'std-scan1'):
      return dict(scan_blocks=mode == 'std-scan1')
    raise ValueError(f'mode {mode!r} for ResNet {name}: expected std or std-scan1')
  memory, _, scan = mode.partition('-')
  if (memory in ('std', 'eff') and (not scan or (
      scan.startswith('scan') and scan[4:].isdigit() and int(scan[4:]) > 0))):
    return dict(memory_efficient=(memory == 'eff'), scan_segments=int(scan[4:] or 0))
  raise ValueError(f'mode {mode!r}: expected std, eff, std-scanN or eff-scanN with N >= 1')


def check_case(case):
  """Raises ValueError saying what is wrong with a --cases entry MODEL:BATCH:DTYPE:MODE; the
  model is built (not compiled), so an unknown name fails here, not in its worker."""
  parts = case.split(':')
  if len(parts) != 4:
    raise ValueError('expected MODEL:BATCH:DTYPE:MODE, e.g. densenet121:8:float32:std-scan1')
  name, batch, dtype, mode = parts
  if not batch.isdigit() or int(batch) < 1:
    raise ValueError(f'batch {batch!r}: expected a positive integer')
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'dtype {dtype!r}: expected float32 or bfloat16')
  from densenet_jax.models import create_model  # pylint: disable=g-import-not-at-top
  create_model(name, **model_options(name, mode))


def measure_jax(name, batch, dtype, mode, steps):
  """One densenet_jax case: the real train step of the trainer (SGD, BatchNorm updates)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from densenet_jax.training import train_lib
  from densenet_jax.models import create_model

  model = create_model(name, dtype=jnp.dtype(dtype), **model_options(name, mode))
  compiled, state, data, compile_s, temp_mib = compiled_train_step(model, batch)
  device = jax.devices()[0]
  about = dict(device=str(device.device_kind), platform=device.platform, jax=jax.__version__,
               default_matmul_precision=str(jax.config.jax_default_matmul_precision))
  if steps == 0:   # --compile_only
    return dict(compile_s=compile_s, temp_mib=temp_mib, peak_rss_mib=_peak_rss_mib(), **about)
  holder = {'state': state}

  def train():
    holder['state'], metrics = compiled(holder['state'], data)
    jax.block_until_ready(metrics)

  train_s = timed(train, steps)
  peak_device_mib = _peak_device_mib(device)   # before inference: the train steps' peak
  mesh = train_lib.create_mesh()   # the train step's: the batch is split over it
  infer = jax.jit(train_lib.on_mesh(lambda v, x: model.apply(v, x, train=False), mesh),
                  compiler_options=train_lib.compiler_options(mesh))
  variables = {'params': holder['state'].params, 'batch_stats': holder['state'].batch_stats}
  infer_s = timed(lambda: jax.block_until_ready(infer(variables, data['image'])), steps)
  return dict(train_ips=batch / train_s, infer_ips=batch / infer_s, compile_s=compile_s,
              temp_mib=temp_mib, peak_rss_mib=_peak_rss_mib(),
              peak_device_mib=peak_device_mib, **about)


def torch_cifar_resnet(depth):
  """He et al.'s CIFAR ResNet of `depth` (6n + 2) in torch, as `resnet_cifar` builds it: basic
  blocks at 16, 32, 64 maps, option A shortcuts (subsample, append zero maps)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn

  class Block(nn.Module):

    def __init__(self, inputs, width, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.stride, self.extra = stride, width - inputs

    def forward(self, x):
      y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
      shortcut = nn.functional.pad(x[:, :, ::self.stride, ::self.stride],
                                   (0, 0, 0, 0, 0, self.extra))
      return torch.relu(y + shortcut)

  layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
  inputs = 16
  for stage, width in enumerate((16, 32, 64)):
    for block in range((depth - 2) // 6):
      layers.append(Block(inputs, width, 2 if stage and not block else 1))
      inputs = width
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _torch_model(name, mode):
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision
  efficient = mode == 'eff'
  if name == 'resnet110':
    return torch_cifar_resnet(110), 32
  if name.startswith('resnet'):
    return getattr(torchvision.models, name)(), 224
  if name == 'densenet_bc100_k12':
    model = torchvision.models.DenseNet(growth_rate=12, block_config=(16, 16, 16),
                                        num_init_features=24, bn_size=4, num_classes=10,
                                        memory_efficient=efficient)
    # The paper's CIFAR stem: one 3x3 convolution, no BN-ReLU-max-pool before the first block.
    model.features.conv0 = torch.nn.Conv2d(3, 24, 3, padding=1, bias=False)
    model.features.norm0 = torch.nn.Identity()
    model.features.relu0 = torch.nn.Identity()
    model.features.pool0 = torch.nn.Identity()
    return model, 32
  return getattr(torchvision.models, name)(memory_efficient=efficient), 224


def measure_torch(name, batch, dtype, mode, steps):
  """torchvision's model, the same SGD step: float32, or under bfloat16 autocast."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  if cuda:
    torch.backends.cudnn.benchmark = True
  model, size = _torch_model(name, mode)
  model = model.to(device)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
  x = torch.randn(batch, 3, size, size, device=device)
  y = torch.randint(0, 10, (batch,), device=device)
  loss_fn = torch.nn.CrossEntropyLoss()

  def autocast():
    return (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == 'bfloat16'
            else contextlib.nullcontext())

  sync = torch.cuda.synchronize if cuda else lambda: None

  def train():
    model.train()
    opt.zero_grad()
    with autocast():
      loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    sync()

  def infer():
    model.eval()
    with torch.no_grad(), autocast():
      model(x)
    sync()

  # cudnn.benchmark's trial workspaces during warm-up are not the train step's memory.
  train_s = timed(train, steps, torch.cuda.reset_peak_memory_stats if cuda else None)
  peak_device_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
  infer_s = timed(infer, steps)
  return dict(train_ips=batch / train_s, infer_ips=batch / infer_s,
              peak_rss_mib=_peak_rss_mib(), peak_device_mib=peak_device_mib,
              threads=torch.get_num_threads(), torch=torch.__version__,
              device=torch.cuda.get_device_name() if cuda else 'cpu',
              cudnn_allow_tf32=torch.backends.cudnn.allow_tf32 if cuda else None)


def _run_worker(spec):
  framework, name, batch, dtype, mode, steps = spec.split(':')
  if framework == 'jax':
    out = measure_jax(name, int(batch), dtype, mode, int(steps))
  else:
    out = measure_torch(name, int(batch), dtype, mode, int(steps))
  print('RESULT ' + json.dumps(out))


def _spawn(spec):
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--worker={spec}'],
                          capture_output=True, text=True, timeout=_CASE_TIMEOUT.value,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after --case_timeout={_CASE_TIMEOUT.value} s'}
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  return {'error': (proc.stderr or proc.stdout)[-2000:]}


def _torch_device():
  """None without torchvision; else 'cuda' or 'cpu', where its workers will run."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def markdown_table(rows):
  """The results as a markdown table; device-memory columns only where a device reported any."""
  device = any((r.get(k) or {}).get('peak_device_mib') is not None
               for r in rows for k in ('jax', 'torch'))
  head = ['model', 'batch', 'dtype', 'mode', 'train img/s', 'infer img/s', 'compile s',
          'temp MiB', 'peak RSS MiB'] + (['peak device MiB'] if device else []) + [
              'torchvision train / infer img/s, ' + ('device MiB' if device else 'RSS MiB'),
              'train ratio']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    j, t = r['jax'], r.get('torch')
    cells = [r['model'], str(r['batch']), r['dtype'], r['mode']]
    if 'error' in j:
      last = j['error'].splitlines()[-1] if j['error'] else ''
      lines.append('| ' + ' | '.join(cells + [f'error: {last}']) + ' |' * (len(head) - 4))
      continue
    torch_cell, ratio = '', ''
    if t and 'error' not in t:
      memory = t['peak_device_mib'] if device else t['peak_rss_mib']
      torch_cell = f"{t['train_ips']:.2f} / {t['infer_ips']:.2f}, {memory or 0:.0f}"
      ratio = f"{j['train_ips'] / t['train_ips']:.2f}x"
    elif t:
      torch_cell = 'error: ' + (t['error'].splitlines() or [''])[-1]
    cells += ([f"{j['train_ips']:.2f}", f"{j['infer_ips']:.2f}"] if 'train_ips' in j
              else ['not run', 'not run'])
    cells += [f"{j['compile_s']:.1f}", f"{j['temp_mib']:.0f}", f"{j['peak_rss_mib']:.0f}"]
    if device:
      cells.append(f"{j['peak_device_mib']:.0f}" if j.get('peak_device_mib') is not None
                   else '')
    cells += [torch_cell, ratio]
    lines.append('| ' + ' | '.join(cells) + ' |')
  devices = sorted({f"{k} on {r[k]['device']}" for r in rows for k in ('jax', 'torch')
                    if 'device' in (r.get(k) or {})})
  lines.append(f"\nDevices: {'; '.join(devices)}. Every worker ran with GLIBC_TUNABLES="
               f"{os.environ.get('GLIBC_TUNABLES', '')!r}.")
  return '\n'.join(lines)


def main(argv):
  del argv
  # Both frameworks' workers inherit the restarted environment, so they are compared alike.
  hugepages.restart_with_hugepages()
  for case in _CASES.value:   # a bad case fails here, first, in one line
    try:
      check_case(case)
    except ValueError as e:
      sys.exit(f'throughput: --cases={case}: {e}')
  if _WORKER.value:
    _run_worker(_WORKER.value)
    return
  torch_device = _torch_device() if _TORCH.value else None
  rows, torch_cache = [], {}
  for case in _CASES.value:
    name, batch, dtype, mode = case.split(':')
    steps = 0 if _COMPILE_ONLY.value else _STEPS.value
    row = dict(model=name, batch=int(batch), dtype=dtype, mode=mode,
               glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
               jax=_spawn(f'jax:{name}:{batch}:{dtype}:{mode}:{steps}'))
    if (torch_device and not _COMPILE_ONLY.value and
        (dtype == 'float32' or (dtype == 'bfloat16' and torch_device == 'cuda'))):
      # torchvision's memory-efficient mode beside ours; its standard mode beside the others.
      torch_mode = 'eff' if mode.startswith('eff') else 'std'
      key = (name, batch, dtype, torch_mode)
      if key not in torch_cache:
        torch_cache[key] = _spawn(f'torch:{name}:{batch}:{dtype}:{torch_mode}:{_STEPS.value}')
      row['torch'] = torch_cache[key]
    rows.append(row)
    print(json.dumps(row), flush=True)
    if _JSON.value:   # after every case, so that an interrupted run keeps what it measured
      with open(_JSON.value, 'w') as f:
        json.dump(rows, f, indent=2)

  table = markdown_table(rows)
  print(table)
  if _MARKDOWN.value:
    with open(_MARKDOWN.value, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
