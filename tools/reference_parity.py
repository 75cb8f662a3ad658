"""Parity of jcdm's reference joint model with the reference code (docs/recipe.md section 2).

    python tools/reference_parity.py --reference DIR [--out FILE] [--size small|cifar] [--tol T]

DIR is a checkout of boingkiri/joint_training at commit b3bc451 (docs/recipe.md, "Sources"):

    git clone https://github.com/boingkiri/joint_training /tmp/jt-ref
    git -C /tmp/jt-ref checkout b3bc451

jcdm's side is `gin/reference.gin` (its ICTConfig, EMA warm-up and network bindings), built with
jcdm's own NCSNpp, ScoreHead, `objective.joint_loss` and `step.Networks`. The reference's side is
its own code: the networks come from its `model/unetpp.py` (CMPrecond around `model/ct/ncsnpp.py`
NCSNpp, ScoreDistillPrecond around UNetppHead), the loss from its
`framework/diffusion/consistency_framework.py`, and its configs from `configs/` (cm_diffusion,
original_ict, score_head, ema_ict; `config_vanilla.yaml` for "vanilla").

Glue, not math, is this file's: `CMFramework.__init__` cannot be constructed without its data,
checkpoint, W&B and LPIPS machinery, so the statements of `__init__` that build the two networks,
the sigma grid and curriculum, and the nested functions `ict_sigma_sampling_fn`,
`get_sigma_sampling`, `pseudo_huber_loss_fn`, `get_loss` and `joint_training_loss_fn` are taken
from the file's syntax tree and executed unchanged against a stand-in `self` and the reference's
own YAML configs. Two random draws are pinned so that both sides see the same inputs: inside the
reference's code `jax.random.normal` returns the noise z and `jax.random.choice` returns the
sigma-pair indices that jcdm's `joint_loss` draws from its key (everything else in `jax` is the
real module). The reference's sigmas are then computed by its own grid from those indices.

Imports that the reference needs but that are irrelevant to the math are stubbed only when not
installed: `omegaconf` (a type annotation: `DictConfig` is `dict`) and `einops` (its `rearrange`
is used only by attention modules the reference's joint model does not contain; the stub raises).
The reference's training framework, W&B, LPIPS and TensorFlow are never imported.

Both sides get the same random weights (the reference's parameter tree is initialised, every
leaf redrawn at unit-variance scale so that no branch is the reference's near-zero init, then
jcdm's tree is built from it by an explicit name mapping that fails on any unmapped leaf or
shape mismatch; gradients map the same way), the same images, noise, sigma indices and step,
float32 on the CPU, dropout 0. Compared (relative L2 differences, jcdm against the reference):
the NCSN++ outputs (F, temb, the head feature) and f; the head's raw output and denoiser D on
identical inputs; the sigma grid, p(i), N(k) and the loss's sigma pair; the joint loss and its
terms; the gradients (whole tree, backbone, head and the worst single leaf) in the "joint" and
"vanilla" modes; the joint-to-vanilla ratio of the backbone gradient norm; the EMA warm-up
decays. Exit 0 when every difference is within `--tol`, 1 when one is not, 2 when the reference
is missing, cannot be imported or does not have the expected structure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # for `tools.parity` (and jcdm) without the package installed
    sys.path.insert(1, str(REPO))

from tools.parity.common import DEFAULT_TOL, REFERENCE_COMMIT, SIZES, ParityError  # noqa: E402
from tools.parity.measure import _git_head, format_report, measure  # noqa: E402
from tools.parity.reference import check_reference_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reference_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", required=True, help="checkout of boingkiri/joint_training at b3bc451"
    )
    parser.add_argument("--out", help="also write the report as JSON to this file")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="small: 16x16, nf 32 (3 min on 2 CPU cores); cifar: the CIFAR-10 networks",
    )
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="relative tolerance")
    parser.add_argument("--seed", type=int, default=0, help="weights, images and noise")
    args = parser.parse_args(argv)
    ref = Path(args.reference).expanduser().resolve()
    try:
        check_reference_dir(ref)
        commit = _git_head(ref)
        if commit is not None and commit != REFERENCE_COMMIT:
            print(
                f"reference_parity: warning: {ref} is at {commit[:7]}, not b3bc451",
                file=sys.stderr,
            )
        report = measure(ref, args.size, args.tol, args.seed)
    except ParityError as e:
        print(f"reference_parity: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return 0 if report["ok"] else 1


def _json_default(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v)}")


if __name__ == "__main__":
    sys.exit(main())
