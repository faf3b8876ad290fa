"""Orbax checkpoints of the whole train state and the input position, under WORKDIR/checkpoints.

One checkpoint is one step: the train state (step, params, batch statistics, optimizer state,
RNG) saved and restored as a unit, beside a small JSON record of where the input pipeline stood
(epoch and batches already consumed in it), so that a resumed run continues with the very next
batch. Orbax writes each step into a temporary directory and renames it when complete, so a
process killed in the middle of a write leaves the previous checkpoint as the latest one.
"""

import os
from typing import Any, Dict, Optional, Tuple

from absl import logging
import orbax.checkpoint as ocp


class Checkpointer:
  """Periodic, asynchronous, keep-N checkpoints of one run."""

  def __init__(self, workdir: str, *, keep: int, asynchronous: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=asynchronous,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'input'))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return self._manager.all_steps()

  def save(self, step: int, state: Any, input_position: Dict[str, int]) -> None:
    """Starts saving `state` at `step`; the write completes in the background."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            input=ocp.args.JsonSave(input_position),
        ),
        force=True,
    )

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> Tuple[Any, Dict[str, int], int]:
    """Restores the checkpoint at `step` (default: latest) onto `abstract_state`'s shardings.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (or arrays), giving
        the structure, dtypes and placement of the restored state.
      step: which checkpoint; None for the latest.

    Returns:
      (state, input_position, step).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            input=ocp.args.JsonRestore(),
        ),
    )
    logging.info('Restored checkpoint of step %d from %s', step, self.directory)
    return restored['state'], dict(restored['input']), step

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
