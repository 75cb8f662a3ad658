"""tools/fid_stats.py end to end: ArrayRecord dataset and --npz sample file give the same stats.

Random-init Inception weights (written with the converter's .npz writer) keep this independent of
torch; what is tested is the tool's plumbing: reading, batching with a padded last batch, the
stats file and its metadata, and the FID of a set against its own statistics. The reference
statistics go to a bucket (`--out gs://...`, read back with `--ref gs://...`) on the tests' real
GCS API server (`gcs_server` in conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jcdm.fid.convert import save_npz
from jcdm.fid.fid import load_stats, load_stats_metadata
from jcdm.fid.inception import flatten, init_params

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("fid_stats", REPO / "tools" / "fid_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dataset_and_npz_give_identical_stats(tmp_path, capsys, bucket):
    from jcdm.data import write_image_records

    tool = _load_tool()
    weights = save_npz(
        {k: np.asarray(v) for k, v in flatten(init_params(0)).items()}, tmp_path / "w.npz"
    )
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    write_image_records(
        tmp_path / "data" / "train",
        [(images, np.zeros(3, np.int32))],
        num_records=3,
        image_shape=(32, 32, 3),
        num_shards=2,
        split="train",
        name="tiny",
    )
    np.savez(tmp_path / "samples.npz", images=images)
    common = ["--batch_size", "2", "--inception_weights", str(weights)]

    ref = f"{bucket}/stats/ref.npz"
    rc = tool.main([str(tmp_path / "data"), "--out", ref, *common])
    assert rc == 0
    mu_ref, sigma_ref = load_stats(ref)
    meta = load_stats_metadata(ref)
    assert meta["count"] == 3 and "train" in meta["source"]
    assert len(meta["inception_weights_sha256"]) == 64
    assert mu_ref.shape == (2048,) and sigma_ref.shape == (2048, 2048)

    out = tmp_path / "samples_stats.npz"
    args = ["--npz", str(tmp_path / "samples.npz"), "--out", str(out), "--ref"]
    rc = tool.main([*args, ref, *common])
    assert rc == 0
    mu, sigma = load_stats(out)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-9)
    fid_line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FID vs")]
    assert len(fid_line) == 1 and abs(float(fid_line[0].rsplit(" ", 1)[1])) < 1e-3

    # Bad input is a usage error with a message, not a traceback.
    np.savez(tmp_path / "bad.npz", pictures=images)
    rc = tool.main(["--npz", str(tmp_path / "bad.npz"), "--out", str(out), *common])
    assert rc == 2
    assert "no `images` array" in capsys.readouterr().err
