"""Stall detection: a process whose training makes no progress ends the job (system code).

The loop reports every completed step (`progress.beat`); compile, restore, evaluation, saves and
the preemption wait are excluded (`progress.paused()`), as is everything before the loop starts.
A monitor thread checks once a second. When no step has completed for `StallConfig.timeout_s`
(or for `slow_step_factor` times the slowest step seen, whichever is longer, so a healthy run
cannot trip it however slow its steps are), the process decides whose fault it is from where its
main thread is:

- in our or a library's Python code (e.g. a deadlock or an I/O call that never returns): this
  process is the stalled one. It writes every thread's stack to its log, tells its peers (over
  the peer watchdog connections of `jcdm.runtime.peers`) and exits 1 (FAILURE, retried).
- inside JAX (waiting on the device or on a collective with a peer): it waits `in_jax_grace_s`
  more for the stalled peer to say so, then stops the same way, naming itself as waiting.

A process that is stopped altogether (SIGSTOP, a frozen VM) runs no thread at all; its peers see
its heartbeats stop (`peer_silence_s`, see `jcdm.runtime.peers`) and end the job naming it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time

import gin

from jcdm import exit_codes

log = logging.getLogger(__name__)

# Frames of these files mean "waiting on devices or peers", not stalled here.
WAITING_IN = (os.sep + "jax" + os.sep, os.sep + "jaxlib" + os.sep, "jcdm/runtime/preemption.py")


@gin.configurable(module="jcdm")
class StallConfig:
    """When a process counts as stalled (see the module docstring).

    `timeout_s`: no completed step for this long (excluded phases aside) is a stall; the default
    (30 minutes) is far above any healthy step. `slow_step_factor`: the limit is never below this
    many times the slowest step seen. `in_jax_grace_s`: extra time a process waiting inside JAX
    gives its peers to report their own stall. `peer_silence_s`: a peer whose heartbeats stop for
    this long is stalled (stopped or frozen). It must stay well below JAX's own detection, which
    aborted the survivor (SIGABRT, no name) 18 s after a SIGSTOP with `initialize`'s
    heartbeat_timeout of 30 s (measured). `heartbeat_s`: seconds between heartbeats. `enabled`:
    False turns the local check and the heartbeats off (the peer watchdog still reports dead
    peers).
    """

    def __init__(
        self,
        *,
        timeout_s: float = 1800.0,
        slow_step_factor: float = 20.0,
        in_jax_grace_s: float = 10.0,
        peer_silence_s: float = 10.0,
        heartbeat_s: float = 1.0,
        enabled: bool = True,
    ):
        if min(timeout_s, slow_step_factor, peer_silence_s, heartbeat_s) <= 0:
            raise ValueError(
                "StallConfig needs positive timeout_s, slow_step_factor, "
                "peer_silence_s and heartbeat_s"
            )
        if peer_silence_s < 3 * heartbeat_s:
            raise ValueError(
                f"StallConfig.peer_silence_s={peer_silence_s} must be at least 3 heartbeats "
                f"(heartbeat_s={heartbeat_s}), or a late heartbeat reads as a stopped peer"
            )
        self.timeout_s = timeout_s
        self.slow_step_factor = slow_step_factor
        self.in_jax_grace_s = in_jax_grace_s
        self.peer_silence_s = peer_silence_s
        self.heartbeat_s = heartbeat_s
        self.enabled = enabled


class Progress:
    """The main thread's progress, read by the monitor and the heartbeat threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.step = -1
        self._t = time.monotonic()
        self._paused = 0
        self._on_device = 0
        self._armed = False
        self.slowest_s = 0.0

    def start(self, step: int) -> None:
        """The loop starts after `step`: from now on a missing step counts."""
        with self._lock:
            self.step, self._t, self._armed, self.slowest_s = step, time.monotonic(), True, 0.0

    def stop(self) -> None:
        with self._lock:
            self._armed = False

    def beat(self, step: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.slowest_s = max(self.slowest_s, now - self._t)
            self.step, self._t = step, now

    @contextlib.contextmanager
    def paused(self):
        """A phase that may legitimately take long (compile, save, evaluation)."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._t = time.monotonic()  # the phase's time is not a step's

    @contextlib.contextmanager
    def on_device(self):
        """The main thread hands work to the devices (a compiled call may block in C++, where
        no Python frame shows that it waits on the devices and the peers behind them)."""
        self._on_device += 1
        try:
            yield
        finally:
            self._on_device -= 1

    @property
    def is_paused(self) -> bool:
        return self._paused > 0

    @property
    def is_on_device(self) -> bool:
        return self._on_device > 0

    def idle_s(self) -> float:
        """Seconds since the last step, 0 while paused or outside the loop."""
        with self._lock:
            if not self._armed or self._paused:
                return 0.0
            return time.monotonic() - self._t


progress = Progress()


def main_thread_location() -> tuple[str, bool]:
    """(where, waiting) for the main thread: its innermost frame (and innermost jcdm frame), and
    whether any frame of its stack is inside JAX (devices, collectives) or the preemption
    agreement, i.e. waiting on someone else rather than stuck itself."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "unknown", False
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    fmt = lambda f: f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"
    where = fmt(stack[0])
    ours = next((f for f in stack if f"{os.sep}jcdm{os.sep}" in f.f_code.co_filename), None)
    if ours is not None and ours is not stack[0]:
        where += f" (called from {fmt(ours)})"
    waiting = any(w in f.f_code.co_filename for f in stack for w in WAITING_IN)
    return where, waiting


def dump_stacks(reason: str) -> None:
    """Every thread's stack to stderr (the process's log), after a line saying why."""
    sys.stderr.write(f"\n=== jcdm: stacks of every thread of process {_me()} ({reason}) ===\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()


def die(message: str) -> None:
    """Log `message` and end this process with FAILURE at once (the launcher restarts the job)."""
    log.error(
        "%s; exiting with code %d so the launcher can restart the job", message, exit_codes.FAILURE
    )
    logging.shutdown()
    sys.stderr.flush()
    os._exit(exit_codes.FAILURE)


class Monitor:
    """The thread that applies `StallConfig` to `progress` (see the module docstring)."""

    def __init__(self, cfg: StallConfig, announce=None, check_s: float = 1.0):
        self.cfg = cfg
        self.announce = announce or (lambda why: None)  # tells the peers (jcdm.runtime.peers)
        self.check_s = check_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jcdm-stall-monitor", daemon=True)

    def limit_s(self) -> float:
        return max(self.cfg.timeout_s, self.cfg.slow_step_factor * progress.slowest_s)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            idle, limit = progress.idle_s(), self.limit_s()
            if idle <= limit:
                continue
            where, waiting = main_thread_location()
            waiting = waiting or progress.is_on_device
            if waiting and idle <= limit + self.cfg.in_jax_grace_s:
                continue  # a stalled peer should say so first
            state = "waiting inside JAX for a device or a peer" if waiting else "stalled"
            why = (
                f"process {_me()} {state}: no training step completed for {idle:.0f}s after "
                f"step {progress.step} (limit {limit:.0f}s); main thread at {where}"
            )
            log.error("%s", why)
            dump_stacks(why)
            self.announce(why)
            die(why)


def _me() -> int:
    import jax

    return jax.process_index()
