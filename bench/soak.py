"""Fault-injection soak: the real trainer through many faults, restarted by the launchers' policy.

    python bench/soak.py [--schedule full|short] [--seed 0] [--out bench/results/soak_cpu.json]

Runs the smoke model through `jcdm.dev.launch_local` (2 processes x 2 CPU devices, a save every
few steps) twice: once uninterrupted (the reference), once under a seeded schedule of faults:
SIGTERM to one process, SIGKILL to one process, SIGKILL of every process while a save is being
written, SIGSTOP of one process, a full disk (a small tmpfs holds the checkpoints; root only,
else a second unwritable fault) and an unwritable checkpoint directory during a save. After each
launch the exit code goes through `jcdm.exit_codes.action`, the policy of infra/'s launchers:
done, stop (the soak fails), or restart at once. The first `cold_restarts` restarts run with the
persistent compilation cache off, the others with it on (the default), so restart times are
measured both ways.

Reported (printed, and written as JSON to --out): every fault (kind, process, step, how long the
job took to end, exit codes, steps lost), restarts, steps lost per fault kind, restart-to-first-
step time split into start-up / restore / compile / first step (from the trainer's own log line)
for cold and warm restarts, goodput (the reference's steady step time x steps / the soak's wall
time), and whether the final parameters and EMA equal the reference's bitwise and metrics.jsonl
holds exactly one row per logged step with the reference's values.

Timings on a shared 2-core machine are noisy; compare numbers within one report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from jcdm import exit_codes  # noqa: E402

SIGNAL_KINDS = ("sigterm", "sigkill", "sigkill_all_in_save", "sigstop")
KINDS = (*SIGNAL_KINDS, "disk_full", "unwritable")
TIMING_KEYS = ("images_per_sec", "compile_s")
SCHEDULES = {
    # 12 faults, two of each kind, over 320 steps with a save every 20.
    "full": dict(num_steps=320, save_every=20, kinds=KINDS * 2, cold_restarts=2),
    # One of each signal kind (~5 minutes on 2 idle cores). Not in the test suite since
    # 2026-12-07: tests/test_checkpoint.py runs its SIGTERM and SIGKILL-during-a-save on a
    # 2 x 2 launch with stricter checks, tests/test_multihost.py the SIGKILL of one process and
    # tests/test_stall.py the SIGSTOP (tests/README.md, "Suite timings"). Run it after changing
    # this file. curriculum_steps=8 makes its step the tests' 2 x 2 one (one compile cache).
    "short": dict(
        num_steps=32, save_every=4, kinds=SIGNAL_KINDS, cold_restarts=0, curriculum_steps=8
    ),
}
FIRST_STEP = re.compile(
    r"\[p(\d)\] .*first step (\d+) done ([\d.]+)s after process start: start-up ([\d.]+)s, "
    r"restore ([\d.]+)s, compile ([\d.]+)s, first step ([\d.]+)s"
)
LAUNCH_TIMEOUT_S = 900


class Launch:
    """One `jcdm.dev.launch_local` run whose output goes to a file the soak polls."""

    def __init__(self, name: str, workdir: str, args: list[str], log_dir: str, env: dict):
        self.name, self.workdir = name, workdir
        self.log_path = os.path.join(log_dir, name + ".log")
        cmd = [
            sys.executable, "-m", "jcdm.dev.launch_local", "--num_processes=2",
            "--devices_per_process=2", "--kill_after=5", "--", *args, "--workdir", workdir,
        ]  # fmt: skip
        self.t0 = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, text=True
            )
        self.rc: int | None = None
        self.t_end: float | None = None
        self.t_first_exit: float | None = None  # when the launcher saw the first process exit

    @property
    def out(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def pids(self) -> dict[int, int]:
        return {
            int(i): int(p) for i, p in re.findall(r"\[launch\] process (\d) pid (\d+)", self.out)
        }

    def steps(self) -> list[int]:
        """Steps process 0 logged (its progress line), in order."""
        return [int(s) for s in re.findall(r"\[p0\] \[[#-]*\] (\d+)/", self.out)]

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        while self.running() and time.monotonic() - self.t0 < LAUNCH_TIMEOUT_S:
            if self.t_first_exit is None and "exited with code" in self.out:
                self.t_first_exit = time.monotonic()
            time.sleep(0.05)
        if self.running():
            self.signal(signal.SIGKILL)
            self.proc.kill()
            print(f"soak: {self.name} timed out; killed", flush=True)
        self.rc = self.proc.wait()
        self.t_end = time.monotonic()
        self.t_first_exit = self.t_first_exit or self.t_end
        return self.rc

    def signal(self, sig: int, which: tuple[int, ...] | None = None) -> None:
        for i, pid in self.pids().items():
            if which is None or i in which:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def first_steps(self) -> dict[int, dict]:
        out = {}
        for m in FIRST_STEP.finditer(self.out):
            keys = ("step", "total_s", "startup_s", "restore_s", "compile_s", "first_step_s")
            out[int(m[1])] = dict(zip(keys, [int(m[2]), *map(float, m.groups()[2:])]))
        return out

    def cache_misses(self) -> list[int]:
        """Processes whose train step missed the persistent compilation cache (JAX's
        explanation of a miss, switched on in child_env)."""
        found = re.findall(
            r"\[p(\d)\] .*PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'", self.out
        )
        return sorted({int(p) for p in found})

    def resumed_step(self) -> int:
        m = re.search(r"\[p0\] .*resumed from step (\d+)", self.out)
        return int(m[1]) if m else 0

    def exit_codes(self) -> list[int]:
        m = re.search(r"\[launch\] exit codes \[([^\]]*)\]", self.out)
        return [int(c) for c in m[1].split(",")] if m else []


def wait_until(cond, launch: Launch, interval: float = 0.05) -> bool:
    while not cond():
        if not launch.running():
            return False
        time.sleep(interval)
    return True


# --- faults --------------------------------------------------------------------------------------


@contextlib.contextmanager
def checkpoint_fs(ckpt_dir: str, want_tmpfs: bool):
    """The checkpoint directory, on a small tmpfs when possible (a disk that can fill up)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    mounted = False
    if want_tmpfs and os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", ckpt_dir])
        mounted = r.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", ckpt_dir])


def fill_disk(ckpt_dir: str) -> str:
    path = os.path.join(ckpt_dir, "ballast")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * (1 << 16))
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    os.close(fd)
    return path


def set_writable(path: str, writable: bool) -> None:
    if os.geteuid() == 0:  # root ignores permissions; the immutable attribute stops it too
        subprocess.run(["chattr", "-i" if writable else "+i", path], check=True)
    else:
        os.chmod(path, 0o755 if writable else 0o555)


def inject(kind: str, process: int, launch: Launch, ckpt_dir: str) -> tuple[float, int]:
    """Apply one fault; returns (time, step process 0 had logged)."""
    if kind == "sigkill_all_in_save":
        start = max([*launch.steps(), launch.resumed_step()])
        saving = lambda: any(
            m and int(m[1]) > start
            for m in (
                re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", n) for n in os.listdir(ckpt_dir)
            )
        )
        wait_until(saving, launch, interval=0.002)
    t = time.monotonic()
    step = max(launch.steps() or [0])
    if kind == "sigterm":
        launch.signal(signal.SIGTERM, (process,))
    elif kind == "sigkill":
        launch.signal(signal.SIGKILL, (process,))
    elif kind == "sigkill_all_in_save":
        launch.signal(signal.SIGKILL)
    elif kind == "sigstop":
        launch.signal(signal.SIGSTOP, (process,))
    elif kind == "disk_full":
        fill_disk(ckpt_dir)
    elif kind == "unwritable":
        set_writable(ckpt_dir, False)
    return t, step


def repair(kind: str, ckpt_dir: str) -> None:
    """Undo a disk fault before the restart (an operator freeing space or fixing permissions)."""
    if kind == "disk_full":
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(ckpt_dir, "ballast"))
    elif kind == "unwritable":
        set_writable(ckpt_dir, True)


def schedule(kinds, num_steps: int, save_every: int, seed: int) -> list[dict]:
    """Seeded fault order, processes and target steps (strictly increasing, a save apart)."""
    rng = random.Random(seed)
    kinds = list(kinds)
    rng.shuffle(kinds)
    first, last = 6, num_steps - 2  # a fault needs steps before it and the run a few after
    gap = (last - first) / len(kinds)
    if gap < save_every + 2:  # each fault must come after the step the previous one restores
        raise SystemExit(f"{len(kinds)} faults do not fit in {num_steps} steps")
    out = []
    for i, kind in enumerate(kinds):
        target = int(first + i * gap + rng.uniform(0, gap - save_every - 2))
        out.append({"kind": kind, "process": rng.randrange(2), "target_step": target})
    return out


# --- the runs ------------------------------------------------------------------------------------


def trainer_args(cfg: dict) -> list[str]:
    args = [
        "--gin", "gin/smoke.gin", "--gin.EvalConfig.every=0",
        f"--gin.train.num_steps={cfg['num_steps']}", "--gin.train.log_every=1",
        f"--gin.CheckpointConfig.save_every={cfg['save_every']}",
    ]  # fmt: skip
    if cfg.get("curriculum_steps"):
        args.append(f"--gin.train.curriculum_steps={cfg['curriculum_steps']}")
    if cfg.get("compile_cache"):  # one cache for every run (else each workdir has its own)
        args.append(f"--gin.compile_cache.directory='{cfg['compile_cache']}'")
    return args


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the soak measures its own workdir's cache
    env.setdefault(
        "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    env.setdefault("WANDB_MODE", "disabled")
    env["JAX_EXPLAIN_CACHE_MISSES"] = "true"  # Launch.cache_misses reads the explanations
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    return env


def inspect(workdir: str) -> dict:
    r = subprocess.run(
        [sys.executable, "tools/inspect_checkpoint.py", workdir, "--json"],
        cwd=REPO, capture_output=True, text=True, env=child_env(), check=True,
    )  # fmt: skip
    return json.loads(r.stdout)


def rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_time(ref_rows: list[dict], batch: int) -> float:
    """Median steady-state seconds per step of the reference (rows after the first)."""
    return statistics.median(batch / r["images_per_sec"] for r in ref_rows[1:])


def run_reference(cfg: dict, base: str, reuse: bool = False) -> dict:
    workdir = os.path.join(base, "reference")
    saved = os.path.join(base, "reference.json")
    if reuse and os.path.exists(saved):  # an earlier soak's reference in the same --workdir
        with open(saved) as f:
            ref = json.load(f)
        if ref["config"] == trainer_args(cfg):
            ref["first_step"] = {int(k): v for k, v in ref["first_step"].items()}
            return ref
    cache_off = [] if cfg.get("compile_cache") else ["--gin.compile_cache.enabled=False"]
    args = [*trainer_args(cfg), *cache_off]
    launch = Launch("reference", workdir, args, base, child_env())
    rc = launch.wait()
    if rc != 0:
        raise SystemExit(f"reference run failed (exit {rc}):\n{launch.out[-4000:]}")
    ref = {
        "workdir": workdir,
        "wall_s": launch.t_end - launch.t0,
        "first_step": launch.first_steps(),
        "config": trainer_args(cfg),
    }
    with open(saved, "w") as f:
        json.dump(ref, f)
    return ref


def run_soak(cfg: dict, base: str, seed: int) -> dict:
    workdir = os.path.join(base, "soak")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    faults = schedule(cfg["kinds"], cfg["num_steps"], cfg["save_every"], seed)
    launches, pending = [], list(faults)
    failures_in_a_row = 0
    with checkpoint_fs(ckpt_dir, want_tmpfs="disk_full" in cfg["kinds"]) as tmpfs:
        if not tmpfs:
            for f in faults:
                if f["kind"] == "disk_full":
                    f["kind"], f["note"] = "unwritable", "no tmpfs (not root): unwritable instead"
        t_start = time.monotonic()
        while True:
            index = len(launches)
            cold = 0 < index <= cfg["cold_restarts"]
            args = trainer_args(cfg) + (["--gin.compile_cache.enabled=False"] if cold else [])
            launch = Launch(f"soak-{index:02d}", workdir, args, base, child_env())
            record = {"index": index, "cold_restart": cold, "fault": None}
            fault, t_fault = (pending[0] if pending else None), 0.0
            if fault is not None:
                target = fault["target_step"]
                reached = wait_until(
                    lambda launch=launch, target=target: max(launch.steps() or [0]) >= target,
                    launch,
                )
                if reached:
                    pending.pop(0)
                    t_fault, step = inject(fault["kind"], fault["process"], launch, ckpt_dir)
                    fault.update(injected_at_step=step, launch=index)
                    record["fault"] = fault["kind"]
            rc = launch.wait()
            if record["fault"]:
                # first exit: the job decided to stop; job end: the launcher returned (a stopped
                # process is killed --kill_after seconds after its peers left)
                fault["first_exit_s"] = round(launch.t_first_exit - t_fault, 2)
                fault["job_end_s"] = round(launch.t_end - t_fault, 2)
                repair(fault["kind"], ckpt_dir)
            action = exit_codes.action(rc)
            record.update(
                rc=rc, exit_codes=launch.exit_codes(), action=action,
                resumed_from=launch.resumed_step(), last_step=max(launch.steps() or [0]),
                first_step=launch.first_steps(), wall_s=round(launch.t_end - launch.t0, 2),
                cache_misses=launch.cache_misses(),
            )  # fmt: skip
            launches.append(record)
            print(
                f"soak: launch {index} {'(cold) ' if cold else ''}fault={record['fault']} "
                f"exit {record['exit_codes']} -> {rc} ({action}); steps "
                f"{record['resumed_from']}..{record['last_step']}",
                flush=True,
            )
            if action == exit_codes.DONE:
                break
            if action == exit_codes.STOP:
                raise SystemExit(f"soak: exit {rc} is not retryable:\n{launch.out[-4000:]}")
            planned = record["fault"] is not None or action == exit_codes.RESUME
            failures_in_a_row = 0 if planned else failures_in_a_row + 1
            if failures_in_a_row > 3:
                raise SystemExit(f"soak: 4 unplanned failures in a row:\n{launch.out[-4000:]}")
        wall = time.monotonic() - t_start
        final = inspect(workdir)
    return {"workdir": workdir, "wall_s": wall, "faults": faults, "launches": launches,
            "final": final, "tmpfs": tmpfs}  # fmt: skip


# --- the report ----------------------------------------------------------------------------------


def report(cfg: dict, ref: dict, soak: dict, batch: int) -> dict:
    ref_rows, soak_rows = rows(ref["workdir"]), rows(soak["workdir"])
    t_step = step_time(ref_rows, batch)
    launches = soak["launches"]
    for f in soak["faults"]:
        if "launch" not in f:
            continue
        ended, nxt = launches[f["launch"]], launches[f["launch"] + 1]
        f["exit_codes"], f["action"] = ended["exit_codes"], ended["action"]
        f["last_step"], f["restored_step"] = ended["last_step"], nxt["resumed_from"]
        f["steps_lost"] = ended["last_step"] - nxt["resumed_from"]
    lost: dict[str, list[int]] = {}
    for f in soak["faults"]:
        if "steps_lost" in f:
            lost.setdefault(f["kind"], []).append(f["steps_lost"])

    def restart_times(cold: bool) -> dict:
        parts = [
            max(r["first_step"].values(), key=lambda t: t["total_s"])
            for r in launches[1:]
            if r["cold_restart"] == cold and r["first_step"]
        ]
        if not parts:
            return {}
        med = lambda k: round(statistics.median(p[k] for p in parts), 2)
        keys = ("total_s", "startup_s", "restore_s", "compile_s", "first_step_s")
        out = {k: med(k) for k in keys}
        out["n"] = len(parts)
        out["compile_s_per_process"] = [
            {p: t["compile_s"] for p, t in sorted(r["first_step"].items())}
            for r in launches[1:] if r["cold_restart"] == cold
        ]  # fmt: skip
        return out

    cold, warm = restart_times(True), restart_times(False)
    ref_final = inspect(ref["workdir"])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
    logged = [r["step"] for r in soak_rows]
    injected = [f for f in soak["faults"] if "launch" in f]
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs (load average at the end "
        f"{os.getloadavg()[0]:.1f})",
        "faults_injected": len(injected),
        "fault_kinds": sorted({f["kind"] for f in injected}),
        "restarts": len(launches) - 1,
        "faults": soak["faults"],
        "steps_lost_per_kind": {k: {"each": v, "max": max(v)} for k, v in sorted(lost.items())},
        "restart_to_first_step_s": {
            "cold_no_cache": cold,
            "warm_cache": warm,
            "warm_over_cold": round(warm["total_s"] / cold["total_s"], 3)
            if cold and warm
            else None,
        },
        "reference": {
            "wall_s": round(ref["wall_s"], 2),
            "step_s": round(t_step, 4),
            "first_step": ref["first_step"],
            "goodput": round(cfg["num_steps"] * t_step / ref["wall_s"], 4),
        },
        "soak_wall_s": round(soak["wall_s"], 2),
        "goodput": round(cfg["num_steps"] * t_step / soak["wall_s"], 4),
        "final": {
            "step": soak["final"]["step"],
            "params_bitwise_equal": soak["final"]["params_sha256"] == ref_final["params_sha256"],
            "ema_bitwise_equal": soak["final"]["ema_params_sha256"]
            == ref_final["ema_params_sha256"],
            "one_row_per_logged_step": logged == list(range(1, cfg["num_steps"] + 1)),
            "metrics_equal_reference": strip(soak_rows) == strip(ref_rows),
        },
        "disk_full_on_tmpfs": soak["tmpfs"],
        "launches": launches,
    }


def summary(rep: dict) -> str:
    lines = [
        f"faults {rep['faults_injected']} ({', '.join(rep['fault_kinds'])}), restarts "
        f"{rep['restarts']}, soak {rep['soak_wall_s']:.0f}s, "
        f"reference {rep['reference']['wall_s']:.0f}s",
        f"goodput {rep['goodput']:.1%} (reference run alone {rep['reference']['goodput']:.1%}; "
        f"step {rep['reference']['step_s'] * 1e3:.0f} ms)",
        "steps lost per kind: "
        + ", ".join(f"{k} {v['each']}" for k, v in rep["steps_lost_per_kind"].items()),
    ]
    for name, t in rep["restart_to_first_step_s"].items():
        if isinstance(t, dict) and t:
            lines.append(
                f"restart-to-first-step {name} (median of {t['n']}): {t['total_s']}s = start-up "
                f"{t['startup_s']} + restore {t['restore_s']} + compile {t['compile_s']} + "
                f"first step {t['first_step_s']}"
            )
    lines.append(f"warm / cold: {rep['restart_to_first_step_s']['warm_over_cold']}")
    lines.append(f"final: {rep['final']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the runs go (default: a new temporary folder)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument(
        "--reuse_reference",
        action="store_true",
        help="reuse the uninterrupted run an earlier soak left in --workdir (same settings)",
    )
    p.add_argument(
        "--compile_cache",
        help="one compilation cache for the reference and the soak (default: the reference runs "
        "without one and the soak uses its workdir's, so the first start is cold)",
    )
    args = p.parse_args(argv)
    cfg = dict(SCHEDULES[args.schedule], schedule=args.schedule, seed=args.seed)
    cfg["compile_cache"] = args.compile_cache
    schedule(cfg["kinds"], cfg["num_steps"], cfg["save_every"], args.seed)  # fits?
    base = args.workdir or tempfile.mkdtemp(prefix="jcdm-soak-")
    os.makedirs(base, exist_ok=True)
    try:
        ref = run_reference(cfg, base, reuse=args.reuse_reference)
        soak = run_soak(cfg, base, args.seed)
        rep = report(cfg, ref, soak, batch=16)  # smoke.gin's global batch
        rep["command"] = "python bench/soak.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(base, ignore_errors=True)
    print(summary(rep), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
    return rep


if __name__ == "__main__":
    main()
