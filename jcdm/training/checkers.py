"""Small value checkers for `jcdm.training.validate`: each knows what a value must be and a good
example to show in the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

INT32_MAX = 2**31 - 1


class Checker:
    """`checker(value)`: None for a good value, else what it must be ("an integer >= 1").
    `example` is a good value, shown in the fix."""

    def __init__(self, test: Callable[[Any], bool], what: str, example: Any):
        self.test, self.what, self.example = test, what, example

    def like(self, example: Any) -> Checker:
        """The same check with another example for the fix (e.g. a typical learning rate)."""
        return Checker(self.test, self.what, example)

    def __call__(self, value: Any) -> str | None:
        try:
            return None if self.test(value) else self.what
        except TypeError:
            return self.what


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(lo: Any, hi: Any, open_lo: bool = False) -> str:
    parts = [f"{'>' if open_lo else '>='} {lo}"] if lo is not None else []
    parts += [f"<= {hi}"] if hi is not None else []
    return " " + " and ".join(parts) if parts else ""


def integer(lo: int | None = None, hi: int | None = None) -> Checker:
    return Checker(
        lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
        "an integer" + _bounds(lo, hi),
        max(lo or 0, 1) if hi is None or hi >= 1 else lo,
    )


def number(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> Checker:
    """A finite real in [lo, hi] ((lo, hi] with open_lo); integers count as numbers."""

    def test(v: Any) -> bool:
        if not _is_real(v) or (lo is not None and (v <= lo if open_lo else v < lo)):
            return False
        return hi is None or v <= hi

    example = 0.5 if hi is not None and hi <= 1 else 1.0
    return Checker(test, "a finite number" + _bounds(lo, hi, open_lo), example)


boolean = Checker(lambda v: isinstance(v, bool), "True or False", True)
text = Checker(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty quoted string", "x")


def one_of(*allowed: str) -> Checker:
    return Checker(lambda v: isinstance(v, str) and v in allowed, f"one of {allowed}", allowed[0])


def optional(inner: Checker) -> Checker:
    return Checker(lambda v: v is None or inner.test(v), f"None or {inner.what}", inner.example)


def sequence(inner: Checker, *, min_len: int = 0) -> Checker:
    def test(v: Any) -> bool:
        ok = isinstance(v, Sequence) and not isinstance(v, str) and len(v) >= min_len
        return ok and all(inner.test(x) for x in v)

    what = f"a tuple of {min_len} or more items, each {inner.what}"
    return Checker(test, what, (inner.example,) * max(min_len, 1))


checkpoint_step = Checker(
    lambda v: v in ("latest", "best") or (_is_int(v) and v >= 0),
    "'latest', 'best' or a step >= 0",
    "latest",
)
POS_INT = integer(1)
NONNEG_INT = integer(0)
SEED = integer(0, INT32_MAX)  # the trainer folds it into an int32 PRNG key
PROB = number(0.0, 1.0)
POS = number(0.0, open_lo=True)
PATH = optional(text)
DTYPE = one_of("float32", "bfloat16", "float16")
FIR_IMPLS = one_of("separable", "conv")
