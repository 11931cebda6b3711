"""Several processes, one run: barriers and an agreed stop, on public APIs.

* :func:`barrier` waits for every process at the coordination service of
  ``jax.distributed`` (Orbax's public barrier over it; JAX exposes none of its
  own), never through a device collective: on CPU the collectives (gloo) give a
  process 30 s to meet its peers the first time a group of devices is used,
  less than a compilation can take on a busy host, and a barrier of that kind
  would share the limit.
* :class:`StopFlag` turns SIGTERM and SIGINT into a stop at a step every process
  agrees on. With one process it is a plain signal handler. With several, JAX's
  preemption service (``jax_enable_preemption_service``, on by default) owns
  SIGTERM: a notice to any process reaches all of them through the coordination
  service, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
  turns true at the same step on every process. SIGINT (Ctrl-C) is forwarded to
  the process as SIGTERM, so it takes the same path. This is also how a Cloud TPU
  VM's preemption notice (a SIGTERM) becomes a saved checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

DEFAULT_TIMEOUT_S = 3600


def barrier(tag: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """Waits until every process reaches ``tag`` (a new tag for each call); a no-op for one process."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost as orbax_multihost  # pylint: disable=g-import-not-at-top
  orbax_multihost.get_barrier_sync_fn()(key=tag, timeout_ms=timeout_s * 1000)


class StopFlag:
  """Set by SIGTERM / SIGINT; :meth:`requested` says, at the same step on every process, when to stop.

  Every process must call :meth:`requested` at every step, starting from the
  same step (the loop does).
  """

  _instances = 0  # every process creates its flags in the same order: an id shared by the processes

  def __init__(self):
    self.signum = None
    self._previous = {}
    self.run_id = StopFlag._instances
    StopFlag._instances += 1
    self._distributed = jax.process_count() > 1
    if threading.current_thread() is not threading.main_thread():
      return
    # With several processes JAX's preemption notifier handles SIGTERM: installing a Python handler would replace it.
    signals = (signal.SIGINT,) if self._distributed else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    logging.warning("Received %s: finishing the current step, saving a checkpoint and exiting.",
                    signal.Signals(signum).name)
    if self._distributed:
      os.kill(os.getpid(), signal.SIGTERM)  # the preemption service tells the other processes

  def requested(self, step: int) -> bool:
    """Whether to stop after ``step``; with several processes, the same answer on all of them."""
    if not self._distributed:
      return self.signum is not None
    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
      logging.warning("A preemption notice (SIGTERM) reached the processes: stopping after step %d on all of them, "
                      "saving a checkpoint and exiting.", step)
      return True
    return False

  def restore(self) -> None:
    """Puts the previous signal handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
