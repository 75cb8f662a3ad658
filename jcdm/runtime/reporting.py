"""Run outputs: metrics.jsonl, the terminal progress line, PNG sample grids and W&B.

Only process 0 writes; other processes get a `Reporter` whose methods do nothing. The workdir may
be a local path or a bucket URL (gs://...; `etils.epath`, which Orbax uses too). A resumed run
first drops the rows of steps after the restored checkpoint (written by the interrupted run after
its last save, and about to be recomputed), so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import io as stdlib_io
import json
import math
import os
import sys
import time
from typing import Any

import gin
import numpy as np
from etils import epath

from jcdm.runtime import io


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 (round to nearest, as the FID protocol's PNG export does)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile [N, H, W, C] uint8 images into one [rows*(H+pad)+pad, ...] grid image."""
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) :][:, :w] = img
    return grid


def save_png(path: str | epath.Path, image: np.ndarray, scale: int = 1) -> None:
    from PIL import Image

    if image.shape[-1] == 1:
        image = image[..., 0]
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = stdlib_io.BytesIO()
    pil.save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())


@gin.configurable(module="jcdm")
class WandbConfig:
    """W&B settings. Offline by default: no account or network needed (`wandb sync` later)."""

    def __init__(
        self,
        *,
        mode: str | None = None,  # online | offline | disabled; None: $WANDB_MODE or offline
        project: str = "jcdm",
        entity: str | None = None,
        name: str | None = None,
        tags: tuple[str, ...] = (),
    ):
        self.mode = mode or os.environ.get("WANDB_MODE", "offline")
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"WandbConfig.mode={self.mode!r}; choose online|offline|disabled")
        self.project = os.environ.get("WANDB_PROJECT", project)
        self.entity = os.environ.get("WANDB_ENTITY", entity)
        self.name = name
        self.tags = tuple(tags)


class Reporter:
    """Writes metrics.jsonl, the progress line, sample grids and W&B from process 0."""

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool,
        num_steps: int,
        run_id: str,
        wandb_cfg: WandbConfig | None = None,
        config_text: str = "",
        resume_step: int = 0,
        upload_every_s: float = 60.0,
    ):
        """`resume_step`: the step the run starts from; rows of later steps are dropped.
        `upload_every_s`: in a bucket, where files cannot be appended to, metrics.jsonl is
        rewritten whole at most this often (and at `close`)."""
        self.workdir = epath.Path(workdir)
        self.enabled = enabled
        self.num_steps = num_steps
        self._tty = sys.stderr.isatty()
        self._wandb = None
        if not enabled:
            return
        io.mkdirs(self.workdir / "samples")
        self._metrics = _MetricsFile(self.workdir / "metrics.jsonl", resume_step, upload_every_s)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name or run_id,
                id=run_id,
                resume="allow",
                dir=workdir if io.is_local(self.workdir) else None,  # W&B writes local files
                mode=wandb_cfg.mode,
                tags=list(wandb_cfg.tags),
                config={"gin": config_text},
            )

    def write_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self._metrics.append(json.dumps(row))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def progress(self, step: int, loss: float, images_per_sec: float, elapsed: float) -> None:
        if not self.enabled:
            return
        frac = step / max(1, self.num_steps)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = elapsed / max(frac, 1e-9) - elapsed if frac > 0 else float("nan")
        line = (
            f"[{bar}] {step}/{self.num_steps} loss {loss:.4g} | {images_per_sec:,.0f} img/s | "
            f"elapsed {_hms(elapsed)} eta {_hms(eta)}"
        )
        sys.stderr.write(("\r" + line) if self._tty else (line + "\n"))
        sys.stderr.flush()

    def save_grid(self, step: int, tag: str, images: np.ndarray) -> str | None:
        if not self.enabled:
            return None
        grid = image_grid(to_uint8(images))
        path = self.workdir / "samples" / f"{tag}_{step:07d}.png"
        save_png(path, grid, scale=max(1, 128 // images.shape[1]))
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"samples/{tag}": wandb.Image(grid, caption=tag)}, step=int(step))
        return os.fspath(path)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tty:
            sys.stderr.write("\n")
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()


def print_next_steps(
    workdir: str, *, enabled: bool, file=None, final_metrics: dict | None = None
) -> list[str]:
    """End of a successful run (process 0): where the newest sample grids are and what to try next.
    `final_metrics`: the last sample-quality numbers (FID or the digits metric), printed first.

    Returns the printed lines. `<workdir>/config.gin` is the run's operative config, so it serves
    as `--gin` for sampling from the run's checkpoint.
    """
    if not enabled:
        return []
    root = epath.Path(workdir)
    shown = _short(os.fspath(root))
    grids = sorted((root / "samples").glob("*.png")) if (root / "samples").exists() else []
    newest: dict[str, str] = {}
    for g in grids:  # names are <tag>_<step:07d>.png: sorted order ends at the newest step
        newest[g.name.rsplit("_", 1)[0]] = _short(os.fspath(g))
    lines = [f"done: {shown}"]
    if final_metrics:
        shown_metrics = "  ".join(
            f"{k}={v:.4g}" for k, v in final_metrics.items() if not k.endswith("_seconds")
        )
        lines.append(f"  final sample quality: {shown_metrics}")
    if newest:
        lines.append("  sample grids (newest): " + "  ".join(newest.values()))
    lines.append(f"  metrics: {_short(os.fspath(root / 'metrics.jsonl'))}")
    if (root / "wandb").exists():
        lines.append(f"  W&B run: {_short(os.fspath(root / 'wandb'))} (upload: wandb sync DIR)")
    lines.append("  next, more samples from the last checkpoint:")
    lines.append(
        f"    jcdm --gin {_short(os.fspath(root / 'config.gin'))} --workdir {shown} "
        "--only_inference --gin.inference.num_samples=256"
    )
    lines.append("  then the CIFAR-10 recipe: README.md, 'The real CIFAR-10 recipe'")
    print("\n".join(lines), file=file or sys.stdout, flush=True)
    return lines


def _short(path: str) -> str:
    """A local path relative to the current directory when it lies inside it."""
    if not io.is_local(path):
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


class _MetricsFile:
    """metrics.jsonl: one JSON row per logged step, appended (local) or re-uploaded (bucket)."""

    def __init__(self, path: epath.Path, resume_step: int, upload_every_s: float):
        self.path = path
        self.local = io.is_local(path)
        self.upload_every_s = upload_every_s
        rows = io.read_text(path).splitlines() if io.exists(path) else []
        steps = [(_row_step(r), r) for r in rows]
        kept = [r for s, r in steps if s is not None and s <= resume_step]
        if len(kept) != len(rows):
            # Rows past the checkpoint were written after the last save of an interrupted run.
            io.write_text(path, "".join(r + "\n" for r in kept))
        self._rows = kept  # only kept in memory for a bucket
        self._uploaded = time.monotonic()
        self._dirty = False
        self._file = open(path, "a") if self.local else None  # noqa: SIM115

    def append(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._rows.append(line)
        self._dirty = True
        if time.monotonic() - self._uploaded >= self.upload_every_s:
            self._upload()

    def _upload(self) -> None:
        io.write_text(self.path, "".join(r + "\n" for r in self._rows))
        self._uploaded = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._dirty:
            self._upload()


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line of a killed run (or an empty line): dropped


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.dtype.kind in "iub" else float(v)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_IMPORTED = time.monotonic()


def process_uptime_s() -> float:
    """Seconds since this process started (Linux: from /proc, so the interpreter's start-up and
    imports count), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
