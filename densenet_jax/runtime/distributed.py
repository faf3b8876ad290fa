"""Starting `jax.distributed` when a run spans several processes (hosts)."""

import os
from typing import Any, Optional

from absl import logging
import jax

from densenet_jax.runtime import coordination

# Environment variables by which TPU pods, SLURM and MPI launchers announce several processes;
# jax.distributed.initialize() reads the coordinator and process ids from them itself.
_CLUSTER_HINTS = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                  'JAX_COORDINATOR_ADDRESS')


def _several(name: str) -> bool:
  try:
    return int(os.environ.get(name, '1')) > 1
  except ValueError:
    return False


def initialize(coordinator_address: Optional[str], num_processes: Optional[int],
               process_id: Optional[int], timeouts: Any) -> None:
  """Joins this process to a multi-process JAX run, if it is one.

  With an explicit coordinator (e.g. '127.0.0.1:1234', as for several processes on one
  machine) the given process count and id are used; otherwise the cluster is auto-detected on
  TPU pods, SLURM (`srun`) and Open MPI. A single process starts nothing.

  Args:
    coordinator_address: host:port of process 0, or None to detect the cluster.
    num_processes: processes in the run (with coordinator_address).
    process_id: this process (with coordinator_address).
    timeouts: config.distributed (configs/base.py).
  """
  explicit = coordinator_address is not None
  detected = (any(os.environ.get(v) for v in _CLUSTER_HINTS)
              or _several('SLURM_NTASKS') or _several('OMPI_COMM_WORLD_SIZE'))
  if not explicit and not detected:
    return
  if jax.config.jax_platforms in (None, '', 'cpu') and explicit:
    # CPU processes need a collectives implementation to form one run (tests, local debugging).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  heartbeat = int(timeouts.heartbeat_timeout_seconds)
  # JAX's own heartbeat is the backstop: it aborts with a stack trace, where the watchdog of
  # densenet_jax.runtime.coordination, which fires first, stops with one line naming the lost
  # process.
  settings = dict(initialization_timeout=int(timeouts.initialization_timeout_seconds),
                  heartbeat_timeout_seconds=2 * heartbeat + 10,
                  shutdown_timeout_seconds=int(timeouts.shutdown_timeout_seconds))
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **settings)
  else:
    jax.distributed.initialize(**settings)
  coordination.start(heartbeat, timeouts.decision_timeout_seconds)
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
