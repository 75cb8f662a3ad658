"""Event loops that ignore wake-ups from abandoned TensorStore reads (system code).

Orbax runs each restore in a fresh asyncio event loop and closes it as soon as the first array
fails to read. The other arrays' TensorStore reads are still in flight; when each completes,
TensorStore's thread calls `loop.call_soon_threadsafe` on the closed loop, which raises
`RuntimeError: Event loop is closed`, printed with a traceback from that thread. A damaged
checkpoint of the CIFAR model printed hundreds of them around the one line that says what is
wrong. Nothing awaits those reads any more, so the wake-up has nowhere to go.

`install()` makes new event loops drop such a wake-up when it comes from a thread with no
Python caller (TensorStore's C++ threads). A call from Python code on a closed loop still
raises, so `asyncio.run_coroutine_threadsafe` on a closed loop fails as before instead of
waiting forever.
"""

from __future__ import annotations

import asyncio
import sys
import threading

_lock = threading.Lock()
dropped = 0  # wake-ups dropped so far (tests read it)


class QuietEventLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose closed state swallows wake-ups from foreign threads."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        global dropped
        if self.is_closed():
            try:
                sys._getframe(1)  # a Python caller: let the stock error reach it
            except ValueError:
                with _lock:
                    dropped += 1
                return None
        return super().call_soon_threadsafe(callback, *args, context=context)


class _Policy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = QuietEventLoop


def install() -> None:
    """Make `asyncio.new_event_loop()` return `QuietEventLoop`s from now on. Leaves a policy
    other than the default one (uvloop, say) alone; idempotent."""
    with _lock:
        if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
            asyncio.set_event_loop_policy(_Policy())
