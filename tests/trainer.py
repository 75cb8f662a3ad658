"""Helpers to run the trainer as users do: `python -m jcdm ...` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Fast settings for the smoke config: no sample grids, no checkpoints unless asked.
QUIET = ["--gin.EvalConfig.every=0", "--gin.CheckpointConfig.save_every=100000"]


def run_trainer(args: list[str], *, timeout: float = 600, env: dict | None = None):
    """Run `python -m jcdm ARGS` from the repo root; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "jcdm", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def launch_local_argv(
    num: int, devices: int, args: list[str], workdir: str, *, kill_after: float = 30
) -> list[str]:
    """`python -m jcdm.dev.launch_local` for `num` processes x `devices` CPU devices."""
    return [
        sys.executable,
        "-m",
        "jcdm.dev.launch_local",
        f"--num_processes={num}",
        f"--devices_per_process={devices}",
        f"--kill_after={kill_after:g}",
        "--",
        *args,
        "--workdir",
        workdir,
    ]
