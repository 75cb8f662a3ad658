"""Import boundaries between the layers (docs/architecture.md): the math stays free of system
code and the system free of math.

Checked statically: every `import` in a package's files (function-level imports included, since a
lazy import is still a dependency), followed transitively through the jcdm modules it reaches,
plus the `__init__.py` of every package on the way (importing `jcdm.ict.losses` runs
`jcdm/__init__.py` and `jcdm/ict/__init__.py` first). No module is imported, so this takes
milliseconds and cannot be fooled by what another test happened to import already.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "jcdm"

# Layer -> top-level names (third-party or jcdm sub-packages) it must never reach.
RULES = {
    # The method: jax and numpy only, so it reads like the paper and tests without a runtime.
    "jcdm.ict": [
        "gin",
        "flax",
        "optax",
        "orbax",
        "grain",
        "array_record",
        "wandb",
        "jcdm.models",
        "jcdm.runtime",
        "jcdm.training",
        "jcdm.data",
        "jcdm.fid",
        "jcdm.dev",
    ],
    # The system: mesh, processes, checkpoints, preemption, reporting know nothing of the method.
    "jcdm.runtime": ["jcdm.ict", "jcdm.models", "jcdm.training", "jcdm.fid", "flax", "optax"],
    # The input pipeline is system code too.
    "jcdm.data": ["jcdm.ict", "jcdm.models", "jcdm.training", "jcdm.runtime", "flax", "optax"],
    # The networks are pure Flax modules: no training loop, runtime or data underneath them.
    "jcdm.models": ["jcdm.training", "jcdm.runtime", "jcdm.data", "optax", "orbax", "grain"],
}
# Shared plumbing a layer may use although its package is otherwise out of bounds: the one I/O
# module (atomic local-or-bucket writes) is system code without any runtime state.
ALLOWED = {"jcdm.data": ["jcdm.runtime", "jcdm.runtime.io"]}


def module_file(name: str) -> Path | None:
    """The source file of a jcdm module or package, or None if `name` is not one."""
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    return None


def imports_of(name: str) -> set[str]:
    """Fully qualified names imported anywhere in module `name` (relative imports resolved)."""
    file = module_file(name)
    tree = ast.parse(file.read_text(), filename=str(file))
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "__future__":
                continue
            out.add(mod)
            # `from jcdm.ict import losses` imports the submodule jcdm.ict.losses.
            out.update(f"{mod}.{a.name}" for a in node.names if module_file(f"{mod}.{a.name}"))
    return out


def reachable(start: list[str]) -> dict[str, str]:
    """Every name imported from `start`'s modules, transitively through jcdm; name -> importer."""
    seen: dict[str, str] = {}
    todo = list(start)
    done: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in done:
            continue
        done.add(mod)
        parts = mod.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]
        for name in sorted(imports_of(mod)) + parents:
            seen.setdefault(name, mod)
            if name.split(".")[0] == "jcdm" and module_file(name) and name not in done:
                todo.append(name)
    return seen


def layer_modules(layer: str) -> list[str]:
    root = ROOT.joinpath(*layer.split("."))
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )


def _hits(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_stay_inside_its_boundary(layer):
    modules = layer_modules(layer)
    assert len(modules) >= 2, f"no modules found under {layer}"
    seen = reachable(modules)
    bad = sorted(
        f"{name} (imported by {by})"
        for name, by in seen.items()
        for forbidden in RULES[layer]
        if _hits(name, forbidden) and name not in ALLOWED.get(layer, ())
    )
    assert not bad, f"{layer} must not import {RULES[layer]}; found: {bad}"


def test_the_checker_sees_imports_it_must_flag():
    """The walker finds function-level and `from x import y` imports (the forms a lazy import of
    the runtime in the math would take), so an empty result above means something."""
    seen = reachable(["jcdm.training.evaluation"])
    assert "jcdm.fid.fid" in seen  # imported inside FIDEvaluator.__init__
    assert "jcdm.ict.sampling" in seen and "gin" in seen
    assert "jcdm.runtime.reporting" in seen
    # The trainer does reach flax through the models: the rules would flag it in the math.
    assert any(_hits(n, "flax") for n in reachable(["jcdm.training.train"]))
