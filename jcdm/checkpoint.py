"""Asynchronous Orbax checkpoints of the whole run (system code).

A checkpoint step directory holds `state` (TrainState as OCDBT/TensorStore arrays, restored onto
the current mesh's shardings), `data` (the input iterator's state as JSON) and `meta` (step and the
last logged metrics, for `tools/inspect_checkpoint.py`). The iterator state
names a global batch, not a process's position, so process 0's copy restores every process, and
a run can resume with a different number of processes. Orbax writes into
a temporary directory and renames it only after every process has finished, so a step that was
interrupted is never listed or restored.
"""

from __future__ import annotations

import logging
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)


ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
    pass


@gin.configurable(module="jcdm")
class CheckpointConfig:
    """How often to save and what to keep.

    `save_every`: steps between regular saves (the final step and preemption saves come on top).
    `keep`: how many of the latest checkpoints survive. `keep_best_fid`: additionally keep this
    many checkpoints with the lowest 1-step FID (the reference project's best-FID selection; 0 =
    off, as iCT reports the last checkpoint). `async_save`: write in the background.
    """

    def __init__(
        self,
        *,
        save_every: int = 1000,
        keep: int = 3,
        keep_best_fid: int = 0,
        async_save: bool = True,
        fid_metric: str = "fid_1step",
    ):
        if save_every < 1 or keep < 1 or keep_best_fid < 0:
            raise ValueError("need save_every >= 1, keep >= 1, keep_best_fid >= 0")
        self.save_every = save_every
        self.keep = keep
        self.keep_best_fid = keep_best_fid
        self.async_save = async_save
        self.fid_metric = fid_metric


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` with the run's items and policies."""

    def __init__(self, directory: str, cfg: CheckpointConfig | None = None):
        self.cfg = cfg or CheckpointConfig()
        keep: list = [cm.LatestN(self.cfg.keep)]
        if self.cfg.keep_best_fid:
            metric = self.cfg.fid_metric
            keep.append(
                cm.BestN(
                    get_metric_fn=lambda m: m[metric],
                    reverse=True,  # lower FID is better
                    n=self.cfg.keep_best_fid,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.FixedIntervalPolicy(self.cfg.save_every),
            preservation_policy=cm.AnyPreservationPolicy(keep),
            enable_async_checkpointing=self.cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False, metrics=None) -> bool:
        """Start a save if the policy (or `force`) says so; returns whether one started."""
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_iterator.get_state()),
            meta=ocp.args.JsonSave({"step": int(step), "metrics": metrics}),
        )
        return self.manager.save(step, args=args, force=force, metrics=metrics or None)

    def restore(self, step: int, abstract_state, data_iterator=None) -> Any:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return restored["state"]

    def restore_latest(self, abstract_state, data_iterator=None) -> tuple[Any, int | None]:
        """Restore the newest readable checkpoint; fall back to older ones if it is damaged."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state, data_iterator), step
            except Exception as e:  # a damaged checkpoint: say so and try the one before
                log.error(
                    "checkpoint at step %d is unreadable (%s: %s); falling back to the one before",
                    step,
                    type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "",
                )
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.manager.directory} could be restored; "
                "move the workdir aside to start afresh"
            )
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, so a restore lands on the current mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
