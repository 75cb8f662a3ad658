"""The trainer, top to bottom: mesh, input, model, sharding, update, checkpoint, eval, loop.

Everything is configured by gin (`train.*` and the configurables each section calls); the
operative config is written to `<workdir>/config.gin` once every section has been built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jcdm import data as data_lib
from jcdm import models
from jcdm.ict import objective
from jcdm.runtime import checkpoint as ckpt_lib
from jcdm.runtime import io, peers, reporting, stall
from jcdm.runtime import lease as lease_lib
from jcdm.runtime import mesh as mesh_lib
from jcdm.runtime import preemption as preemption_lib
from jcdm.training import evaluation, faults
from jcdm.training import sampler as sampler_lib
from jcdm.training import step as step_lib
from jcdm.training import update as update_lib

log = logging.getLogger(__name__)

# The math stays free of gin; the trainer registers the method config as a configurable.
ICTConfig = gin.external_configurable(objective.ICTConfig, module="jcdm")


class Preempted(Exception):
    """A preemption notice was handled: a checkpoint at `step` is committed."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint at step {step} committed; restart to resume")
        self.step = step


class Interrupted(Exception):
    """Ctrl-C or SIGHUP was handled: a checkpoint at `step` is committed (not restarted)."""

    def __init__(self, step: int):
        super().__init__(
            f"interrupted: checkpoint at step {step} committed; rerun the same command to resume"
        )
        self.step = step


class NumericalError(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


class StartupError(Exception):
    """A deterministic problem found before the first step (configuration, data, mesh, or
    checkpoints that do not fit the configuration): restarting cannot help (exit 2)."""


# Raised before the first step, these are a configuration's doing, not a transient fault: a
# retry would fail the same way. OSError in general (a bucket or disk hiccup), timeouts and
# runtime errors stay retryable.
NOT_RETRYABLE = (
    ValueError,  # includes MeshError, DataError, gin's and the configurables' own checks
    TypeError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    ckpt_lib.CheckpointMismatch,
)


@contextlib.contextmanager
def startup_errors():
    """Re-raise a NOT_RETRYABLE error of the enclosed start-up code as a StartupError."""
    try:
        yield
    except NOT_RETRYABLE as e:
        raise StartupError(f"{type(e).__name__}: {e}") from e


@gin.configurable(module="jcdm")
def make_optimizer(
    *,
    learning_rate: float = 1e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    impl: str = "auto",
) -> update_lib.FusedRAdam | update_lib.PerLeaf:
    """RAdam, constant learning rate, no warmup or clipping (docs/recipe.md section 1).

    `impl`: 'fused' (RAdam + EMA + guard in one pass over packed parameters), 'optax'
    (`optax.radam` leaf by leaf), or 'auto': 'optax' on a CPU, where a kernel launch costs no
    more than its work and the per-leaf step compiles ~1.5x faster, 'fused' on accelerators.
    Same numbers and checkpoint layout either way (jcdm.training.update).
    """
    if impl == "auto":
        impl = "optax" if jax.default_backend() == "cpu" else "fused"
    if impl == "fused":
        return update_lib.FusedRAdam(learning_rate, b1=b1, b2=b2, eps=eps)
    if impl == "optax":
        return update_lib.PerLeaf(optax.radam(learning_rate, b1=b1, b2=b2, eps=eps))
    raise ValueError(
        f"make_optimizer.impl must be one of {('auto', *update_lib.IMPLS)}, got {impl!r}; set "
        "make_optimizer.impl = 'auto' (default), 'fused' or 'optax'"
    )


@gin.configurable(module="jcdm")
def make_networks(*, image_shape: tuple[int, int, int], head_mode: str) -> step_lib.Networks:
    """NCSN++ backbone and, unless head_mode == "none", the score head (sizes from gin)."""
    h, w, c = image_shape
    backbone = models.NCSNpp(image_size=h, out_channels=c)
    head = None if head_mode == "none" else models.ScoreHead(image_size=h, out_channels=c)
    return step_lib.Networks(backbone=backbone, head=head)


@dataclasses.dataclass
class Built:
    """What `build` returns: the mesh, input, networks, shardings and the compiled update."""

    mesh: jax.sharding.Mesh
    data_it: data_lib.TrainIterator
    image_shape: tuple[int, int, int]
    cfg: objective.ICTConfig
    networks: step_lib.Networks
    init_fn: Callable
    abstract_state: step_lib.TrainState
    state_sh: step_lib.TrainState
    batch_sh: jax.sharding.NamedSharding
    update: Callable | None  # compiled: (state, images) -> (state, metrics); donates state
    update_fn: Callable  # the same function before jit (bench/ lowers it to count FLOPs)
    batch_struct: jax.ShapeDtypeStruct
    compile_s: float
    num_params: dict[str, int]

    global_batch_size: int

    def compile(self) -> None:
        """Lower and compile the update (a persistent-cache hit on a restart, see
        jcdm.runtime.compile_cache); sets `update` and `compile_s`."""
        t0 = time.perf_counter()
        self.update = (
            jax.jit(
                self.update_fn,
                in_shardings=(self.state_sh, self.batch_sh),
                out_shardings=(self.state_sh, mesh_lib.replicated(self.mesh)),
                donate_argnums=0,
            )
            .lower(self.abstract_state, self.batch_struct)
            .compile()
        )
        self.compile_s = time.perf_counter() - t0
        log.info("train step compiled in %.1fs", self.compile_s)

    def put_batch(self, local: np.ndarray) -> jax.Array:
        """This process's rows -> the global batch array on the mesh."""
        global_shape = (*local.shape[:-4], self.global_batch_size, *self.image_shape)
        return jax.make_array_from_process_local_data(self.batch_sh, local, global_shape)


def build(
    *,
    global_batch_size: int,
    seed: int,
    total_steps: int,
    ema_decay: float,
    steps_per_call: int = 1,
    unroll_steps: bool = False,
    compile_update: bool = True,
) -> Built:
    """Mesh, input, model, sharding and update: everything but the loop (used by benchmarks)."""
    # --- Mesh ------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh()
    log.info("%s", mesh_lib.describe(mesh))
    mesh_lib.check_batch(global_batch_size, mesh)

    # --- Input -----------------------------------------------------------------------------
    data_it = data_lib.make_train_iterator(
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    spec = data_it.spec
    image_shape = (spec.height, spec.width, spec.channels)

    # --- Model -----------------------------------------------------------------------------
    cfg = ICTConfig()
    networks = make_networks(image_shape=image_shape, head_mode=cfg.head)
    tx = make_optimizer()
    log.info("optimizer: %s", type(tx).__name__)
    init_fn = lambda seed: step_lib.init_state(seed, networks, tx, image_shape)
    abstract_state = jax.eval_shape(init_fn, jnp.int32(seed))
    num_params = {
        k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
        for k, v in abstract_state.params.items()
    }
    log.info("parameters: %s", {k: f"{v / 1e6:.2f}M" for k, v in num_params.items()})

    # --- Sharding --------------------------------------------------------------------------
    state_sh = mesh_lib.state_shardings(abstract_state, mesh)
    batch_shape = (global_batch_size, *image_shape)
    batch_spec = mesh_lib.BATCH_SPEC
    if steps_per_call > 1:  # stacked batches [k, B, ...]: the scan axis stays unsharded
        batch_shape = (steps_per_call, *batch_shape)
        batch_spec = jax.sharding.PartitionSpec(None, mesh_lib.AXES)
    batch_sh = jax.sharding.NamedSharding(mesh, batch_spec)

    # --- Update ----------------------------------------------------------------------------
    update = step_lib.make_multi_step(
        step_lib.make_train_step(
            networks,
            tx,
            cfg,
            total_steps=total_steps,
            ema_decay=ema_decay,
            packable=update_lib.replicated_leaves(state_sh.params),
        ),
        steps_per_call,
        unroll=unroll_steps,
    )
    batch_struct = jax.ShapeDtypeStruct(batch_shape, jnp.float32)
    built = Built(
        mesh=mesh,
        data_it=data_it,
        image_shape=image_shape,
        cfg=cfg,
        networks=networks,
        init_fn=init_fn,
        abstract_state=abstract_state,
        state_sh=state_sh,
        batch_sh=batch_sh,
        update=None,
        update_fn=update,
        batch_struct=batch_struct,
        compile_s=0.0,
        num_params=num_params,
        global_batch_size=global_batch_size,
    )
    if compile_update:
        built.compile()
    return built


def build_for_sampling() -> Built:
    """`build` for sampling from a checkpoint (`--only_inference`, the study's evaluation): only
    the networks, shardings and the data's image shape are used, so any batch that divides the
    devices does, and the parameters come from the checkpoint."""
    return build(
        global_batch_size=jax.device_count(),
        seed=0,
        total_steps=1,
        ema_decay=0.0,
        compile_update=False,
    )


def init_or_restore(built: Built, checkpointer: ckpt_lib.Checkpointer, seed: int):
    """The latest readable checkpoint on the current mesh, or a fresh state."""
    target = ckpt_lib.abstract_with_shardings(built.abstract_state, built.state_sh)
    state, restored_step = checkpointer.restore_latest(target, built.data_it)
    if state is None:
        # Every process computes the same unsharded state on a local device, then keeps the
        # shards its devices own: identical values whatever the mesh.
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        host = jax.device_get(jax.jit(built.init_fn, out_shardings=local)(jnp.int32(seed)))
        state = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
            host,
            built.state_sh,
        )
        log.info("initialised a new run")
    else:
        log.info("resumed from step %d", restored_step)
    return state


@gin.configurable(module="jcdm", denylist=["workdir", "run_id"])
def train(
    *,
    workdir: str,
    run_id: str | None = None,
    num_steps: int = gin.REQUIRED,
    global_batch_size: int = gin.REQUIRED,
    seed: int = 0,
    ema_decay: float = 0.99993,
    curriculum_steps: int | None = None,
    steps_per_call: int = 1,
    unroll_steps: bool = False,
    log_every: int = 100,
    nan_at_step: int = -1,
    test_fault: str = "",
) -> int:
    """Train until `num_steps`; resume from `workdir` if it holds checkpoints. Returns the step.

    `curriculum_steps` is K in N(k) (None: num_steps, as iCT ties the curriculum to the run).
    `steps_per_call` updates run inside one compiled call (a scan; `unroll_steps` unrolls it, for
    XLA:CPU, where a loop body's convolutions are slow). Sample grids and FID follow
    `EvalConfig` / `FIDConfig`, saves `CheckpointConfig`, stall detection `StallConfig`.
    Test hooks: `nan_at_step` puts NaNs into the batch of that update (state.step), so its loss
    and gradient are non-finite as after a real overflow, without changing the compiled
    program; `test_fault` (see `faults.parse`) hangs the main thread or raises at a step.

    Errors: a deterministic problem found before the first step (configuration, data, mesh, a
    checkpoint that does not fit) raises `StartupError` (exit 2, not retried); anything after
    training has started is a failure to retry (exit 1), except a handled preemption
    (`Preempted`, exit 75) and a non-finite loss (`NumericalError`, exit 3).
    """
    if log_every < 1 or steps_per_call < 1:
        raise StartupError("train needs log_every >= 1 and steps_per_call >= 1")
    is_main = jax.process_index() == 0
    owns_watcher = preemption_lib.active() is None  # jcdm.main installs it before startup
    preemption = preemption_lib.install()
    progress = stall.progress
    with startup_errors():
        fault = faults.parse(test_fault)
        eval_cfg, fid_cfg = evaluation.EvalConfig(), evaluation.FIDConfig()  # before compiling
        stall_cfg = stall.StallConfig()
        built = build(
            global_batch_size=global_batch_size,
            seed=seed,
            total_steps=curriculum_steps or num_steps,
            ema_decay=ema_decay,
            steps_per_call=steps_per_call,
            unroll_steps=unroll_steps,
            compile_update=False,
        )
        data_it = built.data_it
        _check_dataset_fits(data_it.spec.num_records, global_batch_size)
        io.mkdirs(workdir)  # a local path or a bucket URL; after every check of the settings
        # Restore before compiling: a checkpoint that does not fit the configuration stops the
        # run at once, and restart time splits into its parts.
        checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
        t0 = time.perf_counter()
        state = init_or_restore(built, checkpointer, seed)
        restore_s = time.perf_counter() - t0
        built.compile()
        start_step = int(state.step)
        reporter = reporting.Reporter(
            workdir,
            enabled=is_main,
            num_steps=num_steps,
            run_id=run_id or _persistent_run_id(workdir),
            wandb_cfg=reporting.WandbConfig(),
            config_text=gin.config_str(),
            resume_step=start_step,
        )
        if is_main:
            io.write_text(io.path(workdir) / "config.gin", gin.operative_config_str())
        sampler = sampler_lib.Sampler(
            built.networks,
            built.cfg,
            built.mesh,
            built.state_sh.ema_params,
            built.image_shape,
            two_step_sigma=eval_cfg.two_step_sigma,
        )
        evaluator = evaluation.PeriodicEval(
            sampler, reporter, seed=seed, stride=steps_per_call, cfg=eval_cfg, fid_cfg=fid_cfg
        )

    # --- Loop ------------------------------------------------------------------------------
    step = start_step
    window_t, window_step = time.perf_counter(), step
    clock = reporting.Stopwatch()
    last_metrics: dict = {"compile_s": built.compile_s}
    monitor = stall.Monitor(stall_cfg, announce=peers.announce_stall) if stall_cfg.enabled else None

    def save(step: int) -> None:  # every save: regular, final and preemption
        _check_finite(state, step)
        metrics = {**last_metrics, **evaluator.fid_metrics}
        with progress.paused():
            checkpointer.save(step, state, data_it, force=True, metrics=metrics)

    try:
        loop_uptime = reporting.process_uptime_s()
        preemption.begin(start_step, steps_per_call)
        progress.start(start_step)
        if monitor is not None:
            monitor.start()
        while step < num_steps:
            fault.at_boundary(step)
            local = np.stack([next(data_it)["image"] for _ in range(steps_per_call)])
            if step <= nan_at_step < step + steps_per_call:
                local[nan_at_step - step] = np.nan
            batch = built.put_batch(local if steps_per_call > 1 else local[0])
            with progress.on_device():
                state, metrics = built.update(state, batch)
            step += steps_per_call
            final = step >= num_steps
            lease_lib.check()  # another run took the workdir (we were paused or cut off): stop
            if step == start_step + steps_per_call:
                _log_first_step(step, metrics, loop_uptime, restore_s, built.compile_s)

            if final or evaluation.crossed(step, log_every, steps_per_call):
                m = jax.device_get(metrics)
                _check_finite(state, step)
                now = time.perf_counter()
                ips = (step - window_step) * global_batch_size / max(now - window_t, 1e-9)
                window_t, window_step = now, step
                last_metrics = {**last_metrics, **m, "images_per_sec": ips}
                reporter.write_metrics(step, last_metrics)
                last_metrics.pop("compile_s", None)
                reporter.progress(step, float(m["loss"]), ips, clock.elapsed())
            # After logging, so the step's metrics row exists and is stored with the checkpoint;
            # at the final step the final save below does the job. Every process asks at every
            # boundary (the agreement needs it), the final one included.
            if preemption.should_stop(step) and not final:
                save(step)
                with progress.paused():
                    checkpointer.wait()
                raise Interrupted(step) if preemption.interrupted else Preempted(step)
            with progress.paused():
                evaluator.maybe_run(step, state.ema_params, final=final)
            if final or evaluation.crossed(step, checkpointer.cfg.save_every, steps_per_call):
                save(step)
            checkpointer.raise_if_failed()  # a failed background save ends the run now
            progress.beat(step)
        progress.stop()
        checkpointer.wait()
        checkpointer.require_committed(step)  # never exit 0 without the final checkpoint
    finally:
        progress.stop()
        if monitor is not None:
            monitor.close()
        checkpointer.close()
        reporter.close()
        if owns_watcher:
            preemption_lib.uninstall()
    multihost_utils.sync_global_devices("jcdm train finished")
    reporting.print_next_steps(workdir, enabled=is_main, final_metrics=evaluator.fid_metrics)
    return step


def _log_first_step(step, metrics, loop_uptime: float, restore_s: float, compile_s: float):
    """How long the (re)start took, split into its parts (bench/soak.py reads this line)."""
    jax.block_until_ready(metrics)  # once per start: the first step's end, not its dispatch
    total = reporting.process_uptime_s()
    log.info(
        "first step %d done %.2fs after process start: start-up %.2fs, restore %.2fs, "
        "compile %.2fs, first step %.2fs",
        step,
        total,
        loop_uptime - restore_s - compile_s,
        restore_s,
        compile_s,
        total - loop_uptime,
    )


def _check_dataset_fits(num_records: int, global_batch_size: int) -> None:
    """Refuse a dataset smaller than one global batch: every batch would repeat its images, which
    is a wrong dataset path or batch size far more often than an intent."""
    if num_records < global_batch_size:
        raise data_lib.DataError(
            f"the dataset holds {num_records} image(s), fewer than one global batch "
            f"(train.global_batch_size={global_batch_size}): every batch would repeat them. "
            "Check make_train_iterator.dataset, or set train.global_batch_size to at most "
            f"{num_records}"
        )


def _check_finite(state, step: int) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        raise NumericalError(
            f"non-finite loss or gradient at step {bad}; training stopped before step {step}, "
            "no checkpoint of the broken state was written (the last good one is kept). "
            "Lower the learning rate or check the data."
        )


def _persistent_run_id(workdir: str) -> str:
    """One run id per workdir (the W&B run id), created once by process 0 and read back after
    restarts; broadcast so every process agrees without reading the workdir."""
    path = io.path(workdir) / "run_id"
    run_id = ""
    if jax.process_index() == 0:
        if not io.exists(path):
            io.write_text(path, uuid.uuid4().hex[:12])
        run_id = io.read_text(path).strip()
    buf = np.zeros(64, np.uint8)
    buf[: len(run_id)] = np.frombuffer(run_id.encode(), np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(buf[buf > 0]).decode()
