"""Measurement helpers for bench/: the trainer's own compiled update, XLA's FLOP count, and a
matmul reference measured in the same process.

System code: it builds the update exactly as `jcdm.training.train.build` does for a run and
times it; nothing here changes what is computed. Times are medians of rounds, each round several
calls ended by one `block_until_ready`, so dispatch overlaps compute as in the training loop.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence

import gin
import jax
import jax.extend.core
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
    flops_per_step: float  # model_flops of the update / steps_per_call (all devices together)
    flops_per_sec: float
    loss_first: float
    loss_last: float
    entry_ops: dict = dataclasses.field(default_factory=dict)  # profiling.entry_op_counts
    profile: dict | None = None  # jcdm.dev.profiling.summarize of a trace, when asked for


def configure(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """A fresh gin config from files and bindings, parsed as the `jcdm` command does."""
    from jcdm.main import parse_gin

    gin.clear_config()
    parse_gin(list(gin_files), list(bindings))


def _eqn_flops(eqn) -> float:
    """2 x multiply-adds of one dot_general or conv_general_dilated equation, else 0."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, rc), (_, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        free_rhs = [d for i, d in enumerate(rhs) if i not in (*rc, *rb)]
        return 2.0 * np.prod(lhs, dtype=float) * np.prod(free_rhs, dtype=float)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        per_output = np.prod(rhs, dtype=float) / out_features  # kernel window x input features
        return 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=float) * per_output
    return 0.0


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        subs = []
        for value in eqn.params.values():
            for v in value if isinstance(value, tuple | list) else (value,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    subs.append(v.jaxpr)
                elif isinstance(v, jax.extend.core.Jaxpr):
                    subs.append(v)
        if not subs:
            continue
        counts = [_jaxpr_flops(j) for j in subs]
        if eqn.primitive.name == "cond":  # one branch runs
            total += max(counts)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(counts)
        else:  # calls, custom derivatives, remat, while (trip count unknown: the body once)
            total += sum(counts)
    return total


def model_flops(fn: Callable, *args) -> float:
    """Model FLOPs of one call of `fn(*args)`: 2 x the multiply-adds of every matmul
    (dot_general) and convolution in its jaxpr, backward passes included (they are traced),
    a scan's body times its length. Elementwise work is not counted: this is the numerator of
    the usual model-FLOP utilisation. Dense counting: taps on padding and on the zeros of an
    lhs-dilated (transposed / strided-gradient) convolution count too (0.2% of the CIFAR step).
    Counted from shapes alone, so the same on every backend and JAX version (XLA's own cost
    analysis hides cuDNN convolutions in custom calls on a GPU, and JAX 0.11 returns none for a
    lowering).
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


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


def build_configured():
    """`jcdm.training.train.build` (compiled) for the parsed gin config's batch and steps per
    call: what a run of that config compiles (with a persistent cache, what it stores)."""
    from jcdm.training import train as train_lib

    return train_lib.build(
        global_batch_size=int(gin.query_parameter("train.global_batch_size")),
        seed=0,
        total_steps=1000,
        ema_decay=0.999,
        steps_per_call=int(gin.query_parameter("train.steps_per_call")),
        unroll_steps=bool(gin.query_parameter("train.unroll_steps")),
    )


def time_train_step(
    name: str,
    *,
    calls: int = 3,
    rounds: int = 3,
    profile_dir: str | None = None,
    profile_calls: int = 2,
) -> StepTiming:
    """Build the configured run's update (gin must be parsed) and time it on one fixed batch.

    The state is donated and threaded through every call as in training, so the optimizer and
    EMA work are included; the input pipeline is not (bench/data_throughput.py measures it).
    With `profile_dir`, `profile_calls` more calls are traced there after the timing and
    summarised per HLO op (`jcdm.dev.profiling`); the trace's path is in the summary.
    """
    built = build_configured()
    gbs, spc = built.global_batch_size, int(gin.query_parameter("train.steps_per_call"))
    # the update of a k-step call scans k steps: its count is k steps
    flops = model_flops(built.update_fn, built.abstract_state, built.batch_struct)
    flops_per_step = flops / spc
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
    from jcdm.dev import profiling

    hlo = built.update.as_text()
    profile = None
    if profile_dir:
        try:
            path = profiling.trace_calls(call, calls=profile_calls, logdir=profile_dir)
            profile = profiling.summarize(path, hlo, calls=profile_calls)
            profile["trace"] = str(path)
        except Exception as e:  # the timing stands without it; the row says why it has none
            profile = {"error": f"{type(e).__name__}: {e}"}
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
        entry_ops=profiling.entry_op_counts(hlo),
        profile=profile,
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
