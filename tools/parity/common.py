"""Constants, the error type and the test sizes of tools/parity (docs/recipe.md section 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE_COMMIT = "b3bc45147e8e092b36e50edefe1eb934c7832e12"
HOW_TO_GET = (
    "git clone https://github.com/boingkiri/joint_training /tmp/jt-ref && "
    "git -C /tmp/jt-ref checkout b3bc451"
)
REQUIRED_FILES = (
    "model/unetpp.py",
    "model/ct/ncsnpp.py",
    "framework/diffusion/consistency_framework.py",
    "utils/ema/ema_cm.py",
    "configs/framework/diffusion/cm_diffusion.yaml",
    "configs/model/diffusion/original_ict.yaml",
    "configs/model/diffusion/score_head.yaml",
    "configs/ema/ema_ict.yaml",
    "configs/config_vanilla.yaml",
)
DEFAULT_TOL = 1e-4
STEP = 150_000  # curriculum step of the loss: N(k) = 81 at K = 400k
MODES = ("joint", "vanilla")
CURRICULUM_STEPS = (0, 49_999, 50_000, 100_000, 150_000, 250_000, 349_999, 350_000, 399_999)


class ParityError(Exception):
    """The reference cannot be used (missing, import failure, unexpected structure): exit 2."""


@dataclasses.dataclass(frozen=True)
class Size:
    """A test configuration: overrides of the reference's YAML and the matching jcdm kwargs."""

    image: int
    batch: int
    ref_backbone: dict
    ref_head: dict
    jcdm_backbone: dict
    jcdm_head: dict


SIZES = {
    # 16x16 images, nf 32, ch_mult (2, 2, 2) (16, 8, 4), 2 blocks per level, attention at 8x8
    # (the head's level-1 attention, the reference's is_atten [False, True, False]).
    "small": Size(
        image=16,
        batch=8,
        ref_backbone={"nf": 32, "num_res_blocks": 2, "attn_resolutions": [8]},
        ref_head={"n_channels": 32, "input_channels": 64},
        jcdm_backbone={"nf": 32, "num_res_blocks": 2, "attn_resolutions": (8,)},
        jcdm_head={"nf": 32, "attn_resolutions": (8,)},
    ),
    # The CIFAR-10 networks as configured (56.4M + 26.2M parameters); slow on a CPU.
    "cifar": Size(image=32, batch=2, ref_backbone={}, ref_head={}, jcdm_backbone={}, jcdm_head={}),
}
