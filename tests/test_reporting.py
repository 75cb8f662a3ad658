"""The end-of-run summary: where the grids are and the next command (in-process, no JAX)."""

import io
import os

from jcdm.runtime import reporting


def test_next_steps_name_the_newest_grids_and_a_command_that_reuses_the_run_config(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "demo"
    (run / "samples").mkdir(parents=True)
    (run / "wandb").mkdir()
    for name in ("1step_0000200.png", "1step_0000600.png", "2step_0000600.png"):
        (run / "samples" / name).write_bytes(b"")
    out = io.StringIO()
    lines = reporting.print_next_steps(str(run), enabled=True, file=out)
    assert out.getvalue().splitlines() == lines
    text = out.getvalue()
    grids = next(ln for ln in lines if "sample grids" in ln)
    assert os.path.join("runs", "demo", "samples", "1step_0000600.png") in grids
    assert os.path.join("runs", "demo", "samples", "2step_0000600.png") in grids
    assert "0000200" not in grids  # only the newest grid of each sampler
    cfg = os.path.join("runs", "demo", "config.gin")
    assert f"jcdm --gin {cfg} --workdir {os.path.join('runs', 'demo')} --only_inference" in text
    assert "wandb sync" in text


def test_next_steps_print_nothing_on_other_processes(tmp_path):
    out = io.StringIO()
    assert reporting.print_next_steps(str(tmp_path), enabled=False, file=out) == []
    assert out.getvalue() == ""
