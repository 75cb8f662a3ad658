"""jcdm.runtime.io: atomic local writes, errors that name the path, and bucket workdirs (every
output the trainer, inference and tools write reaches the bucket, no local `gs:` folder)."""

from __future__ import annotations

import errno
import io as stdlib_io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from jcdm.runtime import io, reporting
from tests.fake_bucket import fake_gcs, objects


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


def test_bucket_writes_and_reads_go_to_the_bucket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray local write would create ./gs: here
    with fake_gcs() as store:
        io.write_json("gs://b/run/r.json", {"fid": 3.5})
        io.write_npz("gs://b/run/s.npz", images=np.ones((2, 2), np.uint8))
        io.mkdirs("gs://b/run/samples")
        assert io.read_json("gs://b/run/r.json") == {"fid": 3.5}
        assert io.exists("gs://b/run/s.npz") and not io.exists("gs://b/run/none")
        assert objects(store) == ["gs://b/run/r.json", "gs://b/run/s.npz"]
    assert os.listdir(tmp_path) == []


def test_reporter_with_a_bucket_workdir_uploads_metrics_and_grids(tmp_path, monkeypatch):
    """A bucket object cannot be appended to: rows are kept and metrics.jsonl is rewritten whole
    (at most every `upload_every_s`, and at close); a resumed run drops rows past its step."""
    monkeypatch.chdir(tmp_path)
    with fake_gcs() as store:
        io.write_text("gs://b/run/metrics.jsonl", '{"step": 1}\n{"step": 2}\n{"step": 3}\n')
        reporter = reporting.Reporter(
            "gs://b/run",
            enabled=True,
            num_steps=10,
            run_id="x",
            upload_every_s=3600,
            resume_step=2,
        )
        reporter.write_metrics(3, {"loss": 1.5})
        assert io.read_text("gs://b/run/metrics.jsonl") == '{"step": 1}\n{"step": 2}\n'
        reporter.save_grid(3, "1step", np.zeros((4, 8, 8, 3), np.float32))
        reporter.close()
        rows = [json.loads(r) for r in io.read_text("gs://b/run/metrics.jsonl").splitlines()]
        assert rows == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 1.5}]
        assert io.read_bytes("gs://b/run/samples/1step_0000003.png")[:4] == b"\x89PNG"
        assert "gs://b/run/samples/1step_0000003.png" in objects(store)
    assert os.listdir(tmp_path) == []


def test_inference_outputs_and_fid_stats_reach_the_bucket(tmp_path, monkeypatch):
    from jcdm.fid import fid
    from jcdm.training import inference

    monkeypatch.chdir(tmp_path)
    with fake_gcs() as store:
        images = np.linspace(-1, 1, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3)
        inference._write("gs://b/run/inference/step_7", "1step", images)
        data = io.read_bytes("gs://b/run/inference/step_7/samples_1step.npz")
        with np.load(stdlib_io.BytesIO(data)) as z:
            np.testing.assert_array_equal(z["images"], reporting.to_uint8(images))
        mu, sigma = np.zeros(3), np.eye(3)
        fid.save_stats("gs://b/stats/ref.npz", mu, sigma, count=5)
        got_mu, got_sigma = fid.load_stats("gs://b/stats/ref.npz")
        assert np.array_equal(got_sigma, sigma) and fid.load_stats_metadata(
            "gs://b/stats/ref.npz"
        ) == {"count": 5}
        assert objects(store) == [
            "gs://b/run/inference/step_7/grid_1step.png",
            "gs://b/run/inference/step_7/samples_1step.npz",
            "gs://b/stats/ref.npz",
        ]
    assert os.listdir(tmp_path) == []


def test_local_only_outputs_refuse_a_bucket_url_with_the_way_around():
    import argparse

    assert io.local_path_arg("out/dir") == Path("out/dir")
    with pytest.raises(
        argparse.ArgumentTypeError, match=r"gcloud storage cp -r LOCAL_DIR gs://b/x"
    ):
        io.local_path_arg("gs://b/x")
