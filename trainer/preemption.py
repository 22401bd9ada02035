"""Preemption: SIGTERM or SIGINT asks the run to stop after its current step, checkpointed.

`Watcher` installs the handlers for the length of a run (main thread only; elsewhere it
never fires) and restores the previous ones after. A second signal of the same kind goes to
the handler that was there before (a second Ctrl-C raises KeyboardInterrupt; a second SIGTERM
ends the process), at once and without a checkpoint.
`requested()` is called once per step by every process: with several processes the request
is shared (a max over processes through jax's multihost utilities), so all of them stop
after the same step and write the same checkpoint, whichever host got the signal.

The trainer then raises `Preempted`, which the entry points turn into one line and exit
code 75 (EX_TEMPFAIL: a scheduler may requeue the same command, which resumes).
"""

from __future__ import annotations

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

import errors

Preempted = errors.Preempted
EXIT_CODE = errors.Preempted.exit_code
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Watcher:
  """Records SIGTERM / SIGINT while a run trains (a context manager)."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `cmd &` in a script ignores SIGINT
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signal_name is None:
      self.signal_name = name
      logging.warning('%s: stopping after this step with a checkpoint (send it again to stop '
                      'at once, without one)', name)
      return
    previous = self._previous.get(signum)
    if callable(previous):  # Python's own SIGINT handler raises KeyboardInterrupt
      previous(signum, frame)
      return
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)

  def requested(self) -> bool:
    """Whether any process got a signal; every process must call this at every step."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    if np.max(flags) and self.signal_name is None:
      self.signal_name = 'a signal on another process'
    return bool(np.max(flags))
