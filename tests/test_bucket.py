"""gs:// workdirs with the real clients (gcsfs, TensorStore's gcs driver, JAX's cache through
etils) against a real GCS API server on localhost (fake-gcs-server, `gcs_server` in
conftest.py). One module fixture runs every process, overlapping what can overlap:

    pre:    2 processes x 1 device on gs://.../run, 8 steps, saves every 2,   } concurrently
            the compilation cache in the bucket; SIGTERM to process 1 after    }
            step 2 -> exit 75 at an agreed step k                              }
    fail:   1 process, gs://.../fail, 8 steps, saves at 4 and 8; the bucket    }
            answers 403 to every write of step 8 -> exit 1, step 4 kept
    ref:    as pre, uninterrupted, on local disk (its programs from pre's  } concurrently
            cache in the bucket)                                           }
    retry:  fail's workdir with the bucket healthy -> exit 0               }
    resume: pre's workdir from step k to 8 -> exit 0                       }
    then, on fail's workdir: the `--only_inference` command the run printed, run as printed, and
    tools/inspect_checkpoint.py

`tools/fid_stats.py --out gs://...` is tested in test_fid_stats_tool.py (its compiled Inception
is shared with that test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from jcdm import exit_codes
from jcdm.runtime import io
from tests.trainer import launch_local_argv

pytestmark = pytest.mark.slow

STEPS = 8
SMOKE = ["--gin", "gin/smoke.gin", "--gin.EvalConfig.every=0"]
MULTI = [*SMOKE, f"--gin.train.num_steps={STEPS}", "--gin.CheckpointConfig.save_every=2"]
TIMEOUT_S = 600
MISS = r"\[p{}\] .*PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'"


class Proc:
    """One subprocess whose combined output goes to a file we can poll."""

    def __init__(self, repo: str, log_path: str, argv: list[str], env: dict) -> None:
        self.log_path = log_path
        self.t0 = time.monotonic()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                argv, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
            )
        self.rc: int | None = None

    @property
    def out(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait(self) -> Proc:
        try:
            self.rc = self.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log_path}: timed out after {TIMEOUT_S}s:\n{self.out[-4000:]}")
        print(f"\n{os.path.basename(self.log_path)}: exit {self.rc} after {self.seconds():.0f}s")
        return self

    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def kill(self) -> None:
        for pid in re.findall(r"\[launch\] process \d+ pid (\d+)", self.out):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait()


@dataclasses.dataclass
class Runs:
    bucket: str
    ref: Proc
    pre: Proc
    resume: Proc
    fail: Proc
    fail_step4: dict[str, bytes]  # step 4's objects right after the failed save of step 8
    fail_objects: list[str]  # every checkpoint object right after the failed save
    rejected: list[str]
    retry: Proc
    retry_step4: dict[str, bytes]
    inference: Proc
    inference_argv: list[str]


def _objects(server, bucket: str, prefix: str) -> dict[str, bytes]:
    return server.objects(bucket[len("gs://") :], prefix)


@pytest.fixture(scope="module")
def runs(repo, gcs_server, tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("bucket")
    bucket = gcs_server.create_bucket("runs")
    env = dict(os.environ)  # the server's variables included (conftest)
    # No JAX_COMPILATION_CACHE_DIR: the 2-process bucket run keeps its cache in the bucket.
    bucket_cache_env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    bucket_cache_env["JAX_EXPLAIN_CACHE_MISSES"] = "true"
    started: list[Proc] = []

    def start(name: str, argv: list[str], env: dict) -> Proc:
        started.append(Proc(repo, str(base / f"{name}.log"), argv, env))
        return started[-1]

    def trainer(args: list[str]) -> list[str]:
        return [sys.executable, "-m", "jcdm", *args]

    fail_args = [*SMOKE, "--gin.train.num_steps=8", "--gin.CheckpointConfig.save_every=4"]
    fail_args += ["--workdir", f"{bucket}/fail"]
    try:
        pre = start("pre", launch_local_argv(2, 1, MULTI, f"{bucket}/run"), bucket_cache_env)
        gcs_server.reject_writes("fail/checkpoints/8/")
        fail = start("fail", trainer(fail_args), env)

        progress = lambda: [int(s) for s in re.findall(rf"\[p0\] \[#*-*\] (\d+)/{STEPS}", pre.out)]
        while not any(s >= 2 for s in progress()):
            if pre.proc.poll() is not None or time.monotonic() - pre.t0 > TIMEOUT_S:
                pytest.fail(f"pre: ended before step 2:\n{pre.out[-4000:]}")
            time.sleep(0.1)
        for i, pid in re.findall(r"\[launch\] process (\d+) pid (\d+)", pre.out):
            if i == "1":
                os.kill(int(pid), signal.SIGTERM)
        # The local reference run loads its programs from the bucket's cache, which `pre` has
        # filled by now: one cold 2-process compile fewer on a 2-core machine.
        ref_env = {**bucket_cache_env, "JAX_COMPILATION_CACHE_DIR": f"{bucket}/run/compile_cache"}
        ref = start("ref", launch_local_argv(2, 1, MULTI, str(base / "ref")), ref_env)
        fail.wait()
        gcs_server.reject_writes(None)
        rejected = list(gcs_server.rejected)
        fail_ckpts = _objects(gcs_server, bucket, "fail/checkpoints/")
        fail_step4 = {k: v for k, v in fail_ckpts.items() if k.startswith("fail/checkpoints/4/")}
        retry = start("retry", trainer(fail_args), env)
        pre.wait()
        resume = start("resume", launch_local_argv(2, 1, MULTI, f"{bucket}/run"), bucket_cache_env)
        retry.wait()
        retry_step4 = _objects(gcs_server, bucket, "fail/checkpoints/4/")
        # The command the bucket run printed at its end, run as printed.
        printed = re.search(r"^ +(jcdm --gin \S+ .*--only_inference.*)$", retry.out, re.M)
        assert printed, retry.out[-3000:]
        argv = shlex.split(printed[1])
        inference = start("inference", [sys.executable, "-m", *argv], env)
        inference.wait()
        resume.wait()
        ref.wait()
    finally:
        for p in started:
            if p.proc.poll() is None:
                p.kill()
    return Runs(
        bucket,
        ref,
        pre,
        resume,
        fail,
        fail_step4,
        sorted(fail_ckpts),
        rejected,
        retry,
        retry_step4,
        inference,
        argv,
    )


def _rows(workdir: str) -> list[dict]:
    rows = [json.loads(r) for r in io.read_text(f"{workdir}/metrics.jsonl").splitlines() if r]
    return [{k: v for k, v in r.items() if k not in ("images_per_sec", "compile_s")} for r in rows]


def test_preempted_bucket_run_resumes_and_equals_the_local_run_bitwise(runs, repo):
    from tools import inspect_checkpoint

    assert runs.ref.rc == exit_codes.SUCCESS, runs.ref.out[-3000:]
    out = runs.pre.out
    assert runs.pre.rc == exit_codes.PREEMPTED, out[-4000:]
    assert "exit codes [75, 75] -> 75" in out
    (k,) = {int(s) for s in re.findall(r"preempted: checkpoint at step (\d+) committed", out)}
    assert 2 <= k < STEPS
    assert runs.resume.rc == exit_codes.SUCCESS, runs.resume.out[-4000:]
    assert f"resumed from step {k}" in runs.resume.out
    run = f"{runs.bucket}/run"
    want = inspect_checkpoint.describe(str(runs.ref.proc.args[-1]), None)
    got = inspect_checkpoint.describe(run, None)
    assert got["step"] == want["step"] == STEPS
    assert got["params_sha256"] == want["params_sha256"]
    assert got["ema_params_sha256"] == want["ema_params_sha256"]
    assert _rows(run) == _rows(runs.ref.proc.args[-1])
    assert not os.path.exists(os.path.join(repo, "gs:"))  # nothing went to a local folder


def test_the_compilation_cache_lives_in_the_bucket_and_serves_the_restart(runs, gcs_server):
    for out in (runs.pre.out, runs.resume.out, runs.ref.out):
        assert f"persistent compilation cache: {runs.bucket}/run/compile_cache" in out
    cached = _objects(gcs_server, runs.bucket, "run/compile_cache/")
    assert any("jit_train_step" in name for name in cached), sorted(cached)
    # Both processes compiled on the first launch; neither on the restart, nor the local run
    # that reads the same cache.
    assert re.search(MISS.format(0), runs.pre.out) and re.search(MISS.format(1), runs.pre.out)
    for p in (0, 1):
        assert not re.search(MISS.format(p), runs.resume.out), runs.resume.out[-4000:]
        assert not re.search(MISS.format(p), runs.ref.out), runs.ref.out[-4000:]


def test_a_bucket_that_fails_mid_save_keeps_the_previous_checkpoint_and_the_retry_succeeds(
    runs, gcs_server
):
    out = runs.fail.out
    assert runs.fail.rc == exit_codes.FAILURE, out[-4000:]
    assert "saving the checkpoint of step 8" in out and "the previous checkpoint (step 4)" in out
    assert any("fail/checkpoints/8/" in r for r in runs.rejected)
    assert "fail/checkpoints/4/commit_success.txt" in runs.fail_objects
    assert not any(n.startswith("fail/checkpoints/8/") for n in runs.fail_objects)
    assert runs.fail_step4 and runs.retry_step4 == runs.fail_step4  # byte for byte
    assert runs.retry.rc == exit_codes.SUCCESS, runs.retry.out[-4000:]
    assert "resumed from step 4" in runs.retry.out
    done = _objects(gcs_server, runs.bucket, "fail/checkpoints/8/")
    assert "fail/checkpoints/8/commit_success.txt" in done
    assert [r["step"] for r in _rows(f"{runs.bucket}/fail")] == list(range(1, 9))


def test_the_printed_only_inference_command_works_on_the_bucket(runs, gcs_server):
    argv = runs.inference_argv
    assert argv[:3] == ["jcdm", "--gin", f"{runs.bucket}/fail/config.gin"]
    assert runs.inference.rc == exit_codes.SUCCESS, runs.inference.out[-4000:]
    out = _objects(gcs_server, runs.bucket, "fail/inference/step_8/")
    assert {"samples_1step.npz", "samples_2step.npz"} <= {n.rsplit("/", 1)[1] for n in out}


def test_inspect_checkpoint_reads_the_bucket(runs, repo):
    cmd = [sys.executable, "tools/inspect_checkpoint.py", f"{runs.bucket}/fail", "--json"]
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert info["step"] == 8 and info["steps"] == [4, 8], info
    assert len(info["params_sha256"]) == 64
