"""List a run's checkpoints and describe one: parameter count, content hash, stored metrics.

    python tools/inspect_checkpoint.py WORKDIR [--step N] [--json]

WORKDIR is the trainer's --workdir (a local path or a bucket URL); its `checkpoints/` directory
is read. Only committed checkpoints are listed (Orbax's temporary directories of unfinished saves
are not). `--json` prints one object with the keys step, steps, num_params, params_sha256,
ema_params_sha256 and metrics.

`params_sha256` is the SHA-256 over the parameter leaves in sorted key-path order (e.g.
"['backbone']['Conv_0']['bias']"), each contributing its key path, dtype, shape and then its
values' bytes (C order, little-endian). Two runs that end with bitwise-identical parameters print
the same hash, whatever mesh or process count wrote them. Reads on the host CPU.

Each checkpoint is verified against the hashes saved with it (`jcdm.runtime.integrity`) before it
is described. Without `--step`, a damaged newest checkpoint is reported on stderr and the newest
intact one described (as training and `--only_inference` would restore); the tool moves nothing
(it may run beside a live trainer). A damaged `--step N`, or no intact checkpoint at all, is an
error (exit 1). `--json` adds `verified` (false for checkpoints saved before hashes existed) and
`damaged` ({step: why}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from etils import epath  # noqa: E402

from jcdm.runtime import integrity, quiet_loops  # noqa: E402


def checkpoint_dir(workdir: str) -> epath.Path:
    if "://" not in workdir:  # Orbax reads local checkpoints by absolute path only
        workdir = os.path.abspath(workdir)
    d = epath.Path(workdir) / "checkpoints"
    if not d.is_dir():
        raise SystemExit(f"inspect_checkpoint: no checkpoints directory in {workdir!r}")
    return d


def list_steps(workdir: str) -> list[int]:
    """Committed steps only, as Orbax's CheckpointManager would list them."""
    return sorted(ocp.path.step.checkpoint_steps(checkpoint_dir(workdir)))


def load_tree(path: epath.Path) -> dict:
    """The saved TrainState as nested dicts of numpy arrays (no device, no mesh needed).
    Raises ValueError if the checkpoint's metadata cannot be read."""
    ckptr = ocp.PyTreeCheckpointer()
    metadata = ckptr.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    if tree is None:
        raise ValueError(f"the array metadata in {path} is unreadable")
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def check(base: epath.Path) -> tuple[dict, bool]:
    """(the state, whether a manifest verified it) of one step directory; raises ValueError
    naming what is wrong if it cannot be read or differs from its manifest."""
    try:
        state = load_tree(base / "state")
        found = integrity.read_manifest(base)
        items = {n: json.loads((base / n / "metadata").read_text()) for n in ("data", "meta")}
    except Exception as e:
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise ValueError(f"unreadable ({type(e).__name__}: {first})") from e
    if found is None:
        return state, False
    problems = integrity.compare(
        found, integrity.leaf_specs(state), integrity.local_sums(state), items
    )
    if problems:
        why = "; ".join(problems[:3])
        raise ValueError(f"its values differ from the hashes saved with it: {why}")
    return state, True


def params_digest(params) -> tuple[int, str]:
    """(number of values, SHA-256 hex digest) of a parameter tree; see the module docstring."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    h = hashlib.sha256()
    count = 0
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(leaf)
        arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
        count += arr.size
    return count, h.hexdigest()


def describe(workdir: str, step: int | None = None) -> dict:
    steps = list_steps(workdir)
    if not steps:
        raise SystemExit(f"inspect_checkpoint: {workdir!r} holds no complete checkpoint")
    if step is not None and step not in steps:
        raise SystemExit(f"inspect_checkpoint: no checkpoint at step {step}; have {steps}")
    damaged: dict[str, str] = {}
    for candidate in [step] if step is not None else reversed(steps):
        base = checkpoint_dir(workdir) / str(candidate)
        try:
            state, verified = check(base)
        except ValueError as e:
            damaged[str(candidate)] = str(e)  # str keys: the same after a JSON round trip
            print(f"inspect_checkpoint: checkpoint {candidate} is damaged: {e}", file=sys.stderr)
            continue
        break
    else:
        raise SystemExit(
            f"inspect_checkpoint: no intact checkpoint among {[step] if step else steps} in "
            f"{workdir!r} (see above)"
        )
    num_params, digest = params_digest(state["params"])
    _, ema_digest = params_digest(state["ema_params"])
    meta = json.loads((base / "meta" / "metadata").read_text())
    return {
        "step": int(np.asarray(state["step"])),
        "steps": steps,
        "num_params": num_params,
        "params_sha256": digest,
        "ema_params_sha256": ema_digest,
        "metrics": meta.get("metrics", {}),
        "verified": verified,
        "damaged": damaged,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--step", type=int, default=None, help="default: the latest")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from jcdm.runtime import io

    if message := io.missing_bucket_client(args.workdir):
        print(f"inspect_checkpoint: {message}", file=sys.stderr)
        raise SystemExit(2)
    from absl import logging as absl_logging

    # Orbax warns about metadata files that only newer writers create; not the user's concern.
    absl_logging.set_verbosity(absl_logging.ERROR)
    quiet_loops.install()  # no 'Event loop is closed' tracebacks after a failed read
    info = describe(args.workdir, args.step)
    if args.json:
        json.dump(info, sys.stdout)
        sys.stdout.write("\n")
        return
    print(f"checkpoints: {info['steps']}")
    print(f"step {info['step']}: {info['num_params']:,} parameters")
    print(f"  verified          {'yes' if info['verified'] else 'no (saved without hashes)'}")
    print(f"  params sha256     {info['params_sha256']}")
    print(f"  ema params sha256 {info['ema_params_sha256']}")
    for k, v in sorted(info["metrics"].items()):
        print(f"  {k:16s}  {v:.6g}")


if __name__ == "__main__":
    main()
