"""A local cluster: N trainer processes on 127.0.0.1 with M simulated CPU devices each.

    python -m jcdm.launch_local --num_processes 2 --devices_per_process 4 -- \\
        --gin gin/smoke.gin --workdir /tmp/run

Each process runs `python -m jcdm <trainer arguments>` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, so the trainer takes the same multi-host code path as on
a TPU pod (gloo collectives over loopback). Output lines are prefixed with `[pK]`. The exit code
is 0 when every process succeeded, the common code when all failed alike (e.g. 75, preempted),
else the first non-zero code seen. SIGTERM/SIGINT to the launcher is forwarded to every process.
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

NOISE = ("[Gloo]", "Gloo connected", "absl::InitializeLog")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, num: int, devices: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    if num > 1:
        env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
        env["JAX_NUM_PROCESSES"] = str(num)
        env["JAX_PROCESS_ID"] = str(index)
    return env


def _pump(index: int, stream, sink, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if any(n in line for n in NOISE):
            continue
        with lock:
            sink.write(f"[p{index}] {line}\n")
            sink.flush()


def launch(
    trainer_args: list[str],
    *,
    num_processes: int,
    devices_per_process: int,
    module: str = "jcdm",
    kill_after: float = 60.0,
) -> int:
    """Run the processes to completion; return the combined exit code.

    If one process exits non-zero, the others get `kill_after` seconds to exit by themselves
    (the trainer's peer watchdog normally ends them sooner) before they are killed.
    """
    port = free_port()
    lock = threading.Lock()
    procs, pumps = [], []
    for i in range(num_processes):
        p = subprocess.Popen(
            [sys.executable, "-m", module, *trainer_args],
            env=process_env(i, num_processes, devices_per_process, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches the children through the launcher only
        )
        with lock:
            sys.stdout.write(f"[launch] process {i} pid {p.pid}\n")
            sys.stdout.flush()
        t = threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout, lock), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    codes: list[int | None] = [None] * num_processes
    first_failure: float | None = None
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i] = p.returncode
                    if p.returncode != 0 and first_failure is None:
                        first_failure = time.monotonic()
            if first_failure is not None and time.monotonic() - first_failure > kill_after:
                for i, p in enumerate(procs):
                    if codes[i] is None:
                        sys.stdout.write(
                            f"[launch] killing process {i} ({kill_after}s after a peer failed)\n"
                        )
                        p.kill()
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    sys.stdout.write(f"[launch] exit codes {codes}\n")
    sys.stdout.flush()
    return combine(codes)


def combine(codes: list[int]) -> int:
    codes = [c if c >= 0 else 128 - c for c in codes]  # killed by signal n -> 128 + n
    if all(c == 0 for c in codes):
        return 0
    if len(set(codes)) == 1:
        return codes[0]
    return next(c for c in codes if c != 0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(
            "usage: python -m jcdm.launch_local --num_processes N --devices_per_process M -- "
            "<trainer arguments>",
            file=sys.stderr,
        )
        sys.exit(2)
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="jcdm.launch_local")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument(
        "--kill_after",
        type=float,
        default=60.0,
        help="seconds survivors get after a peer fails, before they are killed",
    )
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
        )
    )


if __name__ == "__main__":
    main()
