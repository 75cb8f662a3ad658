"""Measurement helpers for bench/: the trainer's own compiled update, XLA's FLOP count, and a
matmul reference measured in the same process.

System code: it builds the update exactly as `jcdm.train.build` does for a run and times it;
nothing here changes what is computed. Times are medians of rounds, each round several calls
ended by one `block_until_ready`, so dispatch overlaps compute as in the training loop.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class StepTiming:
    """One configuration's compiled train step: what bench/step.py prints per row."""

    name: str
    global_batch_size: int
    steps_per_call: int
    devices: int
    compile_s: float
    step_s: float  # seconds per optimizer step (a call's time / steps_per_call)
    images_per_sec: float
    flops_per_step: float  # XLA cost analysis of the lowered update (all devices together)
    flops_per_sec: float
    loss_first: float
    loss_last: float


def configure(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """A fresh gin config from files and bindings, parsed as the `jcdm` command does."""
    from jcdm.main import parse_gin

    gin.clear_config()
    parse_gin(list(gin_files), list(bindings))


def model_flops(fn: Callable, *args) -> float:
    """FLOPs of one call of `fn(*args)`: XLA's cost analysis of the program lowered for the CPU
    (unoptimised; a multiply-add counts 2), whatever the default backend. Lowering only, no
    compile. Why CPU: a compiled GPU program hides its cuDNN convolutions in custom calls the
    analysis does not count (CIFAR ict step on an H200: 0.26 TFLOP counted of 20.7), and JAX 0.11
    returns no count for a GPU lowering. A while-loop (scan) body counts once, so a k-step
    scanned update reports one step."""
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",))
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _timed_rounds(call: Callable[[], object], *, calls: int, rounds: int) -> float:
    """Median over `rounds` of (seconds for `calls` back-to-back calls) / calls."""
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)


def time_train_step(name: str, *, calls: int = 3, rounds: int = 3) -> StepTiming:
    """Build the configured run's update (gin must be parsed) and time it on one fixed batch.

    The state is donated and threaded through every call as in training, so the optimizer and
    EMA work are included; the input pipeline is not (bench/data_throughput.py measures it).
    """
    from jcdm import train as train_lib

    gbs = int(gin.query_parameter("train.global_batch_size"))
    spc = int(gin.query_parameter("train.steps_per_call"))
    built = train_lib.build(
        global_batch_size=gbs, seed=0, total_steps=1000, ema_decay=0.999, steps_per_call=spc
    )
    flops_per_step = model_flops(built.update_fn, built.abstract_state, built.batch_struct)
    state = jax.jit(built.init_fn, out_shardings=built.state_sh)(jnp.int32(0))
    local = np.stack([next(built.data_it)["image"] for _ in range(spc)])
    batch = built.put_batch(local if spc > 1 else local[0])
    built.data_it.close()

    box = {"state": state}
    losses = []

    def call():
        box["state"], metrics = built.update(box["state"], batch)
        return metrics

    losses.append(float(jax.device_get(call())["loss"]))  # warm-up: first-call allocations
    per_call = _timed_rounds(call, calls=calls, rounds=rounds)
    losses.append(float(jax.device_get(call())["loss"]))
    step_s = per_call / spc
    return StepTiming(
        name=name,
        global_batch_size=gbs,
        steps_per_call=spc,
        devices=built.mesh.size,
        compile_s=built.compile_s,
        step_s=step_s,
        images_per_sec=gbs / step_s,
        flops_per_step=flops_per_step,
        flops_per_sec=flops_per_step / step_s,
        loss_first=losses[0],
        loss_last=losses[-1],
    )


def matmul_flops_per_sec(n: int, dtype: str = "float32", *, calls: int = 5, rounds: int = 3):
    """FLOP/s of a jitted [n, n] @ [n, n] on the default device: the reference a conv network's
    achieved FLOP/s is compared with (2 n^3 FLOPs per product)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    return 2.0 * n**3 / _timed_rounds(lambda: f(a, b), calls=calls, rounds=rounds)


def machine_line() -> str:
    """One line naming the backend, device kind and count, JAX version and CPU count."""
    kind = jax.devices()[0].device_kind
    return (
        f"{jax.default_backend()} ({kind}) x{jax.device_count()}, jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
