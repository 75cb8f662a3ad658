"""Preemption notices: SIGTERM on any process stops every process at the same step (system code).

A Python handler only records the notice, so a signal that arrives while XLA compiles, a
checkpoint is restored or an evaluation runs is kept and acted on at the next step boundary. On
several processes the flags are all-gathered at every step boundary, so all processes agree on the
step at which to save and exit.

This handler replaces JAX's own preemption notifier: both cannot own SIGTERM, and JAX's is
installed by `jax.distributed.initialize` and swallows the signal unless the loop polls
`reached_preemption_sync_point`. `install()` therefore turns JAX's notifier off and must run
before `jax.distributed.initialize` (jcdm.main does this), so no notice is lost in between.
"""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np

log = logging.getLogger(__name__)


class PreemptionWatcher:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._notice = False
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self._notice:
            log.warning(
                "received %s: will save and exit at the next step boundary",
                signal.Signals(signum).name,
            )
        self._notice = True

    @property
    def local_notice(self) -> bool:
        return self._notice

    def should_stop(self) -> bool:
        """True on every process once any process has received a notice (a collective call:
        every process must call it at the same step)."""
        if jax.process_count() == 1:
            return self._notice
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._notice, np.int32))
        return bool(np.any(flags))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_active: PreemptionWatcher | None = None


def active() -> PreemptionWatcher | None:
    return _active


def install() -> PreemptionWatcher:
    """The process-wide watcher, installed on the first call (from the main thread)."""
    global _active
    if _active is None:
        jax.config.update("jax_enable_preemption_service", False)
        _active = PreemptionWatcher()
    return _active


def uninstall() -> None:
    """Give SIGTERM back to its previous handler (for in-process callers such as tests)."""
    global _active
    if _active is not None:
        _active.restore()
        _active = None
