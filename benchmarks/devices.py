"""Train speed on one CPU device with all host cores against N devices sharing them.

    python benchmarks/devices.py --model=densenet_bc100_k12 --batch_size=64 --devices=1,2
    git worktree add /tmp/before <commit>
    python benchmarks/devices.py --model=densenet121 --batch_size=8 --baseline=/tmp/before

How many devices a host's cores are split into should not change how fast it trains: data
parallelism over N devices of cores/N each does the same work as one device of all cores, plus
the gradient sums. It did change it while the native oneDNN calls were not partitioned (each
device ran every call on the global batch, densenet_jax/native/shards.py). Each measurement is a
fresh process with `--xla_force_host_platform_device_count=N` and OMP_NUM_THREADS=cores/N (oneDNN's
threads per call; each device calls from its own thread), timing the trainer's real train step
(benchmarks/harness.py) on a random global batch of --batch_size. Processes run in turns, every
configuration once per round, so that the machine's drift falls on all alike; the table gives the
median over rounds of each process's median step. `--baseline` adds the same device counts run on
another checkout of the package (PYTHONPATH), for a before/after comparison in one run.
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

_MODEL = flags.DEFINE_string('model', 'densenet_bc100_k12', 'A create_model name.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
_DEVICES = flags.DEFINE_list('devices', ['1', '2'], 'Device counts to compare.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds: each configuration runs once per round.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per process, after two warm-up steps.')
_BASELINE = flags.DEFINE_string(
    'baseline', None, 'A directory holding another checkout of densenet_jax to compare with.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')
_WORKER = flags.DEFINE_bool('worker', False, 'Internal: measure in this process.')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure():
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from harness import compiled_train_step, timed  # pylint: disable=g-import-not-at-top
  from densenet_jax.models import create_model

  model = create_model(_MODEL.value)
  compiled, state, data, compile_s, _ = compiled_train_step(model, _BATCH.value)
  holder = {'state': state}

  def train():
    holder['state'], metrics = compiled(holder['state'], data)
    jax.block_until_ready(metrics)

  step_s = timed(train, _STEPS.value)
  return dict(devices=jax.device_count(), compile_s=compile_s,
              train_ips=_BATCH.value / step_s)


def _spawn(devices, tree):
  cores = os.cpu_count()
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             OMP_NUM_THREADS=str(max(1, cores // devices)), PYTHONPATH=tree,
             TF_CPP_MIN_LOG_LEVEL='3')
  argv = [a for a in sys.argv[1:] if not a.startswith('--json')]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', *argv],
                        capture_output=True, text=True, env=env, cwd=tree)
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  raise RuntimeError(f'{devices} devices on {tree} failed:\n{proc.stderr[-2000:]}')


def main(argv):
  del argv
  if _WORKER.value:
    print('RESULT ' + json.dumps(_measure()))
    return
  if not all(n.isdigit() and int(n) > 0 for n in _DEVICES.value):
    sys.exit(f'devices: --devices={",".join(_DEVICES.value)}: expected positive integers.')
  uneven = [n for n in _DEVICES.value if _BATCH.value % int(n)]
  if uneven:   # The global batch is split evenly over the devices.
    sys.exit(f'devices: --batch_size={_BATCH.value}: not a multiple of --devices {uneven}.')
  from densenet_jax.models import create_model  # pylint: disable=g-import-not-at-top
  try:   # Built, not compiled: an unknown name fails here, not in every worker.
    create_model(_MODEL.value)
  except ValueError as e:
    sys.exit(f'devices: --model={_MODEL.value}: {e}')
  trees = [('this checkout', _ROOT)] + ([('baseline', _BASELINE.value)] if _BASELINE.value
                                        else [])
  configs = [(label, tree, int(n)) for label, tree in trees for n in _DEVICES.value]
  speeds = {c: [] for c in configs}
  for round_ in range(_ROUNDS.value):
    for label, tree, n in configs:
      out = _spawn(n, tree)
      speeds[(label, tree, n)].append(out['train_ips'])
      print(f'round {round_ + 1}: {label}, {n} device(s): {out["train_ips"]:.2f} img/s '
            f'(compile {out["compile_s"]:.1f} s)', flush=True)
  cores = os.cpu_count()
  first = statistics.median(speeds[configs[0]])
  rows = ['| package | devices | cores per device | train img/s (median) | ratio |',
          '|---|---|---|---|---|']
  for label, tree, n in configs:
    median = statistics.median(speeds[(label, tree, n)])
    rows.append(f'| {label} | {n} | {max(1, cores // n)} | {median:.2f} | '
                f'{median / first:.2f}x |')
  print(f'\n{_MODEL.value}, global batch {_BATCH.value}, {cores} host cores, '
        f'{_ROUNDS.value} rounds:\n' + '\n'.join(rows))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({' / '.join(map(str, (label, n))): v for (label, _, n), v in speeds.items()},
                f, indent=2)


if __name__ == '__main__':
  app.run(main)
