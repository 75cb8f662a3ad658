"""Multi-process initialisation in one place (system code).

Order of precedence: explicit gin settings, then `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
`JAX_PROCESS_ID` from the environment, then auto-detection (Cloud TPU VMs, SLURM steps, or
`JCDM_DISTRIBUTED=detect`), else a single process that needs nothing.

Peer failure. When a process that is not the coordinator dies, JAX's survivors notice only when
the coordination service's heartbeat times out (100 s by default); until then they block inside
a collective, then abort with SIGABRT. `jax.distributed`'s own liveness query
(`get_live_nodes`) does not help: it reports a SIGKILLed peer as alive until that same timeout
(measured). So every process also holds one plain TCP connection to process 0 (the peer
watchdog). The operating system closes a dead process's sockets at once, so its end of the
connection reads EOF within milliseconds of the death, whatever the process was doing; process 0
then tells every other process which peer died and all exit with FAILURE after a short grace.
A whole host that vanishes (power, network) closes no socket: the heartbeat timeout, lowered to
30 s here, still bounds that case. When the coordinator (process 0) dies, JAX itself aborts the
others within a second (measured).
"""

from __future__ import annotations

import glob
import logging
import os
import selectors
import socket
import threading
import time

import gin
import jax

from jcdm import exit_codes

log = logging.getLogger(__name__)

MODES = ("auto", "none", "explicit", "detect")
_WATCHDOG_KEY = "jcdm/peer_watchdog_port"

# Set by `shutdown` before the final barrier: from then on a closed peer connection is a peer
# leaving normally, not a failure.
_stopping = threading.Event()
_sockets: list[socket.socket] = []  # kept open until the process exits (see `shutdown`)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"${name}={value!r} is not an integer") from e


def _on_cloud_tpu_vm() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _in_slurm_step() -> bool:
    # The variables JAX's SlurmCluster needs; only `srun` sets SLURM_STEP_NODELIST and LOCALID.
    needed = (
        "SLURM_JOB_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    )
    return all(k in os.environ for k in needed) and int(os.environ["SLURM_NTASKS"]) > 1


@gin.configurable(module="jcdm")
def initialize(
    *,
    mode: str | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 900,
    heartbeat_timeout: int = 30,
    peer_watchdog: bool = True,
    peer_exit_grace: float = 1.0,
) -> None:
    """Start `jax.distributed` when this run spans several processes.

    `mode`: "auto" (default, or $JCDM_DISTRIBUTED) picks explicit settings if any are given, else
    JAX's cluster auto-detection on TPU VMs and inside SLURM steps, else a single process;
    "explicit" requires the three settings; "detect" forces auto-detection; "none" skips.
    `initialization_timeout`: seconds to wait for every process to join (slow cold starts on big
    pods need minutes). `heartbeat_timeout`: seconds after which the coordination service gives
    up on a silent process (JAX's default is 100 s); it bounds the survivors' wait when a whole
    host disappears. `peer_watchdog`: exit within about `peer_exit_grace` seconds when a peer
    process dies (see the module docstring); the grace lets a process that is already exiting
    with its own code (e.g. every process hit the same NaN) finish with that code.
    """
    mode = mode or os.environ.get("JCDM_DISTRIBUTED", "auto")
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}; choose one of {MODES}")
    if mode == "none" or jax.distributed.is_initialized():
        return
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = [v is not None for v in (address, nproc, pid)]
    timeouts = dict(
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )
    if any(explicit) or mode == "explicit":
        if not all(explicit):
            raise ValueError(
                "multi-process settings are incomplete: set all of JAX_COORDINATOR_ADDRESS "
                f"(host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID (got address={address!r}, "
                f"num_processes={nproc}, process_id={pid})"
            )
        if nproc < 1 or not 0 <= pid < nproc:
            raise ValueError(f"JAX_PROCESS_ID={pid} must lie in [0, JAX_NUM_PROCESSES={nproc})")
        if nproc == 1:
            return  # one process: nothing to coordinate, and no port to open
        jax.distributed.initialize(address, nproc, pid, **timeouts)
    elif mode == "detect" or _on_cloud_tpu_vm() or _in_slurm_step():
        jax.distributed.initialize(**timeouts)
    else:
        return
    if jax.process_count() > 1 and peer_watchdog:
        _start_peer_watchdog(peer_exit_grace, initialization_timeout)


def _coordinator_host() -> str:
    from jax._src import distributed as _dist

    host = _dist.global_state.coordinator_address.rsplit(":", 1)[0]
    return host.strip("[]")  # "[::1]:1234" -> "::1"


def _start_peer_watchdog(grace: float, timeout_s: int) -> None:
    """Connect every process to process 0 over TCP and watch the connections in a thread.

    Process 0 listens on an ephemeral port and publishes it in the coordination service's
    key-value store; the others connect to the coordinator's host. A process that cannot connect
    (e.g. a firewall) logs a warning and runs on, bounded by the heartbeat timeout alone.
    """
    from jax._src import distributed as _dist

    client = _dist.global_state.client
    me = jax.process_index()
    sel = selectors.DefaultSelector()
    if me == 0:
        port = 0  # published as 0 when there is no watchdog, so the others do not wait for one
        try:
            if socket.has_dualstack_ipv6():
                server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
            else:
                server = socket.create_server(("", 0))
            port = server.getsockname()[1]
            _sockets.append(server)
            sel.register(server, selectors.EVENT_READ, "accept")
        except OSError as e:
            log.warning("peer watchdog: cannot listen (%s); relying on the heartbeat timeout", e)
        client.key_value_set(_WATCHDOG_KEY, str(port))
        if not port:
            return
    else:
        port = int(client.blocking_key_value_get(_WATCHDOG_KEY, timeout_s * 1000))
        if not port:
            return
        host = _coordinator_host()
        try:
            # Process 0 listens before it publishes the port: a healthy network connects in
            # milliseconds, and a firewall that drops packets should not hold up the start.
            conn = socket.create_connection((host, port), timeout=10)
        except OSError as e:
            log.warning(
                "peer watchdog: cannot reach process 0 at %s:%d (%s); a dead peer will only be "
                "noticed after the heartbeat timeout",
                host,
                port,
                e,
            )
            return
        conn.settimeout(None)
        conn.sendall(f"{me}\n".encode())
        _sockets.append(conn)
        sel.register(conn, selectors.EVENT_READ, 0)

    def on_peer_lost(peer: int, why: str, peers: dict[socket.socket, int]) -> None:
        if _stopping.is_set():
            return
        if me == 0:  # tell the others who died, so their message names the right process
            for s in peers:
                try:
                    s.sendall(f"dead {peer}\n".encode())
                except OSError:
                    pass
        # Said at once: the main thread may die first of the same cause (gloo reports a closed
        # connection as an error in the running collective) and its traceback alone is vague.
        log.error("process %d: process %d %s; this job cannot continue", me, peer, why)
        time.sleep(grace)
        if not _stopping.is_set():
            _die(f"process {me}: process {peer} {why}")

    def watch() -> None:
        peers: dict[socket.socket, int] = {}  # process 0: connection -> peer index
        pending: dict[socket.socket, bytes] = {}  # process 0: connections not yet introduced
        while True:
            for key, _ in sel.select():
                if key.data == "accept":
                    conn, _addr = key.fileobj.accept()
                    _sockets.append(conn)
                    pending[conn] = b""
                    sel.register(conn, selectors.EVENT_READ, "hello")
                    continue
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if key.data == "hello" and data:
                    pending[sock] += data
                    if b"\n" in pending[sock]:
                        hello = pending.pop(sock).split(b"\n")[0]
                        if not hello.isdigit():  # not one of ours (a port scan): ignore it
                            sel.unregister(sock)
                            continue
                        peers[sock] = int(hello)
                        sel.modify(sock, selectors.EVENT_READ, peers[sock])
                    continue
                if not data:  # EOF: the process at the other end is gone
                    sel.unregister(sock)
                    if key.data == "hello":
                        pending.pop(sock, None)
                        continue
                    peers.pop(sock, None)
                    return on_peer_lost(key.data, "exited or was killed", peers)
                words = data.split()
                if me != 0 and words[:1] == [b"dead"]:
                    return on_peer_lost(int(words[1]), "exited or was killed", peers)

    threading.Thread(target=watch, name="jcdm-peer-watchdog", daemon=True).start()


def _die(message: str) -> None:
    log.error(
        "%s; exiting with code %d so the launcher can restart the job", message, exit_codes.FAILURE
    )
    logging.shutdown()
    os._exit(exit_codes.FAILURE)


def shutdown() -> None:
    """Leave the cluster after a normal end (success or a handled preemption).

    Every process marks itself as stopping before JAX's shutdown barrier, so once any process has
    passed the barrier, all have stopped treating a closed watchdog connection as a failure. The
    sockets stay open until the process exits, for the same reason.
    """
    _stopping.set()
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
