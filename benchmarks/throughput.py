"""Training and inference speed, compile time and memory of densenet_jax, beside torchvision.

    python benchmarks/throughput.py                      # the default grid, this machine
    python benchmarks/throughput.py --cases=densenet121:8:float32:std-scan1 --steps=5
    python benchmarks/throughput.py --torch=False --json=out.json --markdown=out.md

Each case runs in a fresh process so that its peak resident memory is its own. A case is
MODEL:BATCH:DTYPE:MODE, MODE 'std' (standard), 'eff' (memory-efficient), each
optionally with '-scanN' (each dense block as at most N scanned loops, scanned.py; plain
'std'/'eff' compile every layer separately). Images are 224x224 for ImageNet
models and 32x32 for CIFAR ones. For each case the table gives: train images/s and inference
images/s (median over --steps timed steps after two warm-up steps), the train step's compile
time, XLA's compiled temporary memory of the train step, and the process's peak RSS. When torch
and torchvision are importable, torchvision's same model (DenseNet-BC-100 with a CIFAR stem
swapped in) is measured on the same inputs, float32 only, and the ratio jax/torch is printed.

On a GPU or TPU host run the same command after installing the matching jax (jax[cuda12] or
jax[tpu]); timings then include `block_until_ready`, so they are device times. Peak RSS is host
memory there; compare device memory with the compiled temp figure instead.

The script restarts itself with glibc's transparent-huge-page tunable (densenet_jax/hugepages.py),
as train.py does; every worker, torchvision's included, inherits it. DENSENET_JAX_HUGEPAGES=0
measures both without it.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from densenet_jax import hugepages
from harness import compiled_train_step

_CASES = flags.DEFINE_list(
    'cases', ['densenet121:8:float32:std-scan1', 'densenet121:8:float32:eff-scan1',
              'densenet121:8:bfloat16:std-scan1', 'densenet_bc100_k12:64:float32:std-scan1',
              'densenet_bc100_k12:64:float32:eff-scan1',
              'densenet_bc100_k12:64:bfloat16:std-scan1'],
    'MODEL:BATCH:DTYPE:MODE cases (default: the models\' default scanned blocks).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per measurement.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also measure torchvision when installed.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Write the table here as markdown.')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Only compile the train step: compile time and temp memory, for '
    'models too large or slow to run here.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: measure one case in this process.')


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, steps):
  """Median seconds of fn() over `steps` calls after two warm-up calls."""
  for _ in range(2):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def model_options(mode):
  """create_model keyword arguments for a MODE string: std, eff, std-scanN or eff-scanN."""
  memory, _, scan = mode.partition('-')
  if (memory in ('std', 'eff') and (not scan or (
      scan.startswith('scan') and scan[4:].isdigit() and int(scan[4:]) > 0))):
    return dict(memory_efficient=(memory == 'eff'), scan_segments=int(scan[4:] or 0))
  raise ValueError(f'mode {mode!r}: expected std, eff, std-scanN or eff-scanN with N >= 1')


def measure_jax(name, batch, dtype, mode, steps):
  """One densenet_jax case: the real train step of the trainer (SGD, BatchNorm updates)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from densenet_jax import train_lib
  from densenet_jax.models import create_model

  model = create_model(name, dtype=jnp.dtype(dtype), **model_options(mode))
  compiled, state, data, compile_s, temp_mib = compiled_train_step(model, batch)
  if steps == 0:   # --compile_only
    return dict(compile_s=compile_s, temp_mib=temp_mib, peak_rss_mib=_peak_rss_mib(),
                device=str(jax.devices()[0].device_kind))
  holder = {'state': state}

  def train():
    holder['state'], metrics = compiled(holder['state'], data)
    jax.block_until_ready(metrics)

  train_s = _timed(train, steps)
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False),
                  compiler_options=train_lib.compiler_options(train_lib.create_mesh()))
  variables = {'params': holder['state'].params, 'batch_stats': holder['state'].batch_stats}
  infer_s = _timed(lambda: jax.block_until_ready(infer(variables, data['image'])), steps)
  return dict(train_ips=batch / train_s, infer_ips=batch / infer_s, compile_s=compile_s,
              temp_mib=temp_mib, peak_rss_mib=_peak_rss_mib(),
              device=str(jax.devices()[0].device_kind))


def _torch_model(name, mode):
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision
  efficient = mode == 'eff'
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


def measure_torch(name, batch, mode, steps):
  """torchvision's model, float32, the same SGD step."""
  import torch  # pylint: disable=g-import-not-at-top
  model, size = _torch_model(name, mode)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
  x = torch.randn(batch, 3, size, size)
  y = torch.randint(0, 10, (batch,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def train():
    model.train()
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()

  def infer():
    model.eval()
    with torch.no_grad():
      model(x)

  train_s = _timed(train, steps)
  infer_s = _timed(infer, steps)
  return dict(train_ips=batch / train_s, infer_ips=batch / infer_s,
              peak_rss_mib=_peak_rss_mib(), threads=torch.get_num_threads())


def _run_worker(spec):
  framework, name, batch, dtype, mode, steps = spec.split(':')
  if framework == 'jax':
    out = measure_jax(name, int(batch), dtype, mode, int(steps))
  else:
    out = measure_torch(name, int(batch), mode, int(steps))
  print('RESULT ' + json.dumps(out))


def _spawn(spec):
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--worker={spec}'],
                        capture_output=True, text=True, env=dict(os.environ,
                                                                 TF_CPP_MIN_LOG_LEVEL='3'))
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  return {'error': (proc.stderr or proc.stdout)[-2000:]}


def _torch_available():
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def main(argv):
  del argv
  # Both frameworks' workers inherit the restarted environment, so they are compared alike.
  hugepages.restart_with_hugepages()
  for case in _CASES.value:
    model_options(case.split(':')[-1])   # a bad MODE fails here, before any measurement
  if _WORKER.value:
    _run_worker(_WORKER.value)
    return
  use_torch = _TORCH.value and _torch_available()
  rows, torch_cache = [], {}
  for case in _CASES.value:
    name, batch, dtype, mode = case.split(':')
    steps = 0 if _COMPILE_ONLY.value else _STEPS.value
    row = dict(model=name, batch=int(batch), dtype=dtype, mode=mode,
               glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
               jax=_spawn(f'jax:{name}:{batch}:{dtype}:{mode}:{steps}'))
    if use_torch and dtype == 'float32' and not _COMPILE_ONLY.value:
      # torchvision's memory-efficient mode beside ours; its standard mode beside the others.
      torch_mode = 'eff' if mode.startswith('eff') else 'std'
      key = (name, batch, torch_mode)
      if key not in torch_cache:
        torch_cache[key] = _spawn(f'torch:{name}:{batch}:float32:{torch_mode}:{_STEPS.value}')
      row['torch'] = torch_cache[key]
    rows.append(row)
    print(json.dumps(row), flush=True)

  lines = ['| model | batch | dtype | mode | train img/s | infer img/s | compile s | '
           'temp MiB | peak RSS MiB | torchvision train / infer img/s, RSS MiB | '
           'train ratio |', '|' + '---|' * 11]
  for r in rows:
    j, t = r['jax'], r.get('torch')
    if 'error' in j:
      lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['mode']} | error: "
                   f"{j['error'].splitlines()[-1] if j['error'] else ''} |||||||")
      continue
    torch_cell, ratio = '', ''
    if t and 'error' not in t:
      torch_cell = f"{t['train_ips']:.2f} / {t['infer_ips']:.2f}, {t['peak_rss_mib']:.0f}"
      ratio = f"{j['train_ips'] / t['train_ips']:.2f}x"
    speed = (f"{j['train_ips']:.2f} | {j['infer_ips']:.2f}" if 'train_ips' in j
             else 'not run | not run')
    lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['mode']} | "
                 f"{speed} | {j['compile_s']:.1f} | "
                 f"{j['temp_mib']:.0f} | {j['peak_rss_mib']:.0f} | {torch_cell} | {ratio} |")
  lines.append(f"\nEvery worker ran with GLIBC_TUNABLES="
               f"{os.environ.get('GLIBC_TUNABLES', '')!r}.")
  table = '\n'.join(lines)
  print(table)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=2)
  if _MARKDOWN.value:
    with open(_MARKDOWN.value, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
