"""Chip peaks and the cost of a full run, for bench/: utilisation against the datasheet, and the
hours a 400k x 1024 run takes on a given slice at a measured utilisation.

Peaks are dense (not 2:4-sparse) TFLOP/s per chip at JAX's default matmul precision, which is
what the step actually runs: bfloat16 as is; float32 as TF32 on NVIDIA Ampere and later and as
single-pass bfloat16 on TPUs (JAX "Matmul precision" docs; jax#18934). Sources: NVIDIA H100/H200
and A100 datasheets, Cloud TPU system-architecture pages (docs/performance.md "Cost of a full
run" lists them with the caveats).
"""

from __future__ import annotations

import dataclasses

TFLOPS = 1e12
# device_kind prefix (as jax.devices()[0].device_kind spells it) -> dtype -> dense FLOP/s per chip
PEAKS: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"bfloat16": 989.4 * TFLOPS, "float32": 494.7 * TFLOPS},
    "NVIDIA H100": {"bfloat16": 989.4 * TFLOPS, "float32": 494.7 * TFLOPS},  # SXM
    "NVIDIA A100": {"bfloat16": 312.0 * TFLOPS, "float32": 156.0 * TFLOPS},
    "TPU v4": {"bfloat16": 275.0 * TFLOPS, "float32": 275.0 * TFLOPS},
    "TPU v5p": {"bfloat16": 459.0 * TFLOPS, "float32": 459.0 * TFLOPS},
    "TPU v5 lite": {"bfloat16": 197.0 * TFLOPS, "float32": 197.0 * TFLOPS},  # v5e
    "TPU v6 lite": {"bfloat16": 918.0 * TFLOPS, "float32": 918.0 * TFLOPS},  # v6e
}

# The slices a full run is projected onto: name -> (device kind, chips).
SLICES: dict[str, tuple[str, int]] = {
    "TPU v4-8": ("TPU v4", 4),
    "TPU v5p-8": ("TPU v5p", 4),
    "8x H200": ("NVIDIA H200", 8),
}


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """Dense FLOP/s of one chip of `device_kind` at `dtype`, or None for a kind not in PEAKS
    (the longest matching prefix wins, so 'NVIDIA H100 80GB HBM3' finds 'NVIDIA H100')."""
    kind = device_kind.lower()
    best = max((p for p in PEAKS if kind.startswith(p.lower())), key=len, default=None)
    return None if best is None else PEAKS[best].get(dtype)


@dataclasses.dataclass(frozen=True)
class Projection:
    """One row of the cost table."""

    method: str
    slice: str
    chips: int
    utilisation: float
    hours: float
    device_hours: float


def project(
    *,
    method: str,
    flops_per_image: float,
    utilisation: float,
    slice_name: str,
    dtype: str = "bfloat16",
    steps: int = 400_000,
    batch: int = 1024,
) -> Projection:
    """hours = steps * batch * flops_per_image / (chips * peak * utilisation) / 3600.

    Assumes the measured utilisation carries over to the slice's chips, perfect data-parallel
    scaling (the gradient all-reduce hidden or free) and no time outside train steps
    (evaluation, FID, checkpoints, restarts): a lower bound on a real run's hours.
    """
    kind, chips = SLICES[slice_name]
    peak = datasheet_peak(kind, dtype)
    if peak is None or utilisation <= 0:
        raise ValueError(f"no peak for {kind} at {dtype}, or utilisation {utilisation} <= 0")
    seconds = steps * batch * flops_per_image / (chips * peak * utilisation)
    return Projection(
        method, slice_name, chips, utilisation, seconds / 3600, seconds / 3600 * chips
    )


def cost_table(
    flops_per_image: dict[str, float],
    utilisation: dict[str, float],
    *,
    dtype: str = "bfloat16",
    steps: int = 400_000,
    batch: int = 1024,
) -> list[Projection]:
    """Every method of `flops_per_image` (e.g. {'ict': ..., 'joint': ...}) on every slice."""
    return [
        project(
            method=m,
            flops_per_image=f,
            utilisation=utilisation[m],
            slice_name=s,
            dtype=dtype,
            steps=steps,
            batch=batch,
        )
        for m, f in flops_per_image.items()
        for s in SLICES
    ]


def format_table(rows: list[Projection], *, steps: int = 400_000, batch: int = 1024) -> str:
    """The table bench/step.py prints, with its assumptions."""
    lines = [
        f"full run: {steps:,} steps x {batch} images; measured utilisation carried to each slice,",
        "perfect data-parallel scaling, train steps only (no eval/FID/checkpoints/restarts)",
        f"  {'method':8s} {'slice':10s} {'chips':>5s} {'util':>6s} {'hours':>8s}"
        f" {'chip-hours':>11s}",
    ]
    for r in rows:
        lines.append(
            f"  {r.method:8s} {r.slice:10s} {r.chips:5d} {r.utilisation:6.1%} {r.hours:8.1f}"
            f" {r.device_hours:11.1f}"
        )
    return "\n".join(lines)


def from_step_rows(
    rows: list[dict], device_kind: str, dtype: str = "bfloat16"
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """(flops per image, datasheet utilisation, the row chosen) per method ('ict', 'joint', ...)
    from bench/step.py rows of the CIFAR config at `dtype`: each method's best-utilisation row
    (over per-device batches and variants)."""
    peak = datasheet_peak(device_kind, dtype)
    if peak is None:
        raise ValueError(f"no datasheet peak for {device_kind!r}; add it to jcdm.dev.costs.PEAKS")
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("config") != "cifar" or r.get("dtype") != dtype:
            continue
        util = r["flops_per_sec"] / r["devices"] / peak
        if r["head"] not in best or util > best[r["head"]]["_util"]:
            best[r["head"]] = dict(r, _util=util)
    if not best:
        raise ValueError(f"no cifar rows at {dtype} to project from")
    flops = {m: r["flops_per_step"] / r["global_batch_size"] for m, r in best.items()}
    return flops, {m: r["_util"] for m, r in best.items()}, {m: r["name"] for m, r in best.items()}
