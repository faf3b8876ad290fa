"""Interleaved timing of model variants' train steps in one process: A/B tests of a change.

    python benchmarks/ab.py --model=densenet_bc100_k12 --batch_size=64 \\
        --variants='scan_chunk=64;scan_chunk=32' --steps=8
    python benchmarks/ab.py --model=densenet121 --batch_size=8 \\
        --variants='memory_efficient=False;memory_efficient=True'
    python benchmarks/ab.py --model=densenet_bc --overrides=depth=40,growth_rate=12 \\
        --variants='dtype=float32;dtype=bfloat16' --processes=3

On a shared machine one step's speed drifts by 10-20% within minutes (see the README's
Performance section), more than most single changes: variants measured one after another
compare the machine's minutes as much as the variants. Here every variant is compiled first,
then each round times one train step of every variant in turn, so that drift falls on all of
them alike. The table gives each variant's median and fastest step, images/s, compiled temp
memory and its median's ratio to the first variant's. Variants whose memory differs much (dtypes,
modes) take turns in the allocator that way, which favours the smaller one: compare them with
`--processes=N`, N rounds of one fresh process per variant in turn (each the median of
`--steps` steps), with each round's ratio to the first variant.

A variant is a comma-separated list of FIELD=VALUE settings of `create_model` (DenseNet fields,
and depth for CIFAR families), values as Python literals (True, 32, 0.5) or dtype names
(bfloat16), plus `onednn=False` to trace the variant with XLA's own CPU convolutions instead of
oneDNN's (densenet_jax/native/onednn.py), or `fused=False` to keep oneDNN's convolutions but run
the scanned layers' first BN-ReLU-Conv1x1 in chunks instead of the fused call (bottleneck.cc);
`--overrides` applies to every variant, and an empty variant is the model as `--model` and
`--overrides` give it. Steps are the trainer's real jitted train step (SGD, BatchNorm updates),
as in throughput.py. Like train.py, it restarts itself with the glibc
huge-page tunable (densenet_jax/runtime/hugepages.py; DENSENET_JAX_HUGEPAGES=0 turns it off).
"""

import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from densenet_jax.runtime import hugepages
from harness import compiled_train_step

_MODEL = flags.DEFINE_string('model', 'densenet_bc100_k12', 'A create_model name.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_OVERRIDES = flags.DEFINE_string('overrides', '', 'FIELD=VALUE,... for every variant.')
_VARIANTS = flags.DEFINE_string(
    'variants', 'memory_efficient=False;memory_efficient=True',
    'Variants separated by ";", each FIELD=VALUE,... (the first is the baseline).')
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed rounds, after one warm-up round.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')
_PROCESSES = flags.DEFINE_integer(
    'processes', 0, 'If > 0: this many rounds, each timing every variant in turn in a fresh '
    'process of its own, instead of interleaving the steps in one process.')


def parse_settings(text: str) -> dict:
  """'a=1,b=True,dtype=bfloat16' -> {'a': 1, 'b': True, 'dtype': jnp.bfloat16}."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  settings = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, sep, value = item.partition('=')
    if not sep or not name.strip():
      raise ValueError(f'{item!r}: expected FIELD=VALUE')
    name, value = name.strip(), value.strip()
    if name == 'dtype':
      settings[name] = jnp.dtype(value)
      continue
    try:
      settings[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise ValueError(f'{item!r}: {value!r} is not a Python literal') from None
  return settings


def _in_processes(names):
  """--processes: rounds of one fresh process per variant, in turns (why: the module
  docstring; figures in docs/performance.md, "bfloat16")."""
  medians = {name: [] for name in names}
  temp = {}
  with tempfile.TemporaryDirectory() as tmp:
    for round_ in range(_PROCESSES.value):
      for i, name in enumerate(names):
        out = os.path.join(tmp, f'{round_}-{i}.json')
        argv = [sys.executable, os.path.abspath(__file__), f'--model={_MODEL.value}',
                f'--batch_size={_BATCH.value}', f'--overrides={_OVERRIDES.value}',
                f'--variants={name}', f'--steps={_STEPS.value}', f'--json={out}']
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
          result = json.load(f)[0]
        medians[name].append(result['median_ms'])
        temp[name] = result['temp_mib']
      print(f'round {round_ + 1}: ' + ', '.join(
          f'{name or "(as named)"} {medians[name][-1]:.1f} ms' for name in names), flush=True)
  first = medians[names[0]]
  print(f'{_MODEL.value} {_OVERRIDES.value}, batch {_BATCH.value}, {_PROCESSES.value} rounds '
        f'of fresh processes, each the median of {_STEPS.value} steps')
  print('| variant | median ms per round | temp MiB | vs first per round |\n|---|---|---|---|')
  results = []
  for name in names:
    ratios = [m / f for m, f in zip(medians[name], first)]
    results.append(dict(variant=name or '(as named)', median_ms=medians[name],
                        temp_mib=temp[name], ratio=ratios))
    print(f"| {name or '(as named)'} | {' / '.join(f'{m:.1f}' for m in medians[name])} | "
          f"{temp[name]:.0f} | {' / '.join(f'{r:.3f}' for r in ratios)} |")
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)


def _variants(names):
  """Each variant's (model, onednn, fused), every one built, and so validated, at once; a bad
  --model, --overrides or variant exits with one line naming it."""
  from densenet_jax.models import create_model  # pylint: disable=g-import-not-at-top
  given = f'--model={_MODEL.value}' + (f' --overrides={_OVERRIDES.value}' if _OVERRIDES.value
                                       else '')
  try:
    base = parse_settings(_OVERRIDES.value)
    create_model(_MODEL.value, **base)
  except (TypeError, ValueError) as e:   # jnp.dtype raises TypeError for an unknown name.
    sys.exit(f'ab: {given}: {e}')
  variants = []
  for name in names:
    try:
      s = {**base, **parse_settings(name)}
      flags_ = s.pop('onednn', True), s.pop('fused', True)
      variants.append((create_model(_MODEL.value, **s), *flags_))
    except (TypeError, ValueError) as e:
      sys.exit(f'ab: --variants: {name!r}: {e}')
  return variants


def main(argv):
  del argv
  names = [v.strip() for v in _VARIANTS.value.split(';')]
  if _PROCESSES.value > 0:
    _variants(names)   # a bad variant fails here, before any process starts
    _in_processes(names)
    return
  hugepages.restart_with_hugepages()
  import jax  # pylint: disable=g-import-not-at-top
  from densenet_jax.native import onednn  # pylint: disable=g-import-not-at-top

  # Every variant is built (and so validated) before anything compiles.
  models, use_onednn, use_fused = zip(*_variants(names))
  runs = []
  for name, model, flag, fused in zip(names, models, use_onednn, use_fused):
    onednn.set_enabled(flag)   # read when the step is traced
    onednn.set_bottleneck_enabled(fused)
    compiled, state, data, compile_s, temp_mib = compiled_train_step(model, _BATCH.value)
    runs.append(dict(variant=name or '(as named)', compiled=compiled, state=state, data=data,
                     compile_s=compile_s, temp_mib=temp_mib, times=[]))
    print(f'compiled {name or "(as named)"}: {compile_s:.1f} s, {temp_mib:.0f} MiB',
          flush=True)
  for round_ in range(_STEPS.value + 1):
    for run in runs:
      start = time.perf_counter()
      run['state'], metrics = run['compiled'](run['state'], run['data'])
      jax.block_until_ready(metrics)
      if round_:   # round 0 warms up
        run['times'].append(time.perf_counter() - start)
  baseline = statistics.median(runs[0]['times'])
  results = []
  print(f'{_MODEL.value} {_OVERRIDES.value}, batch {_BATCH.value}, {_STEPS.value} rounds')
  print('| variant | median ms | min ms | img/s | temp MiB | vs first |\n|---|---|---|---|---|---|')
  for run in runs:
    median = statistics.median(run['times'])
    results.append(dict(variant=run['variant'], median_ms=median * 1e3,
                        min_ms=min(run['times']) * 1e3, images_per_s=_BATCH.value / median,
                        temp_mib=run['temp_mib'], compile_s=run['compile_s'],
                        ratio=median / baseline))
    r = results[-1]
    print(f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
          f"{r['images_per_s']:.2f} | {r['temp_mib']:.0f} | {r['ratio']:.3f} |")
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
