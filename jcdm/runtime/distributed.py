"""Multi-process initialisation in one place (system code).

Order of precedence: explicit gin settings, then `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
`JAX_PROCESS_ID` from the environment, then auto-detection (Cloud TPU VMs, SLURM steps, or
`JCDM_DISTRIBUTED=detect`), else a single process that needs nothing.

Peer failure. When a process that is not the coordinator dies or stops, JAX's survivors notice
only when the coordination service's heartbeat times out (100 s by default); until then they
block inside a collective, then abort with SIGABRT and no message naming the process.
`jax.distributed`'s own liveness query (`get_live_nodes`) does not help: it reports a SIGKILLed
peer as alive until that same timeout (measured). So every process also holds one plain TCP
connection to process 0 (`jcdm.runtime.peers`, the peer watchdog), which carries heartbeats: a
dead process's connection reads EOF within milliseconds, a stopped one's heartbeats stop, and a
stalled one says so; every survivor exits with FAILURE naming that process. JAX's heartbeat
timeout, lowered to 30 s here, stays the bound when the watchdog cannot connect. When the
coordinator (process 0) dies, JAX itself aborts the others within a second (measured).
"""

from __future__ import annotations

import glob
import logging
import os

import gin
import jax

from jcdm.runtime import peers

log = logging.getLogger(__name__)

MODES = ("auto", "none", "explicit", "detect")


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
    process dies, stops or stalls (see `jcdm.runtime.peers`; `StallConfig` sets the heartbeat);
    the grace lets a process that is already exiting with its own code (e.g. every process hit
    the same NaN) finish with that code.
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
        from jax._src import distributed as _dist

        peers.start(
            _dist.global_state.client,
            _coordinator_host(),
            grace=peer_exit_grace,
            timeout_s=initialization_timeout,
            me=jax.process_index(),
        )


def _coordinator_host() -> str:
    from jax._src import distributed as _dist

    host = _dist.global_state.coordinator_address.rsplit(":", 1)[0]
    return host.strip("[]")  # "[::1]:1234" -> "::1"


def shutdown() -> None:
    """Leave the cluster after a normal end (success or a handled preemption).

    Every process marks itself as stopping before JAX's shutdown barrier, so once any process has
    passed the barrier, all have stopped treating a closed watchdog connection as a failure. The
    sockets stay open until the process exits, for the same reason.
    """
    peers.stopping()
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
