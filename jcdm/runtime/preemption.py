"""Preemption notices: SIGTERM on any process stops every process after the same step (system
code), with no device collective or host-device sync in the step loop. SIGINT (Ctrl-C) and SIGHUP
(a closed terminal) stop the same way, but the trainer then exits `exit_codes.INTERRUPTED`, which
the launchers do not retry; a second SIGINT/SIGHUP exits at once (`PreemptionWatcher`).

A Python handler only records the notice, so a signal that arrives while XLA compiles, a
checkpoint is restored or an evaluation runs is kept and acted on at the next step boundary.

Agreement on several processes (`StopAgreement`): once a process knows of a notice, it proposes
to stop at the step boundary its main thread reaches next. Knowledge spreads through the
coordination service's key-value store: a background thread on every process polls the
`jcdm/preempt/` directory and, as soon as it sees a proposal (or its own process got the signal),
posts its own. The stop step is the largest proposal. The loop's check at each boundary is a lock
and a comparison; only at its own proposal, if some proposals are still missing, does a process
wait, and then only for the other processes' background threads, never for their main threads
(which may be blocked on collectives of steps already dispatched), so the wait cannot deadlock.
No process passes its own proposal before it knows them all, and the stop step is at least every
proposal, so every process stops after exactly the same step. Cost per step: nothing on the
device; one key-value read per process every `poll_s` seconds in a thread.

This handler replaces JAX's own preemption notifier: both cannot own SIGTERM, and JAX's is
installed by `jax.distributed.initialize` and swallows the signal unless the loop polls
`reached_preemption_sync_point`. `install()` therefore turns JAX's notifier off and must run
before `jax.distributed.initialize` (jcdm.main does this), so no notice is lost in between.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Protocol

import jax

from jcdm import exit_codes

log = logging.getLogger(__name__)

PREFIX = "jcdm/preempt/"


class KeyValueStore(Protocol):
    """The two calls of the coordination service's client that the agreement uses."""

    def key_value_set(self, key: str, value: str) -> None: ...

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]: ...


class StopAgreement:
    """Agree on the step after which all `num_processes` stop (see the module docstring).

    `notice` is this process's local flag (a callable, read by the thread); `begin(step, stride)`
    is called when the loop starts; `should_stop(step)` at every step boundary of the main thread.
    """

    def __init__(
        self,
        kv: KeyValueStore,
        *,
        process_index: int,
        num_processes: int,
        notice,
        poll_s: float = 0.25,
    ):
        self.kv, self.me, self.n = kv, process_index, num_processes
        self.notice, self.poll_s = notice, poll_s
        self._lock = threading.Lock()
        self._boundary: int | None = None  # the last boundary the main thread passed
        self._stride = 1
        self._proposal: int | None = None
        self._stop_step: int | None = None
        self._agreed = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, step: int, stride: int) -> None:
        with self._lock:
            self._boundary, self._stride = step, stride
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="jcdm-preempt", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread. Only once the whole job has ended (the trainer never closes it
        before its final barrier): a process that finished must still answer a late notice of
        another, which waits for this process's proposal."""
        self._closed.set()

    @property
    def stop_step(self) -> int | None:
        return self._stop_step

    def should_stop(self, step: int) -> bool:
        with self._lock:
            self._boundary = step
            proposal = self._proposal
        if proposal is None or step < proposal:
            return self._stop_step is not None and step >= self._stop_step
        if self._stop_step is None:  # at our own proposal: the others' threads will post theirs
            t0 = time.monotonic()
            while not self._agreed.wait(1.0):
                if time.monotonic() - t0 > 30:
                    log.warning("still waiting for every process to agree on the preemption step")
                    t0 = time.monotonic()
        return step >= self._stop_step

    def _poll(self) -> None:
        try:
            while not self._closed.is_set() and not self._agreed.is_set():
                proposals = self._proposals()
                if self._proposal is None and (proposals or self.notice()):
                    with self._lock:  # the main thread's next boundary is the proposal
                        self._proposal = self._boundary + self._stride
                    self.kv.key_value_set(f"{PREFIX}{self.me}", str(self._proposal))
                    proposals[self.me] = self._proposal
                    log.warning(
                        "preemption: process %d proposes to stop after step %d",
                        self.me,
                        self._proposal,
                    )
                if len(proposals) == self.n:
                    self._stop_step = max(proposals.values())
                    log.warning("preemption: every process stops after step %d", self._stop_step)
                    self._agreed.set()
                    return
                self._closed.wait(self.poll_s)
        except Exception:  # e.g. the coordination service went away with a dead peer
            if not self._closed.is_set():
                log.exception("preemption agreement thread failed")

    def _proposals(self) -> dict[int, int]:
        return {int(k.rsplit("/", 1)[1]): int(v) for k, v in self.kv.key_value_dir_get(PREFIX)}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
INTERRUPTS = (signal.SIGINT, signal.SIGHUP)
"""The user's decision (Ctrl-C, a closed terminal): save, then exit INTERRUPTED, not retried."""


class PreemptionWatcher:
    """Owns SIGTERM, SIGINT and SIGHUP: any of them stops the run at the next step boundary,
    after a save. A second SIGINT or SIGHUP exits at once (INTERRUPTED, nothing saved).

    The signals are counted by a thread that reads Python's signal wakeup pipe, not by the
    Python-level handler: that handler only runs when the main thread next executes Python
    bytecode, which can be minutes away while XLA compiles or a collective waits, and a second
    Ctrl-C must act at once. The handler raises nothing, so no KeyboardInterrupt can surface (and
    be swallowed) inside a library callback, such as JAX's garbage-collection hook.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self._notice = False
        self.first_signal: int | None = None
        self._interrupts = 0
        self._lock = threading.Lock()
        self._previous = {}
        self._agreement: StopAgreement | None = None
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup_fd = -1
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._start_wakeup_reader()

    def _start_wakeup_reader(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)  # the C-level handler must never block
        try:
            self._old_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: the Python-level handler counts instead
            os.close(r)
            os.close(w)
            return
        self._wakeup = (r, w)
        threading.Thread(
            target=self._read_wakeups, args=(r,), name="jcdm-signals", daemon=True
        ).start()

    def _read_wakeups(self, r: int) -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self._previous:
                    self._note(signum)

    def _handle(self, signum, frame) -> None:
        if self._wakeup is None:
            self._note(signum)

    def _note(self, signum: int) -> None:
        with self._lock:
            first = not self._notice
            self._notice = True
            if signum in INTERRUPTS:
                self._interrupts += 1
                if self.first_signal not in INTERRUPTS:  # the user's decision outranks a notice
                    self.first_signal = signum
            elif self.first_signal is None:
                self.first_signal = signum
            again = signum in INTERRUPTS and self._interrupts >= 2
        name = signal.Signals(signum).name
        if again:
            log.error(
                "received %s again: exiting at once without saving (exit %d); the last committed "
                "checkpoint is kept, rerun the same command to resume from it",
                name,
                exit_codes.INTERRUPTED,
            )
            for h in logging.getLogger().handlers:
                h.flush()
            os._exit(exit_codes.INTERRUPTED)
        if first and signum in INTERRUPTS:
            log.warning(
                "received %s: will save at the next step boundary and exit %d (not restarted by "
                "the launchers); %s again exits at once without saving",
                name,
                exit_codes.INTERRUPTED,
                name,
            )
        elif first:
            log.warning("received %s: will save and exit at the next step boundary", name)

    @property
    def interrupted(self) -> bool:
        """The notice came from the user (SIGINT or SIGHUP), not a preemption (SIGTERM)."""
        return self.first_signal in INTERRUPTS

    @property
    def local_notice(self) -> bool:
        return self._notice

    def begin(self, step: int, stride: int = 1) -> None:
        """The loop starts after `step` and advances `stride` steps per boundary."""
        if jax.process_count() == 1:
            return
        if self._agreement is None:
            from jax._src import distributed as _dist

            self._agreement = StopAgreement(
                _dist.global_state.client,
                process_index=jax.process_index(),
                num_processes=jax.process_count(),
                notice=lambda: self._notice,
            )
        self._agreement.begin(step, stride)

    def should_stop(self, step: int | None = None) -> bool:
        """True at the boundary after `step` on every process once any process has received a
        notice: all processes return True after the same step (call it at every boundary)."""
        if self._agreement is None:
            return self._notice
        return self._agreement.should_stop(step)

    def restore(self) -> None:
        if self._agreement is not None:
            self._agreement.close()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            os.close(self._wakeup[1])  # the reader sees EOF and ends
            self._wakeup = None


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
    """Give SIGTERM, SIGINT and SIGHUP back to their previous handlers (for in-process callers
    such as tests)."""
    global _active
    if _active is not None:
        _active.restore()
        _active = None
