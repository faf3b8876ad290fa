"""Several points of a sweep at once on one host, each on devices of its own (`--parallel=N`).

    python -m densenet_jax.experiments.sweep --config=FILE.py --workdir=DIR --parallel=4
    python -m densenet_jax.experiments.sweep --config=FILE.py --workdir=DIR --parallel=2 --devices_per_point=2

A small point leaves most of an 8-GPU host, a TPU VM or a many-core CPU idle. With
`--parallel=N` up to N points run at once, each an ordinary train.py process given K devices
that no other point has (K = `--devices_per_point`, by default the host's devices divided by
N). The environment of each process says which devices are its:

- GPU: `CUDA_VISIBLE_DEVICES` lists the point's K GPUs (read through the sweep's own
  `CUDA_VISIBLE_DEVICES` when that is set). JAX's memory preallocation is left as the user has
  it (by default 75% of each visible GPU, the fast path): no two points see the same GPU, so
  each may take most of its own. `XLA_PYTHON_CLIENT_PREALLOCATE=false` would make every point
  allocate on demand and fragment, and a per-point `XLA_PYTHON_CLIENT_MEM_FRACTION` would
  only matter for processes that share a GPU, which these never do. The one process that
  could hold memory on all GPUs, the sweep itself, never opens them (below).
- TPU: a chip belongs to one process at a time, so each point is a single-process "slice" of
  its chips, as Google's recipe for several processes on one TPU VM has it:
  `TPU_VISIBLE_CHIPS` (its chips), `TPU_CHIPS_PER_PROCESS_BOUNDS` (their shape),
  `TPU_PROCESS_BOUNDS=1,1,1` (one process), its own `TPU_PROCESS_PORT` and
  `TPU_PROCESS_ADDRESSES=localhost:PORT` (no two on one port), and
  `ALLOW_MULTIPLE_LIBTPU_LOAD=1` (libtpu otherwise refuses a second process on the VM; JAX's
  own CI sets it to run one test process per chip). Shapes assumed: 1 chip '1,1,1'; 2 chips
  '1,2,1', two neighbouring chips of a host's 2x2 (v4, v5p) or 2x4 (v5e, v6e) grid, so a slot
  takes consecutive chips (0,1), (2,3), ...; 4 chips '2,2,1'; 8 chips '2,4,1'. K counts chips;
  on v2/v3, whose chips are two JAX devices each, a point sees 2K devices.
- CPU: the host's cores (this process's affinity) are split between the points: each point's
  process may run only on its own cores, and the pools that size themselves are sized to them.
  XLA:CPU's and TensorFlow's pools take the number of cores from the affinity mask
  (`tsl::port::MaxParallelism`, `sched_getaffinity`); `OMP_NUM_THREADS` (oneDNN's gomp build)
  and `TF_NUM_INTRAOP_THREADS`/`TF_NUM_INTEROP_THREADS` (tf.data's pools; input_pipeline.py
  sets no thread counts of its own) are also set, so that no library guesses. A point runs
  with as many JAX CPU devices as the sweep has (one unless its XLA_FLAGS force more).
  On GPU and TPU hosts the cores are split too, so N input pipelines do not fight over them.

The platform is that of `jax.devices()` in the sweep's environment, asked of a short child
process (`probe_host`): the sweep itself runs JAX on CPU only, since on a TPU VM opening the
chips would lock every point out of them and on GPU it would preallocate memory on every GPU.
Each point's log starts its run with a line naming its devices, and sweep.json records them
in the point's `devices`. The assignment is in pure functions (`device_slots`,
`slot_environment`) so that GPU and TPU layouts are tested without such hardware.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging

from densenet_jax.experiments import launchers
from densenet_jax.experiments import plan
from densenet_jax.runtime import staging


# The shape of a point's K TPU chips, `TPU_CHIPS_PER_PROCESS_BOUNDS` (x,y,z).
TPU_BOUNDS = {1: '1,1,1', 2: '1,2,1', 4: '2,2,1', 8: '2,4,1'}
# The first point's TPU_PROCESS_PORT (libtpu's usual one); point i takes TPU_PORT + i.
TPU_PORT = 8476
_TICK = 0.5  # Seconds between looks at the running points.


class ParallelError(ValueError):
  """--parallel / --devices_per_point that this host cannot honour: one line, naming the flag."""


@dataclasses.dataclass(frozen=True)
class Slot:
  """The devices of one running point: GPU ordinals, TPU chips or CPU cores, never shared."""
  index: int
  platform: str                 # 'gpu', 'tpu' or 'cpu'
  devices: Tuple[str, ...]      # as CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS spell them; cores
  host: Tuple[str, ...]         # all of the host's, for the log line
  cores: Tuple[int, ...] = ()   # the CPU cores its process may run on (all if empty)
  jax_devices: int = 1          # JAX devices the point's process will have

  def label(self) -> str:
    """'cpu cores 0 (of 0-1)', 'CUDA_VISIBLE_DEVICES=2,3 (of 0-7), cpu cores 8-15'."""
    if self.platform == 'cpu':
      return f'cpu cores {_ranges(self.devices)} (of {_ranges(self.host)})'
    variable = 'CUDA_VISIBLE_DEVICES' if self.platform == 'gpu' else 'TPU_VISIBLE_CHIPS'
    text = f'{variable}={",".join(self.devices)} (of {_ranges(self.host)})'
    return text + (f', cpu cores {_ranges(self.cores)}' if self.cores else '')

  def record(self) -> Dict[str, object]:
    """sweep.json's `devices` of the point."""
    return {'platform': self.platform, 'ids': list(self.devices), 'cores': list(self.cores),
            'label': self.label()}


def _ranges(ids: Sequence) -> str:
  """'0-3,8' for 0,1,2,3,8; names that are not numbers (GPU UUIDs) joined as they are."""
  if not all(str(i).isdigit() for i in ids):
    return ','.join(str(i) for i in ids)
  numbers, parts = sorted(int(i) for i in ids), []
  for n in numbers:
    if parts and n == parts[-1][1] + 1:
      parts[-1][1] = n
    else:
      parts.append([n, n])
  return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in parts)


def check_flags(parallel: int, per_point: Optional[int]) -> None:
  """The checks that need no look at the host."""
  if parallel < 1:
    raise ParallelError(f'--parallel={parallel}: must be at least 1 (points at once).')
  if per_point is not None and per_point < 1:
    raise ParallelError(f'--devices_per_point={per_point}: must be at least 1.')


def device_slots(platform: str, devices: Sequence, parallel: int, per_point: Optional[int],
                 cores: Sequence[int] = (), jax_devices_per_device: int = 1) -> List[Slot]:
  """Splits a host's devices into `parallel` slots of `per_point` devices, none shared.

  Args:
    platform: 'gpu', 'tpu' or 'cpu'.
    devices: the host's GPU ordinals, TPU chip numbers, or (cpu) CPU cores, in order.
    parallel: points at once.
    per_point: devices per point; None: len(devices) // parallel, at least 1.
    cores: the host's CPU cores, split between the slots too on GPU and TPU hosts (when there
      are enough); on CPU they are `devices`.
    jax_devices_per_device: JAX devices per GPU or TPU chip (2 on TPU v2/v3); on CPU, the
      JAX devices of each point (XLA_FLAGS' forced count, else 1).

  Raises:
    ParallelError: when the host has too few devices, or a TPU slot has no known shape.
  """
  check_flags(parallel, per_point)
  if platform not in ('gpu', 'tpu', 'cpu'):
    raise ParallelError(f'--parallel: JAX\'s platform here is {platform!r}; only gpu, tpu and '
                        'cpu devices can be shared out.')
  devices = [str(d) for d in devices]
  per_point = per_point or max(1, len(devices) // parallel)
  name = {'gpu': 'GPUs', 'tpu': 'TPU chips', 'cpu': 'CPU cores'}[platform]
  if parallel * per_point > len(devices):
    raise ParallelError(
        f'--parallel={parallel} x --devices_per_point={per_point} needs '
        f'{parallel * per_point} {name}, but this host has {len(devices)} '
        f'({_ranges(devices)}); lower --parallel or --devices_per_point.')
  if platform == 'tpu' and per_point not in TPU_BOUNDS:
    raise ParallelError(
        f'--devices_per_point={per_point}: a TPU point takes 1, 2, 4 or 8 chips, the shapes '
        'TPU_CHIPS_PER_PROCESS_BOUNDS describes here.')
  core_share = len(cores) // parallel
  slots = []
  for i in range(parallel):
    own = tuple(devices[i * per_point:(i + 1) * per_point])
    if platform == 'cpu':
      own_cores = tuple(int(c) for c in own)
    else:  # A fair share of the cores for the point's input pipeline, if each gets one.
      own_cores = tuple(cores[i * core_share:(i + 1) * core_share]) if core_share else ()
    jax_devices = (jax_devices_per_device if platform == 'cpu'
                   else per_point * jax_devices_per_device)
    slots.append(Slot(i, platform, own, tuple(devices), own_cores, jax_devices))
  return slots


def slot_environment(slot: Slot, tpu_port: int = TPU_PORT) -> Dict[str, str]:
  """The variables that confine a point's process to its slot (added to the sweep's own)."""
  env = {}
  if slot.platform == 'gpu':
    env['CUDA_VISIBLE_DEVICES'] = ','.join(slot.devices)
  elif slot.platform == 'tpu':
    port = tpu_port + slot.index
    env.update(TPU_VISIBLE_CHIPS=','.join(slot.devices),
               TPU_CHIPS_PER_PROCESS_BOUNDS=TPU_BOUNDS[len(slot.devices)],
               TPU_PROCESS_BOUNDS='1,1,1', TPU_PROCESS_PORT=str(port),
               TPU_PROCESS_ADDRESSES=f'localhost:{port}', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  if slot.cores:
    threads = str(len(slot.cores))
    env.update(OMP_NUM_THREADS=threads, TF_NUM_INTRAOP_THREADS=threads,
               TF_NUM_INTEROP_THREADS=threads)
  return env


# Run in a child with the sweep's environment: what jax.devices() is there, without the sweep
# opening (and so holding) any accelerator itself.
_PROBE = '''
import json, jax
devices = jax.devices()
print(json.dumps({"platform": jax.default_backend(), "devices": [
    [d.id, list(getattr(d, "coords", None) or [])] for d in devices]}))
'''


def probe_host(environ: Optional[Dict[str, str]] = None) -> Tuple[str, List[str], int]:
  """The default backend's platform in the sweep's environment, its devices and JAX devices
  per device: (platform, GPU ordinals | TPU chips | CPU cores, count).

  Raises:
    ParallelError: when JAX cannot start in a child process.
  """
  environ = dict(os.environ if environ is None else environ)
  result = subprocess.run([sys.executable, '-c', _PROBE], env=environ, capture_output=True,
                          text=True, timeout=600, check=False)
  try:
    found = json.loads(result.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    last = (result.stderr.strip().splitlines() or ['no output'])[-1]
    raise ParallelError(f'--parallel: cannot list this host\'s devices ({last}).') from None
  platform, devices = found['platform'], found['devices']
  cores = [str(c) for c in sorted(os.sched_getaffinity(0))]
  if platform == 'cpu':
    return 'cpu', cores, len(devices)
  if platform == 'tpu':  # One entry per chip; v2/v3 chips hold two devices (cores).
    chips = list(dict.fromkeys(tuple(coords) for _, coords in devices))
    names = environ.get('TPU_VISIBLE_CHIPS', '').split(',')
    ids = names if len(names) == len(chips) else [str(i) for i in range(len(chips))]
    return 'tpu', ids, len(devices) // len(chips)
  names = environ.get('CUDA_VISIBLE_DEVICES', '').split(',')  # gpu (cuda or rocm)
  ids = names if len(names) == len(devices) else [str(i) for i in range(len(devices))]
  return 'gpu', ids, 1


def host_slots(parallel: int, per_point: Optional[int]) -> List[Slot]:
  """This host's slots for `--parallel` and `--devices_per_point`; see `device_slots`."""
  check_flags(parallel, per_point)  # Before the probe's seconds.
  platform, devices, per_device = probe_host()
  cores = sorted(os.sched_getaffinity(0))
  return device_slots(platform, devices, parallel, per_point, cores, per_device)


def _start(sweep: plan.Sweep, point: plan.Point, slot: Slot, log_path: str):
  # `log_path`: a local file (the log itself, or the cache of a remote one: staging.PointLog).
  """Starts the point confined to its slot.

  The child inherits the CPU affinity of the thread that forks it; this thread narrows its
  own affinity to the slot's cores for the moment of the fork and then widens it again. That
  needs no `preexec_fn`, which Python documents as unsafe with threads running (JAX's and
  TensorFlow's are), and it holds from the child's first instruction, before any of its
  thread pools exist.
  """
  env = dict(os.environ, **slot_environment(slot))
  mine = os.sched_getaffinity(0)
  if slot.cores:
    os.sched_setaffinity(0, slot.cores)  # 0: this thread only.
  try:
    return launchers.start_point(sweep.command(point), log_path,
                                 header=f'# devices: {slot.label()}\n', env=env)
  finally:
    if slot.cores:
      os.sched_setaffinity(0, mine)


@dataclasses.dataclass
class _Running:
  point: plan.Point
  slot: Slot
  proc: subprocess.Popen
  log: staging.PointLog


def run_parallel(sweep: plan.Sweep, slots: Sequence[Slot],
                 poll_seconds: float) -> List[plan.Point]:
  """Runs the unfinished points, one per free slot, until all have run; returns the failed.

  A failing point frees its slot for the next; Ctrl-C or SIGTERM stops every running point
  (each saves a checkpoint) and records them as interrupted, so rerunning resumes them.
  """
  progress = launchers._Progress(sweep)  # pylint: disable=protected-access
  todo = []
  for point in sweep.points:
    if point.state == 'done':
      logging.info('Point %d/%d %s: done already, skipped.', point.index + 1,
                   len(sweep.points), point.name)
    else:
      todo.append(point)
  free, running = list(slots), []
  logging.info('%d points to run, up to %d at once: %s.', len(todo), len(slots),
               '; '.join(s.label() for s in slots))
  last_poll = time.time()
  try:
    while todo or running:
      while todo and free:
        point, slot = todo.pop(0), free.pop(0)
        point.state, point.error, point.devices = 'running', None, slot.record()
        sweep.save()
        log = staging.PointLog(sweep.point_workdir(point))
        logging.info('Point %d/%d %s: running on %s (log: %s).', point.index + 1,
                     len(sweep.points), point.name, slot.label(), log.path)
        running.append(_Running(point, slot, _start(sweep, point, slot, log.local), log))
      time.sleep(min(_TICK, poll_seconds))
      for entry in [r for r in running if r.proc.poll() is not None]:
        running.remove(entry)
        free = sorted(free + [entry.slot], key=lambda s: s.index)
        launchers.record_outcome(sweep, entry.point, entry.proc.returncode, entry.log.local,
                                 progress)
        entry.log.close()
      if running and time.time() - last_poll >= poll_seconds:
        last_poll = time.time()
        for entry in running:
          entry.log.upload()
          try:  # Only a display: a failed read of a remote progress.json must not stop it.
            logging.info('%s [%s]', progress.line(entry.point), entry.slot.label())
          except Exception as e:  # pylint: disable=broad-except
            logging.warning('Could not show the progress (%s: %s).', type(e).__name__,
                            str(e)[:200])
  except BaseException:  # Ctrl-C or SIGTERM: stop every point (each checkpoints), then exit.
    _stop(sweep, running)
    raise
  return [p for p in sweep.points if p.state == 'failed']


def _stop(sweep: plan.Sweep, running: Sequence[_Running]) -> None:
  """SIGTERM to every running point, then waits for their checkpoints; states saved even if
  the wait is cut short by a second interrupt."""
  for entry in running:
    if entry.proc.poll() is None:
      entry.proc.send_signal(signal.SIGTERM)
  try:
    for entry in running:
      entry.proc.wait()
  finally:
    for entry in running:
      entry.point.state = 'done' if sweep.is_done(entry.point) else 'interrupted'
      entry.log.close()
    sweep.save()
