"""Multi-process initialisation in one place (system code).

Order of precedence: explicit gin settings, then `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
`JAX_PROCESS_ID` from the environment, then auto-detection (Cloud TPU VMs, SLURM steps, or
`JCDM_DISTRIBUTED=auto`), else a single process that needs nothing.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time

import gin
import jax

from jcdm import exit_codes

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
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
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
    peer_check_interval: float = 2.0,
) -> None:
    """Start `jax.distributed` when this run spans several processes.

    `mode`: "auto" (default, or $JCDM_DISTRIBUTED) picks explicit settings if any are given, else
    JAX's cluster auto-detection on TPU VMs and inside SLURM steps, else a single process;
    "explicit" requires the three settings; "detect" forces auto-detection; "none" skips.
    `heartbeat_timeout` bounds how long survivors wait when a peer dies (JAX's default is 100 s);
    a watchdog also polls the coordinator every `peer_check_interval` seconds and exits with a
    message naming the lost process.
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
        if not 0 <= pid < nproc:
            raise ValueError(f"JAX_PROCESS_ID={pid} must lie in [0, JAX_NUM_PROCESSES={nproc})")
        jax.distributed.initialize(address, nproc, pid, **timeouts)
    elif mode == "detect" or _on_cloud_tpu_vm() or _in_slurm_step():
        jax.distributed.initialize(**timeouts)
    else:
        return
    if jax.process_count() > 1 and peer_check_interval > 0:
        _start_peer_watchdog(peer_check_interval)


def _start_peer_watchdog(interval: float) -> None:
    """Exit promptly, with a message, when a peer process disappears.

    Without this a survivor blocks inside a collective until JAX's heartbeat timeout aborts it
    with SIGABRT and no word of which process failed.
    """
    from jax._src import distributed as _dist

    client = _dist.global_state.client
    everyone = list(range(jax.process_count()))
    me = jax.process_index()

    def watch():
        while True:
            time.sleep(interval)
            try:
                live = set(client.get_live_nodes(everyone))
            except Exception as e:  # the coordinator itself is gone
                _die(f"process {me}: lost the coordinator ({type(e).__name__}: {e})")
            missing = sorted(set(everyone) - live)
            if missing:
                _die(f"process {me}: peer process(es) {missing} stopped responding")

    threading.Thread(target=watch, name="jcdm-peer-watchdog", daemon=True).start()


def _die(message: str) -> None:
    log.error(
        "%s; exiting with code %d so the launcher can restart the job", message, exit_codes.FAILURE
    )
    logging.shutdown()
    os._exit(exit_codes.FAILURE)


def shutdown() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
