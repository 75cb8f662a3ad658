"""One owner per workdir: a run holds a lease on its workdir while it trains (system code).

The lease is one small JSON object, `<workdir>/LEASE`: holder host (name and boot id), pid and
the pid's start time, run id, restart token, start, renewal and expiry times. The trainer takes
it before it writes anything to the workdir, renews it from a thread every `renew_every_s`, and
deletes it when it ends (any exit but SIGKILL or a lost machine). A second run finds it held and
stops at once with exit 2, naming the holder and the way out.

Every change is a compare-and-swap on the object's version (`jcdm.runtime.lease_store`), so two
contenders never both win:
- local disk: created by `link(2)` of a finished temporary file (fails if the lease exists);
  replaced (renewal, take-over) and deleted only under an `flock` of `<workdir>/LEASE.lock`,
  after checking the file is still the one read (inode and bytes); renewals rename a finished
  temporary file over it, so a reader never sees half a record;
- `gs://`: object generation preconditions (`ifGenerationMatch=0` to create, the generation read
  to renew, take over or delete), through google-cloud-storage's Blob API.

A lease whose holder is gone must not strand the run. It is taken over:
- at once when the holder is provably dead: same host (hostname and boot id), and its pid is gone,
  a zombie, or another process (start time differs): a restart after SIGKILL on the same machine;
- at once when the holder carries this run's restart token ($JCDM_LEASE_TOKEN): the launchers
  set one token per supervised run and start an attempt only after the previous one has ended
  (its exit code was read, or its VM is gone), so a holder with their token is a dead attempt;
- after `expiry_s` without a renewal (wall clock of the two machines: see docs/operations.md on
  clock skew): a holder on a machine that vanished;
- by the user's decision (`jcdm --take_over_lease`), after checking the holder is dead.

The holder checks at every step boundary (`check`) that its lease is still its own and was renewed
within `expiry_s`; a process paused or cut off for longer (SIGSTOP, a partition) first tries to
renew and, if another run took the workdir, stops with `LeaseLost` before it writes more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid

import gin

from jcdm.runtime.lease_store import NAME, BucketStore, LocalStore, Store, store_for  # noqa: F401

log = logging.getLogger(__name__)

TOKEN_ENV = "JCDM_LEASE_TOKEN"


@gin.configurable(module="jcdm")
@dataclasses.dataclass(frozen=True)
class LeaseConfig:
    """`expiry_s`: a lease not renewed for this long is taken over by another run (the bound on
    how long a dead holder on another machine strands the workdir). `renew_every_s`: the renewal
    period (default a third of `expiry_s`). `enabled=False` turns the lease off (two runs on one
    workdir then overwrite each other's checkpoints)."""

    enabled: bool = True
    expiry_s: float = 60.0
    renew_every_s: float | None = None

    def __post_init__(self):
        if self.expiry_s <= 0:
            raise ValueError(f"LeaseConfig.expiry_s must be > 0, got {self.expiry_s}")
        if self.renew_every_s is not None and not 0 < self.renew_every_s < self.expiry_s:
            raise ValueError(
                f"LeaseConfig.renew_every_s must lie in (0, expiry_s={self.expiry_s}), "
                f"got {self.renew_every_s}"
            )

    @property
    def period_s(self) -> float:
        return self.renew_every_s or self.expiry_s / 3


class LeaseHeld(Exception):
    """Another live run holds the workdir (exit 2: a restart would find it held again)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or could not be renewed in time): stop writing."""


# --- who holds it --------------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), and None
    if the process does not exist or is a zombie (SIGKILLed, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def holder_alive(record: dict) -> bool | None:
    """True/False for a holder on this machine, None when it runs elsewhere (unknowable)."""
    if record.get("host") != socket.gethostname() or record.get("boot_id") != _boot_id():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int):
        return None
    start = _proc_start(pid)
    if start is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not (start and record.get("pid_start") and start != record["pid_start"])


def _when(t: float | None) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def describe(record: dict) -> str:
    return (
        f"run {record.get('run_id') or '?'} (host {record.get('host', '?')}, pid "
        f"{record.get('pid', '?')}, since {_when(record.get('started'))}, last renewed "
        f"{_when(record.get('renewed'))})"
    )


def takeover_reason(record: dict, *, token: str | None, take_over: bool, now: float) -> str | None:
    """Why this run may take the lease over, or None if the holder may still be alive."""
    if token and record.get("token") == token:
        return "it carries this run's restart token: the launcher's previous attempt ended"
    alive = holder_alive(record)
    if alive is False:
        return "its process is gone (same host)"
    expires = record.get("expires")
    if not isinstance(expires, (int, float)) or now >= expires:
        return f"it was not renewed since {_when(record.get('renewed'))} and has expired"
    if take_over:
        return "--take_over_lease was given"
    return None


# --- the lease -----------------------------------------------------------------------------------


class Lease:
    """A held lease: `start_renewing()`, `check()` at step boundaries, `release()` at the end."""

    def __init__(self, store: Store, record: dict, version: object, cfg: LeaseConfig):
        self.store, self.record, self.version, self.cfg = store, record, version, cfg
        self._lock = threading.Lock()
        self._renewed_at = time.monotonic()
        self._lost: str | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jcdm-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed.wait(self.cfg.period_s):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as e:  # a bucket hiccup: the next period retries
                log.warning("could not renew the workdir lease %s: %s", self.store.where, e)

    def renew(self) -> None:
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            now = time.time()
            record = {**self.record, "renewed": now, "expires": now + self.cfg.expiry_s}
            version = self.store.replace(_encode(record), self.version)
            if version is None:
                current = self.store.read()
                holder = describe(_decode(current.data)) if current else "nobody (it was deleted)"
                self._lost = (
                    f"the workdir lease {self.store.where} was taken over; it is now held by "
                    f"{holder}. This run stops so that two runs do not write one workdir."
                )
                log.error("%s", self._lost)
                raise LeaseLost(self._lost)
            self.record, self.version = record, version
            self._renewed_at = time.monotonic()

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours and fresh: a comparison, unless the
        last renewal is older than `expiry_s - period_s` (one renewal missed: paused, or the store
        unreachable), then a renewal here and now. The margin makes a holder that cannot renew
        stop before a contender may take the lease (expiry), clock skew aside."""
        if self._lost:
            raise LeaseLost(self._lost)
        stale_after = max(self.cfg.expiry_s - self.cfg.period_s, self.cfg.period_s)
        if time.monotonic() - self._renewed_at > stale_after:
            log.warning("workdir lease not renewed for over %gs; renewing", stale_after)
            try:
                self.renew()
            except LeaseLost:
                raise
            except Exception as e:
                raise LeaseLost(
                    f"the workdir lease {self.store.where} could not be renewed for over "
                    f"{self.cfg.expiry_s:g}s ({e}); another run may hold it now"
                ) from e

    def release(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self._lost:
                return
            try:
                if self.store.delete(self.version):
                    log.info("released the workdir lease %s", self.store.where)
            except Exception as e:  # the lease then expires after expiry_s
                log.warning("could not release the workdir lease %s: %s", self.store.where, e)


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def _decode(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def acquire(
    workdir: str,
    *,
    run_id: str | None,
    token: str | None = None,
    take_over: bool = False,
    cfg: LeaseConfig | None = None,
    store: Store | None = None,
) -> Lease:
    """Take the workdir's lease or raise LeaseHeld naming the holder and the way out."""
    cfg = cfg or LeaseConfig()
    store = store or store_for(workdir)
    now = time.time()
    pid = os.getpid()
    record = {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "pid_start": _proc_start(pid),
        "run_id": run_id,
        "token": token,
        "holder_id": uuid.uuid4().hex,
        "started": now,
        "renewed": now,
        "expires": now + cfg.expiry_s,
        "expiry_s": cfg.expiry_s,
    }
    for _ in range(10):  # every lost race re-reads what won it
        current = store.read()
        if current is None:
            version = store.create(_encode(record))
            if version is not None:
                log.info("holding the workdir lease %s (expires %gs after a renewal)", store.where,
                         cfg.expiry_s)  # fmt: skip
                return Lease(store, record, version, cfg)
            continue
        held = _decode(current.data)
        reason = takeover_reason(held, token=token, take_over=take_over, now=time.time())
        if reason is None:
            raise LeaseHeld(_held_message(store.where, held, cfg))
        version = store.replace(_encode(record), current.version)
        if version is not None:
            log.warning("took over the workdir lease of %s: %s", describe(held), reason)
            return Lease(store, record, version, cfg)
    raise OSError(errno.EBUSY, "the workdir lease kept changing hands", store.where)


def _held_message(where: str, held: dict, cfg: LeaseConfig) -> str:
    if not held:
        holder = "a lease this version cannot read"
    else:
        holder = describe(held) + f", expires {_when(held.get('expires'))} unless renewed"
    return (
        f"the workdir is in use: {where} is held by {holder}. Two runs on one workdir overwrite "
        "each other's checkpoints and metrics. Wait for that run to end, or use another "
        "--workdir; if the holder is dead (its process or machine is gone), rerun with "
        f"--take_over_lease, or wait until the lease expires ({cfg.expiry_s:g}s after its last "
        "renewal, LeaseConfig.expiry_s) and rerun."
    )


# --- the process's lease (held by process 0 of a job) ---------------------------------------------

_active: Lease | None = None
OUTCOME_KEY = "jcdm/lease/outcome"


def active() -> Lease | None:
    return _active


def check() -> None:
    """At a step boundary: raise LeaseLost if this process's lease is no longer its own."""
    if _active is not None:
        _active.check()


@contextlib.contextmanager
def hold(
    workdir: str,
    *,
    run_id: str | None,
    take_over: bool = False,
    process_index: int = 0,
    kv=None,
    timeout_s: float = 600.0,
):
    """Hold the workdir's lease for the enclosed run (process 0 takes it; the others learn the
    outcome through the coordination service's key-value store `kv`, so every process raises
    LeaseHeld if it is refused)."""
    global _active
    cfg = LeaseConfig()
    if not cfg.enabled:
        yield None
        return
    token = os.environ.get(TOKEN_ENV) or None
    lease = None
    if process_index == 0:
        try:
            lease = acquire(workdir, run_id=run_id, token=token, take_over=take_over, cfg=cfg)
        except LeaseHeld as e:
            if kv is not None:
                kv.key_value_set(OUTCOME_KEY, "held:" + str(e))
            raise
        if kv is not None:
            kv.key_value_set(OUTCOME_KEY, "ok")
    elif kv is not None:
        outcome = kv.blocking_key_value_get(OUTCOME_KEY, int(timeout_s * 1000))
        if outcome.startswith("held:"):
            raise LeaseHeld(outcome[len("held:") :])
    if lease is not None:
        lease.start_renewing()
        _active = lease
    try:
        yield lease
    finally:
        if lease is not None:
            _active = None
            lease.release()
