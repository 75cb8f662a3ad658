"""A local cluster: N trainer processes on 127.0.0.1 with M simulated CPU devices each.

    python -m jcdm.dev.launch_local --num_processes 2 --devices_per_process 4 -- \\
        --gin gin/smoke.gin --workdir /tmp/run

Each process runs `python -m jcdm <trainer arguments>` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, so the trainer takes the same multi-host code path as on
a TPU pod (gloo collectives over loopback). Output lines are prefixed with `[pK]` (and, with
`--log_dir`, also written to `process_K.log` there). The exit code combines the processes' codes
with `jcdm.exit_codes.combine`, the policy the infra/ launchers use too: 3 (numerical) > 2 (usage)
> 75 (preempted) > the first other failure > 0, so a survivor that exits 1 because its peer stopped
first does not mask the cause. A process killed by signal n counts as 128 + n. SIGTERM/SIGINT to
the launcher is forwarded to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from jcdm import exit_codes

NOISE = ("[Gloo]", "Gloo connected", "absl::InitializeLog")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, num: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # Keep the caller's other XLA flags (the tests' fast-compile flags); only the device count
    # is ours. JAX_NUM_CPU_DEVICES would override the flag, so it goes.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    if num > 1:
        env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
        env["JAX_NUM_PROCESSES"] = str(num)
        env["JAX_PROCESS_ID"] = str(index)
    return env


def _pump(index: int, stream: IO[bytes], sink: IO[str], log: IO[str] | None, lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if any(n in line for n in NOISE):
            continue
        with lock:
            sink.write(f"[p{index}] {line}\n")
            sink.flush()
        if log is not None:
            log.write(line + "\n")
            log.flush()


def launch(
    trainer_args: list[str],
    *,
    num_processes: int,
    devices_per_process: int,
    module: str = "jcdm",
    kill_after: float = 60.0,
    log_dir: str | None = None,
) -> int:
    """Run the processes to completion; return the combined exit code.

    If one process exits non-zero, the others get `kill_after` seconds to exit by themselves
    (the trainer's peer watchdog normally ends them within about a second) before they are
    killed, so a hung survivor cannot keep the launcher alive.
    """
    port = free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    logs: list[IO[str]] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    codes: list[int | None] = [None] * num_processes
    try:
        for i in range(num_processes):
            p = subprocess.Popen(
                [sys.executable, "-m", module, *trainer_args],
                env=process_env(i, num_processes, devices_per_process, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the children through the launcher only
            )
            log = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else None
            if log is not None:
                logs.append(log)
            with lock:
                sys.stdout.write(f"[launch] process {i} pid {p.pid}\n")
                sys.stdout.flush()
            t = threading.Thread(
                target=_pump, args=(i, p.stdout, sys.stdout, log, lock), daemon=True
            )
            t.start()
            procs.append(p)
            pumps.append(t)

        first_failure: float | None = None
        killed: set[int] = set()
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i] = p.returncode
                    with lock:
                        sys.stdout.write(f"[launch] process {i} exited with code {p.returncode}\n")
                        sys.stdout.flush()
                    if p.returncode != 0 and first_failure is None:
                        first_failure = time.monotonic()
            if first_failure is not None and time.monotonic() - first_failure > kill_after:
                for i, p in enumerate(procs):
                    if codes[i] is None and i not in killed:
                        with lock:
                            sys.stdout.write(
                                f"[launch] killing process {i} ({kill_after:g}s after a peer "
                                "failed)\n"
                            )
                        p.kill()
                        killed.add(i)
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for i, p in enumerate(procs):  # only reached early by an exception in the launcher
            if codes[i] is None and p.poll() is None:
                p.kill()
    for t in pumps:
        t.join(timeout=5)
    for log in logs:
        log.close()
    rc = combine([c for c in codes if c is not None])
    sys.stdout.write(f"[launch] exit codes {codes} -> {rc}\n")
    sys.stdout.flush()
    return rc


combine = exit_codes.combine  # one exit code for the job (the launchers' policy)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(
            "usage: python -m jcdm.dev.launch_local [--num_processes N] [--devices_per_process M] "
            "[--kill_after S] [--log_dir DIR] -- <trainer arguments>",
            file=sys.stderr,
        )
        sys.exit(2)
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="jcdm.dev.launch_local")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument(
        "--kill_after",
        type=float,
        default=60.0,
        help="seconds survivors get after a peer fails, before they are killed",
    )
    p.add_argument("--log_dir", help="also write each process's output to DIR/process_K.log")
    p.add_argument("--module", default="jcdm", help=argparse.SUPPRESS)
    args = p.parse_args(argv[:cut])
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num_processes and --devices_per_process must be >= 1")
    sys.exit(
        launch(
            argv[cut + 1 :],
            num_processes=args.num_processes,
            devices_per_process=args.devices_per_process,
            module=args.module,
            kill_after=args.kill_after,
            log_dir=args.log_dir,
        )
    )


if __name__ == "__main__":
    main()
