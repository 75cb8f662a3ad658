"""jcdm.runtime.io: atomic local writes, errors that name the path, and bucket workdirs (every
output the trainer, inference and tools write reaches the bucket, no local `gs:` folder). The
bucket tests use a real GCS API server (fake-gcs-server, `gcs_server` in conftest.py) and read
what landed straight from its API, not through the client under test."""

from __future__ import annotations

import errno
import io as stdlib_io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from jcdm.runtime import io, reporting


@pytest.fixture(autouse=True)
def _no_gin_left_behind():
    """Tests here run `jcdm.main.run` in-process, which parses gin/smoke.gin into the global
    config; later test files (NCSN++ parameter counts) must see the defaults again."""
    yield
    import gin

    gin.clear_config(clear_constants=True)


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    io.write_json(target, {"k": [1, 2]})
    assert json.loads(target.read_text()) == {"k": [1, 2]}
    io.write_text(target, "second")
    assert target.read_text() == "second"
    io.write_npz(tmp_path / "a" / "z.npz", images=np.arange(6, dtype=np.uint8))
    with np.load(tmp_path / "a" / "z.npz") as z:
        assert z["images"].tolist() == list(range(6))
    assert sorted(os.listdir(tmp_path / "a")) == ["b", "z.npz"]
    assert os.listdir(tmp_path / "a" / "b") == ["x.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_written_files_follow_the_umask_like_open_does(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        io.write_text(tmp_path / "config.gin", "x = 1\n")
        io.write_npz(tmp_path / "stats.npz", mu=np.zeros(2))
        io.write_text(tmp_path / "config.gin", "x = 2\n")  # a rewrite gets the same mode
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert os.stat(tmp_path / "plain").st_mode & 0o777 == want
    for name in ("config.gin", "stats.npz"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == want, name


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    io.write_json(target, {"v": 1})

    def broken_replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, like the OS

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError) as info:
        io.write_json(target, {"v": 2})
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)  # the message names the file
    assert str(target) in str(info.value)
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_an_unwritable_location_raises_an_os_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError) as info:
        io.write_text(tmp_path / "file" / "x.txt", "data")
    assert str(tmp_path / "file") in str(info.value)


def _names(server, bucket: str) -> list[str]:
    name = bucket[len("gs://") :]
    return sorted(f"{bucket}/{k}" for k in server.objects(name))


def test_each_real_client_talks_to_the_local_server(gcs_server, bucket):
    """gcsfs (etils.epath, jcdm.runtime.io) and TensorStore's gcs driver (Orbax) both reach the
    server: what one writes, the server's own API and the other client see; a listing taken
    before TensorStore wrote is not served from a stale cache."""
    import tensorstore as ts

    before = gcs_server.requests
    io.write_text(f"{bucket}/run/a.txt", "from gcsfs")
    assert [p.name for p in io.path(f"{bucket}/run").iterdir()] == ["a.txt"]
    spec = {"driver": "zarr", "kvstore": f"{bucket}/run/arr/"}
    arr = ts.open(spec, create=True, dtype=ts.int32, shape=[3]).result()
    arr.write(np.arange(3, dtype=np.int32)).result()
    kv = ts.KvStore.open(f"{bucket}/run/").result()
    assert kv.read("a.txt").result().value == b"from gcsfs"
    assert sorted(p.name for p in io.path(f"{bucket}/run").iterdir()) == ["a.txt", "arr"]
    assert ts.open(spec).result().read().result().tolist() == [0, 1, 2]
    assert _names(gcs_server, bucket) == [
        f"{bucket}/run/a.txt",
        f"{bucket}/run/arr/.zarray",
        f"{bucket}/run/arr/0",
    ]
    assert gcs_server.requests > before


def test_a_missing_bucket_client_is_a_usage_error_with_the_pip_command(monkeypatch, capsys):
    import importlib.util

    from jcdm import exit_codes, main

    assert io.missing_bucket_client("gs://b/run") is None  # gcsfs is a base dependency
    assert io.missing_bucket_client("runs/x") is None
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gcsfs" else real(n, *a)
    )
    message = io.missing_bucket_client("gs://b/run")
    assert "pip install gcsfs" in message and "gs://b/run" in message
    # --only_inference: the same check, without installing the trainer's SIGTERM handler here.
    code = main.run(["--gin", "gin/smoke.gin", "--workdir", "gs://b/run", "--only_inference"])
    assert code == exit_codes.USAGE  # not 1: a retry cannot install a package
    assert "pip install gcsfs" in capsys.readouterr().err
    # The tools that take bucket URLs say the same, with exit 2.
    from tests.test_fid_stats_tool import _load_tool
    from tools import inspect_checkpoint

    for tool, argv in [
        (inspect_checkpoint.main, ["gs://b/run"]),
        (_load_tool().main, ["--npz", "x.npz", "--out", "gs://b/stats.npz"]),
    ]:
        with pytest.raises(SystemExit) as info:
            tool(argv)
        assert info.value.code == exit_codes.USAGE
        assert "pip install gcsfs" in capsys.readouterr().err


def test_an_import_error_during_a_run_exits_2(monkeypatch, caplog, tmp_path):
    """A package missing deeper in (fsspec's ImportError for a gs:// path given in a binding) is
    not worth a retry either."""
    from jcdm import exit_codes, main
    from jcdm.runtime import compile_cache, distributed
    from jcdm.training import inference

    def missing(**kwargs):
        raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr(distributed, "initialize", lambda: None)
    monkeypatch.setattr(compile_cache, "compile_cache", lambda **kw: None)
    monkeypatch.setattr(main, "configure_logging", lambda level: None)
    monkeypatch.setattr(inference, "run", missing)
    argv = ["--gin", "gin/smoke.gin", "--workdir", str(tmp_path), "--only_inference"]
    assert main.run(argv) == exit_codes.USAGE
    assert "Please install gcsfs" in caplog.text and "a package is missing" in caplog.text


def test_bucket_writes_and_reads_go_to_the_bucket(gcs_server, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray local write would create ./gs: here
    io.write_json(f"{bucket}/run/r.json", {"fid": 3.5})
    io.write_npz(f"{bucket}/run/s.npz", images=np.ones((2, 2), np.uint8))
    io.mkdirs(f"{bucket}/run/samples")
    assert io.read_json(f"{bucket}/run/r.json") == {"fid": 3.5}
    assert io.exists(f"{bucket}/run/s.npz") and not io.exists(f"{bucket}/run/none")
    assert _names(gcs_server, bucket) == [f"{bucket}/run/r.json", f"{bucket}/run/s.npz"]
    assert os.listdir(tmp_path) == []


def test_reporter_with_a_bucket_workdir_uploads_metrics_and_grids(
    gcs_server, bucket, tmp_path, monkeypatch
):
    """A bucket object cannot be appended to: rows are kept and metrics.jsonl is rewritten whole
    (at most every `upload_every_s`, and at close); a resumed run drops rows past its step."""
    monkeypatch.chdir(tmp_path)
    run = f"{bucket}/run"
    io.write_text(f"{run}/metrics.jsonl", '{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    reporter = reporting.Reporter(
        run, enabled=True, num_steps=10, run_id="x", upload_every_s=3600, resume_step=2
    )
    reporter.write_metrics(3, {"loss": 1.5})
    assert io.read_text(f"{run}/metrics.jsonl") == '{"step": 1}\n{"step": 2}\n'
    reporter.save_grid(3, "1step", np.zeros((4, 8, 8, 3), np.float32))
    reporter.close()
    stored = gcs_server.objects(bucket[len("gs://") :])
    rows = [json.loads(r) for r in stored["run/metrics.jsonl"].decode().splitlines()]
    assert rows == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 1.5}]
    assert stored["run/samples/1step_0000003.png"][:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == []


def test_inference_outputs_and_fid_stats_reach_the_bucket(
    gcs_server, bucket, tmp_path, monkeypatch
):
    from jcdm.fid import fid
    from jcdm.training import inference

    monkeypatch.chdir(tmp_path)
    images = np.linspace(-1, 1, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3)
    inference._write(f"{bucket}/run/inference/step_7", "1step", images)
    data = io.read_bytes(f"{bucket}/run/inference/step_7/samples_1step.npz")
    with np.load(stdlib_io.BytesIO(data)) as z:
        np.testing.assert_array_equal(z["images"], reporting.to_uint8(images))
    mu, sigma = np.zeros(3), np.eye(3)
    fid.save_stats(f"{bucket}/stats/ref.npz", mu, sigma, count=5)
    got_mu, got_sigma = fid.load_stats(f"{bucket}/stats/ref.npz")
    assert np.array_equal(got_sigma, sigma)
    assert fid.load_stats_metadata(f"{bucket}/stats/ref.npz") == {"count": 5}
    assert _names(gcs_server, bucket) == [
        f"{bucket}/run/inference/step_7/grid_1step.png",
        f"{bucket}/run/inference/step_7/samples_1step.npz",
        f"{bucket}/stats/ref.npz",
    ]
    assert os.listdir(tmp_path) == []


def test_local_only_outputs_refuse_a_bucket_url_with_the_way_around():
    import argparse

    assert io.local_path_arg("out/dir") == Path("out/dir")
    with pytest.raises(
        argparse.ArgumentTypeError, match=r"gcloud storage cp -r LOCAL_DIR gs://b/x"
    ):
        io.local_path_arg("gs://b/x")
