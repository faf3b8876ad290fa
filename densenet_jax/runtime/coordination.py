"""One decision for all processes of a multi-process run, and a prompt stop when one is lost.

The processes of a run must agree on what they restore and on the data they read, and they must
stop together: a process that differs, fails or dies leaves the others waiting in the next
collective. Here process 0 decides and the others follow, through the key-value store of JAX's
coordination service (started by `jax.distributed.initialize` on process 0):

* the checkpoint step to restore (or the error that refuses the workdir) is process 0's, after
  its own retries and quarantine; the others restore exactly that step or all stop;
* a folder dataset's listing is compared class by class, failing on the first difference;
* a watchdog thread in each process publishes a heartbeat and reads the others'. A process that
  is silent for `heartbeat_timeout_seconds`, or that reports a failure, stops every other one
  with one line naming it, instead of a hang or JAX's abort with a stack trace.

In a single process every function here does nothing, or just calls through.
See docs/design.md#several-hosts-one-decision for why it is built this way.
"""

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import jax

from densenet_jax.runtime import jax_internals

_PREFIX = 'densenet_jax/'
# A process whose peer reported a failure gives its own main thread this long to fail likewise
# and exit with its own message, before it stops with the peer's.
_GRACE_SECONDS = 5.0
# How long process 0 outlives the others' exit once they have said they leave.
_LEAVE_SECONDS = 1.0
_state = {'decision_timeout': 600.0, 'rounds': 0, 'watchdog': None}


class PeerError(RuntimeError):
  """Another process of the run failed, differs from process 0, or cannot follow it."""


def _client():
  return jax_internals.coordination_client()


def multiprocess() -> bool:
  return jax.process_count() > 1 and _client() is not None


def _key(name: str) -> str:
  return _PREFIX + name


def _get(key: str, timeout_s: float, what: str) -> str:
  try:
    return _client().blocking_key_value_get(key, int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except
    raise PeerError(f'No answer from the other processes within {timeout_s:.0f} s while {what} '
                    f'({type(e).__name__}: {str(e).splitlines()[0][:200]}).') from None


def _next_round(name: str) -> str:
  """A key prefix that is new for every exchange; processes make exchanges in the same order."""
  _state['rounds'] += 1
  return f'{name}/{_state["rounds"]}/'


def lead_decides(name: str, decide: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
  """Process 0's `decide()` (a JSON-able dict), handed to every process.

  Args:
    name: what is decided, for the key and for messages.
    decide: called on process 0 only. An exception it raises is returned to the other processes
      as {'error': type name, 'message': text} and re-raised on process 0.
  """
  if not multiprocess():
    return decide()
  key = _key(_next_round(name) + 'decision')
  if jax.process_index() == 0:
    try:
      decision = decide()
    except Exception as e:
      _client().key_value_set(key, json.dumps({'error': type(e).__name__, 'message': str(e)}))
      raise
    _client().key_value_set(key, json.dumps(decision))
    return decision
  return json.loads(_get(key, _state['decision_timeout'],
                         f'waiting for process 0 to decide {name}'))


def all_succeed(name: str, error: Optional[BaseException]) -> None:
  """Raises PeerError in every process if `error` is not None in any (after all have reported)."""
  if not multiprocess():
    if error is not None:
      raise error
    return
  prefix = _key(_next_round(name))
  mine = '' if error is None else f'{type(error).__name__}: {error}'
  _client().key_value_set(prefix + str(jax.process_index()), mine)
  failed = []
  for p in range(jax.process_count()):
    message = _get(prefix + str(p), _state['decision_timeout'], f'{name} (process {p})')
    if message:
      failed.append(f'process {p}: {message}')
  if failed:
    raise PeerError(f'Not every process could {name}: {"; ".join(failed)}') from error


def restore_as_process_0_decides(restore_latest: Callable[[], Optional[tuple]],
                                 restore_step: Callable[[int], tuple],
                                 errors: Tuple[type, ...] = ()) -> Optional[tuple]:
  """Restores the checkpoint that process 0 picks, in every process, or stops them all.

  Args:
    restore_latest: process 0's own choice, with its retries and quarantine: None (no
      checkpoint) or a tuple whose last item is the restored step.
    restore_step: restores exactly the given step, in each other process.
    errors: exception types that a refusal on process 0 is raised as in every process, with
      its message (others become PeerError).

  Returns:
    What restore_latest (process 0) or restore_step (the others) returned.

  Raises:
    PeerError: another process could not restore the chosen step.
  """
  restored = None

  def decide():
    nonlocal restored
    restored = restore_latest()
    return {'step': None if restored is None else int(restored[-1])}

  decision = lead_decides('the checkpoint to restore', decide)
  if 'error' in decision:
    kind = next((e for e in errors if e.__name__ == decision['error']), None)
    if kind is not None:
      raise kind(decision['message'])
    raise PeerError(f'Process 0 could not restore ({decision["error"]}: {decision["message"]}).')
  error = None
  if jax.process_index() > 0 and decision['step'] is not None:
    try:
      restored = restore_step(decision['step'])
    except Exception as e:  # pylint: disable=broad-except
      error = e
  all_succeed(f'restore checkpoint {decision["step"]}, which process 0 restored', error)
  return restored


def check_same_listing(list_files: Callable[[], Optional[Dict[str, Dict[str, list]]]]) -> None:
  """Stops every process, naming the first difference, unless all list the same dataset.

  Args:
    list_files: gives {split: {class: [file names]}} of this process (a folder dataset), else
      None; called only in a multi-process run.

  Raises:
    PeerError: in every process when any process's listing differs from process 0's.
  """
  if not multiprocess():
    return
  listing = list_files()
  if listing is None:
    return
  round_ = _next_round('listing')
  digests = {f'{split}/{name}': hashlib.sha256('\n'.join(files).encode()).hexdigest()[:16]
             for split, classes in listing.items() for name, files in classes.items()}
  client, me = _client(), jax.process_index()
  client.key_value_set(_key(f'{round_}{me}'), json.dumps(digests))
  tables = [json.loads(_get(_key(f'{round_}{p}'), _state['decision_timeout'],
                            f'comparing dataset listings (process {p})'))
            for p in range(jax.process_count())]
  lead = tables[0]
  for p, table in enumerate(tables[1:], 1):
    if table == lead:
      continue
    for entry in sorted(set(lead) | set(table)):
      if lead.get(entry) == table.get(entry):
        continue
      split, name = entry.split('/', 1)
      if entry not in table or entry not in lead:
        where = 'process 0' if entry in lead else f'process {p}'
        raise PeerError(f'The processes list different datasets: class {name!r} of split '
                        f'{split!r} is only seen by {where}. Every process must see the same '
                        'files (config.dataset.data_dir).')
      # Both have the class: exchange its files (one class, not the whole dataset).
      if me in (0, p):
        client.key_value_set(_key(f'{round_}files/{me}'),
                             json.dumps(listing[split][name]))
      files = [json.loads(_get(_key(f'{round_}files/{q}'), _state['decision_timeout'],
                               'comparing dataset listings')) for q in (0, p)]
      first = next((i for i, (a, b) in enumerate(zip(*files)) if a != b),
                   min(len(files[0]), len(files[1])))
      at = lambda f: repr(f[first]) if first < len(f) else 'nothing (it has fewer files)'
      raise PeerError(f'The processes list different datasets: in {split}/{name}, file '
                      f'{first + 1} is {at(files[0])} on process 0 and {at(files[1])} on '
                      f'process {p}. Every process must see the same files '
                      '(config.dataset.data_dir).')


class _Watchdog(threading.Thread):
  """Publishes this process's heartbeat and stops it when another process is lost or failed."""

  def __init__(self, timeout_s: float):
    super().__init__(name='densenet_jax watchdog', daemon=True)
    self.timeout_s = timeout_s
    self.interval_s = max(0.2, min(2.0, timeout_s / 10))
    # Set when this process leaves ('done' or 'failed:' and why): published instead of beats.
    self.final: Optional[str] = None
    self.stopped = threading.Event()

  def publish(self, value: str) -> None:
    _client().key_value_set(_key(f'alive/{jax.process_index()}'), value, allow_overwrite=True)

  def peers(self) -> Dict[int, str]:
    """The latest value each other process published."""
    me = jax.process_index()
    values = {int(k.rsplit('/', 1)[-1]): v for k, v in _client().key_value_dir_get(_key('alive/'))}
    return {p: v for p, v in values.items() if p != me}

  def run(self):
    count, beat = jax.process_count(), 0
    start = last_answer = time.monotonic()
    seen = {p: (None, start) for p in range(count) if p != jax.process_index()}
    peer_failed_at = None
    while not self.stopped.wait(self.interval_s):
      now = time.monotonic()
      try:
        beat += 1
        self.publish(self.final or str(beat))
        values = self.peers()
        last_answer = now
      except Exception as e:  # pylint: disable=broad-except
        if jax.process_index() != 0 and now - last_answer > self.timeout_s:
          _stop_now(f'Lost process 0 of {count}, the coordinator: no answer for '
                    f'{now - last_answer:.0f} s ({str(e).splitlines()[0][:120]}).')
        continue
      for p, (value, since) in seen.items():
        current = values.get(p)
        if current == 'done':
          continue
        if current and current.startswith('failed:'):
          # A process that fails itself leaves with its own message (often the same one).
          peer_failed_at = peer_failed_at or now
          if self.final is None and now - peer_failed_at > _GRACE_SECONDS:
            _stop_now(f'Process {p} of {count} stopped with an error, so this one stops too: '
                      f'{current[len("failed:"):]}')
          continue
        if current != value:
          seen[p] = (current, now)
        elif now - since > self.timeout_s:
          _stop_now(f'Lost process {p} of {count}: no heartbeat for {now - since:.0f} s (it '
                    'died, hangs, or its host is unreachable).')


def _stop_now(message: str) -> None:
  """Exits this process at once with `message`: the main thread may be stuck in a collective."""
  message += ' Stopping; rerun every process with the same command to resume.'
  logging.error('%s', message)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(message + '\n')
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def start(heartbeat_timeout_s: float, decision_timeout_s: float) -> None:
  """Starts the watchdog of a multi-process run (after jax.distributed.initialize)."""
  _state['decision_timeout'] = float(decision_timeout_s)
  if multiprocess() and _state['watchdog'] is None:
    _state['watchdog'] = _Watchdog(float(heartbeat_timeout_s))
    _state['watchdog'].start()


def _leave(watchdog: _Watchdog, value: str) -> None:
  """Tells the others how this process ends; on failure, waits until each has left or is
  found lost (then the watchdog exits this process, naming it)."""
  watchdog.final = value
  try:
    watchdog.publish(value)
  except Exception:  # pylint: disable=broad-except
    pass  # The coordinator is gone; the watchdog names it.
  if value == 'done':
    watchdog.stopped.set()
    return
  deadline = time.monotonic() + watchdog.timeout_s + 2 * _GRACE_SECONDS
  while time.monotonic() < deadline:
    try:
      values = watchdog.peers()
      if all(v == 'done' or v.startswith('failed:') for v in values.values()) and (
          len(values) == jax.process_count() - 1):
        break
    except Exception:  # pylint: disable=broad-except
      pass
    time.sleep(watchdog.interval_s / 2)
  _leave_in_order(deadline)


def _leave_in_order(deadline: float) -> None:
  """Process 0 hosts the coordination service, and JAX aborts any process whose service goes
  away while it still runs (SIGABRT instead of our exit and message). So the others say that
  they are leaving and exit; process 0 waits for that, and a moment more, and leaves last."""
  me = jax.process_index()
  try:
    if me != 0:
      _client().key_value_set(_key(f'left/{me}'), '1')
      return
    for p in range(1, jax.process_count()):
      remaining = max(0.0, deadline - time.monotonic())
      _client().blocking_key_value_get(_key(f'left/{p}'), max(1, int(remaining * 1000)))
    time.sleep(_LEAVE_SECONDS)
  except Exception:  # pylint: disable=broad-except
    pass  # A process that never said so is lost: there is nothing left to wait for.


@contextlib.contextmanager
def leaving_together():
  """Around a multi-process run: tells the others at once how this process ends.

  A process that fails (an exception, or sys.exit with a message) reports it, waits until the
  others have left or one is found lost, and exits without JAX's shutdown barrier, where it
  could wait for processes stuck in a collective with it. A process that sees another fail
  stops too, with that process's message.
  """
  watchdog = _state['watchdog']
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if watchdog is None or (isinstance(e, SystemExit) and e.code in (0, None)):
      raise
    message = str(e.code) if isinstance(e, SystemExit) else f'{type(e).__name__}: {e}'
    first_line = message.strip().splitlines()[0] if message.strip() else type(e).__name__
    if not isinstance(e, SystemExit):
      logging.exception('Process %d failed.', jax.process_index())
    _leave(watchdog, 'failed:' + first_line[:2000])
    logging.flush()
    sys.stdout.flush()
    sys.stderr.write(message + '\n')
    sys.stderr.flush()
    code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
    os._exit(code)  # pylint: disable=protected-access
  if watchdog is not None:
    _leave(watchdog, 'done')
