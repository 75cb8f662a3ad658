"""Loading the reference (docs/recipe.md section 2): checking its directory, stubbing its
math-irrelevant imports, importing its networks, composing its configs, and executing the needed
parts of its framework's loss code with pinned randomness (see tools/reference_parity.py).
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import HOW_TO_GET, REQUIRED_FILES, ParityError, Size


class AttrDict(dict):
    """A dict with attribute access, standing in for omegaconf's DictConfig."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _attrdict(tree: Any) -> Any:
    if isinstance(tree, dict):
        return AttrDict({k: _attrdict(v) for k, v in tree.items()})
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_reference_dir(ref: Path) -> None:
    """Raise ParityError unless `ref` looks like a checkout of boingkiri/joint_training."""
    if not ref.is_dir():
        raise ParityError(
            f"--reference {str(ref)!r}: no such directory. Get the reference with: {HOW_TO_GET}"
        )
    missing = [f for f in REQUIRED_FILES if not (ref / f).is_file()]
    if missing:
        raise ParityError(
            f"--reference {str(ref)!r} is not a checkout of boingkiri/joint_training "
            f"(missing {', '.join(missing)}). Get it with: {HOW_TO_GET}"
        )


def _install_stubs() -> list[str]:
    """Stub the reference's math-irrelevant imports that are not installed (tool docstring)."""
    stubbed = []
    if importlib.util.find_spec("omegaconf") is None:
        omegaconf = types.ModuleType("omegaconf")
        omegaconf.DictConfig = dict
        sys.modules["omegaconf"] = omegaconf
        stubbed.append("omegaconf")
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")

        def rearrange(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("einops is stubbed by tools/reference_parity.py")

        einops.rearrange = rearrange
        sys.modules["einops"] = einops
        stubbed.append("einops")
    return stubbed


def import_reference(ref: Path) -> types.SimpleNamespace:
    """Import the reference's network and EMA modules from `ref` (put first on sys.path)."""
    for top in ("model", "utils", "framework"):
        mod = sys.modules.get(top)
        if mod is not None and not any(
            str(p).startswith(str(ref)) for p in getattr(mod, "__path__", [])
        ):
            raise ParityError(f"a module named {top!r} is already imported from elsewhere: {mod}")
    stubbed = _install_stubs()
    sys.path.insert(0, str(ref))
    try:
        import model.ct.ncsnpp as ncsnpp  # the reference's, from `ref`
        import model.unetpp as unetpp
        import utils.ema.ema_cm as ema_cm
    except Exception as e:  # any import failure is the same user-facing error
        raise ParityError(
            f"importing the reference from {str(ref)!r} failed: {type(e).__name__}: {e} "
            f"(stubbed: {', '.join(stubbed) or 'nothing'}; see this tool's docstring)"
        ) from e
    for name, mod in (("model.unetpp", unetpp), ("utils.ema.ema_cm", ema_cm)):
        if not str(mod.__file__).startswith(str(ref)):
            raise ParityError(f"{name} was imported from {mod.__file__}, not from {ref}")
    return types.SimpleNamespace(unetpp=unetpp, ncsnpp=ncsnpp, ema_cm=ema_cm, stubbed=stubbed)


def reference_config(ref: Path, size: Size, vanilla: bool) -> AttrDict:
    """The reference's composed config (configs/config.yaml's defaults) with `size` applied."""
    import yaml

    def load(rel: str) -> dict:
        with open(ref / "configs" / rel) as f:
            return yaml.safe_load(f)

    cfg = {
        "framework": {"diffusion": load("framework/diffusion/cm_diffusion.yaml")},
        "model": {
            "diffusion": load("model/diffusion/original_ict.yaml"),
            "head": load("model/diffusion/score_head.yaml"),
        },
        "ema": load("ema/ema_ict.yaml"),
    }
    if vanilla:  # config_vanilla.yaml: framework.diffusion.gradient_flow_from_head = False
        cfg["framework"] = _merge(cfg["framework"], load("config_vanilla.yaml")["framework"])
    cfg["model"]["diffusion"] = _merge(
        cfg["model"]["diffusion"], dict(size.ref_backbone, dropout=0.0)
    )
    cfg["model"]["head"] = _merge(cfg["model"]["head"], dict(size.ref_head, dropout_rate=0.0))
    return _attrdict(cfg)


_FRAMEWORK_TARGETS = (
    "diffusion_framework",
    "model_config",
    "model_type",
    "head_config",
    "head_type",
    "self.head_type",
    "self.model",
    "self.head",
    "self.n_timestep",
    "self.sigma_min",
    "self.sigma_max",
    "self.rho",
    "self.mu_0",
    "self.s_0",
    "self.s_1",
    "k_prime",
    "self.ict_maximum_step_fn",
    "self.ict_t_steps_fn",
)
_FRAMEWORK_FUNCTIONS = (
    "ict_sigma_sampling_fn",
    "get_sigma_sampling",
    "pseudo_huber_loss_fn",
    "get_loss",
    "joint_training_loss_fn",
)


def _target_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


class _PinnedRandom:
    """jax.random with `normal` and `choice` pinned to given values (the tool docstring)."""

    def __init__(self) -> None:
        self.normal_value = None
        self.choice_value = None
        self.choice_p = None

    def normal(self, key: Any, shape: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        if tuple(shape) != tuple(self.normal_value.shape):
            raise ParityError(
                f"the reference drew noise of shape {tuple(shape)}, the pinned noise has "
                f"{tuple(self.normal_value.shape)}"
            )
        return self.normal_value

    def choice(
        self, key: Any, a: Any, shape: Sequence[int] = (), replace: bool = True, p: Any = None
    ) -> Any:
        import jax.numpy as jnp

        self.choice_p = p
        return jnp.take(a, self.choice_value)

    def __getattr__(self, name: str) -> Any:
        import jax

        return getattr(jax.random, name)


class _JaxWithPinnedRandom:
    def __init__(self, random: _PinnedRandom) -> None:
        self.random = random

    def __getattr__(self, name: str) -> Any:
        import jax

        return getattr(jax, name)


def load_reference_framework(
    ref: Path, modules: types.SimpleNamespace, cfg: AttrDict
) -> tuple[types.SimpleNamespace, dict, _PinnedRandom]:
    """Execute the needed parts of the reference's CMFramework.__init__ (the tool docstring).

    Returns (self stand-in with model/head/sigma grid, namespace with the loss functions, the
    pinned random module)."""
    path = ref / "framework/diffusion/consistency_framework.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    cls = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CMFramework"]
    init = [
        n for c in cls for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    ]
    if len(init) != 1:
        raise ParityError(f"{path}: no CMFramework.__init__")
    body, found = [], set()
    for stmt in init[0].body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name in _FRAMEWORK_FUNCTIONS:
            body.append(stmt)
            found.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [_target_name(t) for t in targets]
            if any(n in _FRAMEWORK_TARGETS for n in names):
                body.append(stmt)
                found.update(names)
    missing = set(_FRAMEWORK_TARGETS + _FRAMEWORK_FUNCTIONS) - found
    if missing:
        raise ParityError(f"{path}: CMFramework.__init__ lacks {sorted(missing)}")
    import jax.numpy as jnp

    random = _PinnedRandom()
    ns = {
        "__builtins__": builtins,
        "jax": _JaxWithPinnedRandom(random),
        "jnp": jnp,
        "DictConfig": AttrDict,
        "CMPrecond": modules.unetpp.CMPrecond,
        "ScoreDistillPrecond": modules.unetpp.ScoreDistillPrecond,
        "config": cfg,
        "self": types.SimpleNamespace(),
    }
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return ns["self"], ns, random
