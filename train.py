"""Trains and evaluates a DenseNet: `python train.py --config=configs/FILE.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.model.growth_rate=24 --config.batch_size=128`.
A run resumes from the latest checkpoint in its workdir. Several processes (hosts) are joined
automatically on TPU pods, SLURM and MPI, or with --coordinator_address, --num_processes and
--process_id.
"""

if __name__ == '__main__':
  # Only as a program, and first: restarting later would waste the seconds the imports below
  # take. See densenet_jax/runtime/hugepages.py for why and when it does not restart.
  from densenet_jax.runtime import hugepages
  hugepages.restart_with_hugepages()

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from densenet_jax.training import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, results.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


class _OnlyOrbaxWarnings(py_logging.Filter):
  """Orbax logs every file it writes at INFO level; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # The flags and the config file are read while parsing, before these imports: a mistake in
  # either is one line within a second or two, not after the seconds JAX and TensorFlow take.
  from densenet_jax.runtime import buckets
  from densenet_jax.runtime import coordination
  from densenet_jax.runtime import distributed
  from densenet_jax.runtime import run_guard
  from densenet_jax.training import checkpointing
  from densenet_jax.training import trainer
  from densenet_jax.training import validation
  logging.get_absl_handler().addFilter(_OnlyOrbaxWarnings())
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _CONFIG.value.distributed)
  logging.info('GLIBC_TUNABLES=%r (see densenet_jax/runtime/hugepages.py)',
               os.environ.get('GLIBC_TUNABLES'))
  logging.info('Config:\n%s', _CONFIG.value)
  with coordination.leaving_together():  # A failing host stops the others at once.
    try:
      trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (validation.ConfigError, run_guard.WorkdirInUseError) as e:
      # A mistake in the config: the message names the field; a traceback would only bury it.
      logging.error('%s', e)
      sys.exit(f'Config error: {e}')
    except buckets.BucketError as e:  # One line: the path and why its bucket cannot be used.
      sys.exit(str(e))
    except checkpointing.RestoreError as e:  # Checkpoints that cannot be read now; none moved.
      logging.error('%s', e)
      sys.exit(f'Restore error: {e}')
    except coordination.PeerError as e:  # The processes differ or cannot follow process 0.
      logging.error('%s', e)
      sys.exit(f'Several hosts: {e}')
    except FloatingPointError as e:  # The loss diverged; the message says what to change.
      logging.error('%s', e)
      sys.exit(f'Training stopped: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
