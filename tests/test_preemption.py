"""The preemption agreement without a per-step collective (jcdm.runtime.preemption.StopAgreement),
on simulated processes (threads) coupled like the real ones: a step completes on a process only
once every process has dispatched it (the collective in the train step), and a host may run a few
steps ahead of its devices. Fast; the real-process test is tests/test_checkpoint.py."""

from __future__ import annotations

import random
import threading
import time

import pytest

from jcdm.runtime.preemption import StopAgreement


class FakeKV:
    """The coordination service's key-value store, shared by the simulated processes."""

    def __init__(self):
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()
        self.reads = 0

    def key_value_set(self, key: str, value: str) -> None:
        with self.lock:
            assert key not in self.data, f"{key} set twice"
            self.data[key] = value

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        with self.lock:
            self.reads += 1
            return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


def simulate(*, n, notice_by, notice_at, num_steps, stride=1, ahead=0, seed=0):
    """Run n processes to the end; returns each one's outcome: ("stop", step) or ("done", step)."""
    rng = random.Random(seed)
    delays = [rng.uniform(0.0005, 0.004) for _ in range(n)]
    kv = FakeKV()
    notices = [False] * n
    dispatched = [0] * n
    cond = threading.Condition()
    outcome: list = [None] * n
    errors: list = []

    # Like the trainer's, each agreement's thread lives until the whole job has ended (the final
    # barrier), so a process that finished still answers a late notice of another.
    agreements = [
        StopAgreement(kv, process_index=i, num_processes=n, notice=lambda i=i: notices[i],
                      poll_s=0.002)
        for i in range(n)
    ]  # fmt: skip

    def run(i: int) -> None:
        agreement = agreements[i]
        agreement.begin(0, stride)
        step = 0
        try:
            while step < num_steps:
                with cond:
                    dispatched[i] = step + stride
                    cond.notify_all()
                    # The host blocks until the step `ahead` calls back has completed, which
                    # needs every process to have dispatched it (a collective).
                    need = step + stride - ahead * stride
                    if not cond.wait_for(lambda need=need: min(dispatched) >= need, timeout=20):
                        raise TimeoutError(f"process {i} deadlocked at step {step}")
                time.sleep(delays[i] * rng.uniform(0.5, 2))
                step += stride
                if i == notice_by and step >= notice_at:
                    notices[i] = True
                stop = agreement.should_stop(step)
                if step >= num_steps:
                    outcome[i] = ("done", step)
                    return
                if stop:
                    outcome[i] = ("stop", step)
                    return
        except Exception as e:  # surfaced by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for agreement in agreements:
        agreement.close()
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "a simulated process hung"
    return outcome, kv


@pytest.mark.parametrize(
    ("n", "stride", "ahead", "seed"),
    [(2, 1, 0, 0), (3, 1, 2, 1), (4, 4, 1, 2), (3, 2, 3, 3), (2, 1, 5, 4)],
)
def test_every_process_stops_after_the_same_step(n, stride, ahead, seed):
    notice_at = 10 * stride
    outcome, kv = simulate(
        n=n, notice_by=n - 1, notice_at=notice_at, num_steps=400 * stride, stride=stride,
        ahead=ahead, seed=seed,
    )  # fmt: skip
    kinds = {o[0] for o in outcome}
    steps = {o[1] for o in outcome}
    assert kinds == {"stop"} and len(steps) == 1, outcome
    (stop,) = steps
    assert stop % stride == 0
    # The stop comes soon after the notice: a few boundaries (one per process's poll), not more.
    assert notice_at <= stop <= notice_at + (ahead + 3) * stride * n, outcome
    assert len(kv.data) == n  # one proposal per process, nothing per step


def test_a_notice_at_the_end_lets_every_process_finish():
    """A notice during the last steps: either all stop at the same step before the end, or all
    finish (the final step is saved anyway); never a mix."""
    for seed in range(6):
        outcome, _ = simulate(n=3, notice_by=seed % 3, notice_at=19, num_steps=20, seed=seed)
        assert len(set(outcome)) == 1, (seed, outcome)


def test_watcher_tells_an_interrupt_from_a_preemption_and_gives_the_signals_back():
    """Real signals to this process: SIGTERM is a preemption (75), SIGINT/SIGHUP an interrupt
    (4) that outranks it; the handler raises nothing (no KeyboardInterrupt) and `restore` puts
    the previous handlers and wakeup fd back. (A second SIGINT exits the process at once:
    tests/test_workdir_owner.py checks that on a real trainer.)"""
    import os
    import signal as sig
    import time

    from jcdm.runtime import preemption

    before = {s: sig.getsignal(s) for s in preemption.STOP_SIGNALS}

    def wait_notice(w):
        t0 = time.monotonic()
        while not w.local_notice and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        return w.local_notice

    w = preemption.PreemptionWatcher()
    try:
        os.kill(os.getpid(), sig.SIGTERM)
        assert wait_notice(w) and not w.interrupted and w.should_stop()
        os.kill(os.getpid(), sig.SIGHUP)
        t0 = time.monotonic()
        while not w.interrupted and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert w.interrupted and w.first_signal == sig.SIGHUP
    finally:
        w.restore()
    assert {s: sig.getsignal(s) for s in preemption.STOP_SIGNALS} == before
    assert sig.set_wakeup_fd(-1) == -1  # nothing left behind
