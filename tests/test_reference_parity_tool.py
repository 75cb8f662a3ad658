"""tools/reference_parity.py's argument errors (docs/recipe.md section 2).

The parity check itself needs a checkout of boingkiri/joint_training, which CI does not have, so
only its clear failures are tested here: exit 2 and a message naming --reference when the
directory is missing or is not the reference, or when the reference's imports fail.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    path = REPO / "tools" / "reference_parity.py"
    spec = importlib.util.spec_from_file_location("reference_parity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_missing_reference_directory_exits_2_naming_the_flag(tmp_path, capsys):
    tool = _load_tool()
    missing = tmp_path / "no-such-checkout"
    assert tool.main(["--reference", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--reference" in err and "no such directory" in err
    assert "boingkiri/joint_training" in err  # and how to get it


def test_directory_that_is_not_the_reference_exits_2(tmp_path, capsys):
    tool = _load_tool()
    (tmp_path / "model").mkdir()
    assert tool.main(["--reference", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--reference" in err and "model/unetpp.py" in err


def test_reference_whose_imports_fail_exits_2(tmp_path, capsys, monkeypatch):
    tool = _load_tool()
    from tools.parity.common import REQUIRED_FILES  # the tool put the repository on sys.path

    for rel in REQUIRED_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "model/ct/ncsnpp.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the tool puts the reference first
    before = set(sys.modules)
    try:
        assert tool.main(["--reference", str(tmp_path)]) == 2
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("model", "utils", "framework", "omegaconf", "einops"):
                del sys.modules[name]
    err = capsys.readouterr().err
    assert "importing the reference" in err and "a_module_that_is_not_installed" in err


def test_reference_flag_is_required():
    tool = _load_tool()
    with pytest.raises(SystemExit) as e:
        tool.main([])
    assert e.value.code == 2
