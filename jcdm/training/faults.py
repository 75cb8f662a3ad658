"""Test hooks that make the trainer misbehave on purpose (`train.test_fault`), so the tests and
bench/soak.py can check how a run ends: `KIND@STEP` or `KIND@STEP:PROCESS`, acted on at the step
boundary after STEP on every process or only on process PROCESS.

- `hang`: the main thread blocks for good while every other thread runs on (a deadlock or an
  I/O call that never returns); stall detection must end the job.
- `value_error`: a ValueError once training has started (e.g. a transient data or library
  error); it must exit 1 (retried), not 2.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading

import jax

log = logging.getLogger(__name__)

KINDS = ("hang", "value_error")


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str = ""
    step: int = -1
    process: int | None = None

    def at_boundary(self, step: int) -> None:
        if not self.kind or step != self.step:
            return
        if self.process is not None and self.process != jax.process_index():
            return
        log.warning("test fault: %s at step %d", self.kind, step)
        if self.kind == "hang":
            threading.Event().wait()  # never set: Python code that never returns
        raise ValueError(f"test fault: value_error at step {step}")


def parse(spec: str) -> Fault:
    """`""` (no fault) or `KIND@STEP[:PROCESS]`."""
    if not spec:
        return Fault()
    m = re.fullmatch(r"(\w+)@(\d+)(?::(\d+))?", spec)
    if not m or m[1] not in KINDS:
        raise ValueError(f"train.test_fault={spec!r}: use KIND@STEP[:PROCESS], KIND in {KINDS}")
    return Fault(m[1], int(m[2]), None if m[3] is None else int(m[3]))
