"""Asynchronous Orbax checkpoints of the whole run (system code).

A checkpoint step directory holds `state` (TrainState as OCDBT/TensorStore arrays, restored onto
the current mesh's shardings), `data` (the input iterator's state as JSON) and `meta` (step and the
last logged metrics, for `tools/inspect_checkpoint.py`). The iterator state names a global batch,
not a process's position, so every process restores from the same copy (written by process 0),
and a run can resume with a different number of processes.

Guarantees (tests/test_checkpoint.py checks each with real processes and signals):
- A save whose write did not finish is never listed or restored: Orbax writes into a temporary
  directory and renames it (local disks) or writes a commit marker last (buckets) only after
  every process has finished.
- Every checkpoint carries a manifest of per-array hashes (`jcdm.runtime.integrity`), committed
  with it; a restore recomputes them from the values it got.
- If the latest checkpoint cannot be read or its values differ from its manifest,
  `restore_latest` says so, falls back to the one before and moves the damaged one aside (to
  `<checkpoints>_unreadable/`), so that the resumed run can save that step again. All processes
  agree on the step they restore.
- The training loop is blocked only while the save is handed over: the state is copied on the
  device (one jitted copy, dispatched asynchronously) and a background thread runs Orbax's save
  of the copy, whose own background thread then writes the files (`background=True`). With
  `background=False` the loop waits for Orbax's device-to-host copy and per-array bookkeeping;
  with `async_save=False` for the whole write. bench/checkpoint.py measures the three.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm
from orbax.checkpoint._src.metadata import array_metadata_store  # no public alias (0.12.8)

from jcdm.runtime import integrity, io, quiet_loops

log = logging.getLogger(__name__)


ITEMS = ("state", "data", "meta", integrity.ITEM)
UNREADABLE_SUFFIX = "_unreadable"  # <workdir>/checkpoints_unreadable/<step>-<time>


class CheckpointError(RuntimeError):
    pass


class CheckpointMismatch(CheckpointError):
    """The checkpoints were written by another configuration (parameter shapes or names
    differ): retrying cannot help."""


@gin.configurable(module="jcdm")
class CheckpointConfig:
    """How often to save, what to keep, and how much the training loop may wait for a save.

    `save_every`: steps between regular saves (the final step and preemption saves come on top).
    `keep`: how many of the latest checkpoints survive. `keep_best_fid`: additionally keep this
    many checkpoints with the lowest `fid_metric` among those saved with that metric (0 = off,
    as iCT reports the last checkpoint). `async_save`: write in the background. `background`:
    with `async_save`, also hand Orbax's blocking part (device-to-host copy, per-array metadata,
    the start barrier) to a thread, after a device-side copy of the state; this holds one more
    copy of the state in accelerator memory until it has reached host memory.
    `replica_parallel_min_bytes`: a replicated array is split among its replicas for writing
    (Orbax's replica-parallel save) only when each replica's slice has at least this many
    bytes; smaller arrays are written by one replica. Each slice shape is a small compiled
    program: on the first save of a state of many small arrays (biases, norms) those compiles
    cost seconds and the parallel write gains nothing (measured: 30 small replicated arrays on
    2 devices, 2.2 s with slicing, 0.1 s without).
    """

    def __init__(
        self,
        *,
        save_every: int = 1000,
        keep: int = 3,
        keep_best_fid: int = 0,
        async_save: bool = True,
        background: bool = True,
        fid_metric: str = "fid_1step",
        replica_parallel_min_bytes: int = 1 << 20,
    ):
        if save_every < 1 or keep < 1 or keep_best_fid < 0:
            raise ValueError("need save_every >= 1, keep >= 1, keep_best_fid >= 0")
        self.save_every = save_every
        self.keep = keep
        self.keep_best_fid = keep_best_fid
        self.async_save = async_save
        self.background = background and async_save
        self.fid_metric = fid_metric
        self.replica_parallel_min_bytes = replica_parallel_min_bytes


def _use_coordination_service_barriers() -> None:
    """Make Orbax synchronise processes through the coordination service, never on devices.

    By default Orbax's barriers are an XLA all-reduce (`sync_global_devices`). A background save
    would issue it from a second thread while the main thread runs the train step's collectives,
    and collectives issued from two threads can be ordered differently on different hosts (a
    deadlock on TPU; mixed-up gloo collectives on CPU). The coordination service's barriers touch
    no device and have a timeout. Orbax's own finalisation thread already uses them.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # the trainer defines no absl flags; Grain needs this too
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` with the run's items and policies.

    Every process calls every method, in the same order (Orbax synchronises the processes).
    """

    def __init__(self, directory: str | epath.Path, cfg: CheckpointConfig | None = None):
        _use_coordination_service_barriers()
        quiet_loops.install()
        self.cfg = cfg or CheckpointConfig()
        # Orbax looks array handlers up in a process-wide registry (StandardSave has no
        # per-call option for this); one Checkpointer per process, so the override is its own.
        # Orbax's default handler, with only the slice threshold changed (the array metadata
        # store is what its registry's default has; without it no per-array metadata is saved).
        ocp.type_handlers.register_type_handler(
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                array_metadata_store=array_metadata_store.Store(),
                min_slice_bytes_for_replica_parallel=self.cfg.replica_parallel_min_bytes,
            ),
            override=True,
        )
        self.directory = epath.Path(directory)
        keep: list = [cm.LatestN(self.cfg.keep)]
        best: dict[str, Any] = {}
        if self.cfg.keep_best_fid:
            metric = self.cfg.fid_metric
            keep.append(
                cm.BestN(
                    get_metric_fn=lambda m: m[metric],
                    reverse=True,  # sorted high to low; the last n (lowest FID) are kept
                    n=self.cfg.keep_best_fid,
                    keep_checkpoints_without_metrics=False,
                )
            )
            # Without `best_fn` Orbax neither writes the metrics next to the checkpoint nor reads
            # them back, so after a restart the best checkpoints would count as metric-less and
            # be deleted by the next save.
            best = dict(best_fn=lambda m: m[metric], best_mode="min")
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.FixedIntervalPolicy(self.cfg.save_every),
            preservation_policy=cm.AnyPreservationPolicy(keep),
            enable_async_checkpointing=self.cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
            **best,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._saving: int | None = None  # the step of the last save started
        self._failed = False  # a save error was raised: close() must not raise it again
        self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
        self.last_blocked_s = 0.0  # how long the last `save` call kept the caller waiting
        self.last_hash_s = 0.0  # how long the last save hashed the state (before writing it)
        self.last_verify_s = 0.0  # how long the last restore verified the state

    # --- Listing -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        self._join()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        self._join()
        return self.manager.latest_step()

    def stored_metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with `step` (its `meta` item), {} if it has none."""
        path = self.directory / str(step) / "meta" / "metadata"
        return json.loads(path.read_text()).get("metrics", {}) if path.exists() else {}

    def best_step(self, metric: str | None = None) -> int | None:
        """The kept checkpoint with the lowest finite `metric` (default: `cfg.fid_metric`)
        among its stored metrics, or None. Ties go to the earliest step: a checkpoint saved
        after an evaluation may carry that evaluation's value without having been measured."""
        metric = metric or self.cfg.fid_metric
        scored = []
        for step in self.all_steps():
            value = self.stored_metrics(step).get(metric)
            if value is not None and math.isfinite(value):
                scored.append((value, step))
        return min(scored)[1] if scored else None

    # --- Saving --------------------------------------------------------------------------------

    def save(self, step: int, state, data_iterator, *, force: bool = False, metrics=None) -> bool:
        """Start a save if the policy (or `force`) says so; returns whether one started.

        The iterator state and metrics are taken now. The files are written in the background;
        `wait()` returns once they are committed. An error of a background save is raised by the
        next `save` or `wait`.
        """
        t0 = time.perf_counter()
        self._join()  # one save at a time: the previous one must have been handed to Orbax
        if not force and not self.manager.should_save(step):
            return False
        if step in self.manager.all_steps():
            # The trainer never does this (it resumes after the latest step and moves unreadable
            # steps aside); a caller saving a step twice gets a warning, not Orbax's error.
            log.warning("checkpoint for step %d already exists; not saving it again", step)
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        data_state = {} if data_iterator is None else data_iterator.get_state()
        self._saving = step
        self._probe_writable()
        if self.cfg.background:
            # The copy is dispatched asynchronously: the caller may donate `state` to the next
            # update at once, since JAX orders the donation after this read.
            snapshot = self._copy(state)
            self._thread = threading.Thread(
                target=self._save_in_background,
                args=(step, snapshot, data_state, metrics),
                name=f"jcdm-checkpoint-{step}",
                daemon=True,
            )
            self._thread.start()
        else:
            self._save_now(step, state, data_state, metrics)
        self.last_blocked_s = time.perf_counter() - t0
        log.info("checkpoint %d started (loop blocked %.3fs)", step, self.last_blocked_s)
        return True

    def _save_now(self, step: int, state, data_state: dict, metrics: dict[str, float]) -> None:
        meta = {"step": int(step), "metrics": metrics}
        # Hashed before Orbax is handed the state: the manifest is one of the checkpoint's items,
        # so it is committed with the arrays or not at all.
        t0 = time.perf_counter()
        sums = integrity.gather_to_process_0(integrity.local_sums(state), tag=str(step))
        items = {"data": data_state, "meta": meta}
        hashes = {} if sums is None else integrity.manifest(state, sums, items)
        self.last_hash_s = time.perf_counter() - t0
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
            **{integrity.ITEM: ocp.args.JsonSave(hashes)},
        )
        self.manager.save(step, args=args, force=True, metrics=self._ranking_metrics(metrics))

    def _save_in_background(self, step: int, snapshot, data_state: dict, metrics: dict) -> None:
        try:
            self._save_now(step, snapshot, data_state, metrics)
        except BaseException as e:  # surfaced by the next save() or wait() on the main thread
            self._error = e

    def _ranking_metrics(self, metrics: dict[str, float]) -> dict[str, float] | None:
        """The metrics Orbax ranks checkpoints by, or None: the checkpoint is not a candidate."""
        if not self.cfg.keep_best_fid:
            return None
        value = metrics.get(self.cfg.fid_metric)
        if value is None or not math.isfinite(value):
            return None
        return {self.cfg.fid_metric: value}

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise self._failure(error) from error

    def _failure(self, error: BaseException) -> CheckpointError:
        """The error of a failed save, naming the step, the directory and the OS error."""
        self._failed = True
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        why = f"{type(cause or error).__name__}: {cause or error}"
        kept = [s for s in self.manager.all_steps() if s != self._saving]
        previous = f"the previous checkpoint (step {max(kept)}) is kept" if kept else "none kept"
        return CheckpointError(
            f"saving the checkpoint of step {self._saving} to {self.directory} failed ({why}); "
            f"{previous}. Check the disk space and permissions of {self.directory}."
        )

    def _probe_writable(self) -> None:
        """Write and remove a small file in the checkpoint directory first, on every process.

        An unwritable or full directory then fails here at once, naming the OS error. Left to
        Orbax, a process that cannot create the step directory fails in a thread while the others
        wait for its signal for Orbax's coordination timeout (5 minutes, measured by
        bench/soak.py), training on without saving meanwhile.
        """
        probe = self.directory / f".jcdm-write-probe-{jax.process_index()}"
        try:
            io.write_bytes(probe, b"\0" * 4096, makedirs=False)
            probe.unlink()
        except OSError as e:
            raise self._failure(e) from e

    def raise_if_failed(self) -> None:
        """Raise a finished save's error now; returns at once while a save is in progress (the
        loop calls this every step)."""
        if self._thread is not None:
            if self._thread.is_alive():
                return
            self._join()
        if not self.manager.is_saving_in_progress():
            self.wait()  # nothing to wait for: raises a failed save's error, if any

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._join()
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # raised by Orbax's writer thread
            raise self._failure(e) from e

    def require_committed(self, step: int) -> None:
        """Raise unless `step` is a committed checkpoint (after `wait`): a run must not report
        success without its final checkpoint."""
        self.manager.reload()
        if step not in self.manager.all_steps():
            self._failed = True
            raise CheckpointError(
                f"the final checkpoint (step {step}) is not committed in {self.directory}; "
                f"committed: {sorted(self.manager.all_steps())}"
            )

    def close(self) -> None:
        """Wait for saves in flight, then release Orbax's threads. After a save error that was
        already raised, only logs further errors (the first one is the one that matters)."""
        try:
            if self._failed:
                try:
                    self.wait()
                except CheckpointError as e:
                    log.error("%s", e)
            else:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:
                if not self._failed:
                    raise
                log.error("closing the checkpoint manager after a failed save: %s", e)

    # --- Restoring -----------------------------------------------------------------------------

    def restore(self, step: int, abstract_state, data_iterator=None) -> Any:
        """Restore `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

        Raises CheckpointMismatch if it was written by another configuration and
        CheckpointError if it cannot be read or fails verification (nothing is moved aside)."""
        self._raise_if_mismatch(step, abstract_state)
        state, data, why = self._read_verified(step, abstract_state, data_iterator is not None)
        if not _on_every_process(why is None):
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} "
                f"{why or 'is damaged on another process'}"
            )
        if data_iterator is not None:
            data_iterator.set_state(data)
        return state

    def _read(self, step: int, abstract_state, *, with_data: bool) -> tuple[Any, dict | None]:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], (restored["data"] if with_data else None)

    def _read_verified(self, step: int, abstract_state, with_data: bool):
        """(state, data, None), or (None, None, why) if the step cannot be read or its values
        differ from its manifest. Every process must call it (the hashes are summed over all)."""
        try:
            state, data = self._read(step, abstract_state, with_data=with_data)
            why = None
        except Exception as e:
            state = data = None
            first = str(e).splitlines()[0][:300] if str(e) else ""
            why = f"is unreadable ({type(e).__name__}: {first})"
        t0 = time.perf_counter()
        step_dir = self.directory / str(step)
        problems = integrity.verify_restored(step_dir, abstract_state, state, data)
        if why is None and problems:
            more = f", and {len(problems) - 3} more" if len(problems) > 3 else ""
            why = (
                "is damaged: its values differ from the hashes saved with it ("
                + "; ".join(problems[:3])
                + more
                + ")"
            )
        self.last_verify_s = time.perf_counter() - t0
        return (state, data, None) if why is None else (None, None, why)

    def restore_latest(self, abstract_state, data_iterator=None) -> tuple[Any, int | None]:
        """Restore the newest intact checkpoint; fall back to older ones if it is damaged.

        Returns (state, step), or (None, None) when there is no checkpoint. Raises
        CheckpointMismatch (from metadata, before reading anything) for checkpoints of another
        model configuration and CheckpointError when checkpoints exist but none can be read and
        verified: the workdir is left as it is.
        """
        self.wait()
        steps = sorted(self.manager.all_steps())
        damaged: list[int] = []
        for step in reversed(steps):
            self._raise_if_mismatch(step, abstract_state)
            state, data, why = self._read_verified(step, abstract_state, data_iterator is not None)
            if why is not None:
                log.error(
                    "checkpoint at step %d in %s %s; falling back to the one before",
                    step,
                    self.directory,
                    why,
                )
            if not _on_every_process(why is None):
                if why is None:
                    log.error("checkpoint at step %d is damaged on another process", step)
                damaged.append(step)
                continue
            if damaged:
                self._set_aside(damaged)
            if data_iterator is not None:
                # Outside the fallback: a data stream that differs from the checkpoint's is a
                # configuration error (DataError), not a damaged checkpoint.
                data_iterator.set_state(data)
            return state, step
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.directory} could be restored (see the "
                "errors above; a changed model configuration also causes this); move the workdir "
                "aside to start afresh"
            )
        return None, None

    def _raise_if_mismatch(self, step: int, abstract_state) -> None:
        """CheckpointMismatch if the state stored at `step` has other parameter names or shapes
        than `abstract_state`; nothing if they fit or the metadata is unreadable (a damaged
        checkpoint, which the read then reports)."""
        step_dir = self.directory / str(step)
        try:
            meta = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
            mismatch = integrity.describe_mismatch(meta.tree, abstract_state)
            # Metadata that contradicts the checkpoint's own manifest is damage, not another
            # configuration: the read and verification below then fail and fall back.
            if mismatch and not integrity.shapes_agree(step_dir, meta.tree):
                return
        except Exception:
            return
        if mismatch:
            raise CheckpointMismatch(
                f"the checkpoint at step {step} in {self.directory} was written by another "
                f"configuration ({mismatch}); run with the configuration that wrote it "
                f"(<workdir>/config.gin) or start in a new workdir"
            )

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged steps out of the checkpoint directory (process 0), so that Orbax
        neither lists them nor refuses to save those steps again."""
        aside = self.directory.parent / (self.directory.name + UNREADABLE_SUFFIX)
        integrity.set_aside(self.directory, steps, aside)
        self.manager.reload()


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
    return bool(np.all(flags))


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, so a restore lands on the current mesh."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
