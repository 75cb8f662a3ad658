"""The one check of a run's settings, before anything is written (exit 2 on any problem).

`jcdm.main` calls `check_command_line` on the arguments and `check_bindings` on the parsed gin
configuration, before the preemption watcher, `jax.distributed`, the workdir or any output. Each
problem is one line, `bad setting: <binding>=<value> (<type>): must be <what>; e.g. <the fix>`,
all of them at once.

A new check is one entry in `RULES` (configurable -> parameter -> checker); the test
`tests/test_validate.py::test_every_gin_parameter_has_a_rule` fails until every parameter of every
jcdm configurable has one (or is in `UNCHECKED`, with the reason). Checks that need the data or
the devices (a batch larger than the dataset, a mesh that does not divide the batch) stay where
those are known (`train()`'s start-up, `jcdm.runtime.mesh`) and raise ValueError there, before
the workdir is created, which start-up also maps to exit 2. The checkers: `jcdm.training.checkers`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import gin

from jcdm.training.checkers import (
    DTYPE,
    FIR_IMPLS,
    NONNEG_INT,
    PATH,
    POS,
    POS_INT,
    PROB,
    SEED,
    Checker,
    boolean,
    checkpoint_step,
    integer,
    number,
    one_of,
    optional,
    sequence,
    text,
)

# W&B run ids may not hold / \ # ? % : and the trainer broadcasts the id in a 64-byte buffer.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConfigError(ValueError):
    """One or more settings are wrong; the message names each binding, its value and the fix."""


@functools.cache
def _rules() -> dict[str, dict[str, Checker]]:
    """configurable -> parameter -> checker; keys are gin's names without the module. Built on
    first use: the allowed values come from modules that import JAX, Flax and Grain, which
    `jcdm.main` should not wait for before it owns SIGTERM."""
    from jcdm.data.pipeline import SHUFFLE_MODES
    from jcdm.ict.objective import DISTANCES, HEAD_MODES, HEAD_PRECONDS
    from jcdm.models.layers import ATTN_IMPLS
    from jcdm.runtime.distributed import MODES as DISTRIBUTED_MODES
    from jcdm.runtime.mesh import STRATEGIES

    network = {
        "nf": POS_INT,
        "ch_mult": sequence(POS_INT, min_len=1),
        "num_res_blocks": POS_INT,
        "attn_resolutions": sequence(POS_INT),
        "dropout": number(0.0, 1.0),
        "fir_impl": FIR_IMPLS,
        "attn_impl": one_of(*ATTN_IMPLS),
        "skip_rescale": boolean,
        "embedding_type": one_of("fourier", "positional"),
        "init_scale": number(0.0),
        "fourier_scale": POS,
        "image_size": POS_INT,
        "out_channels": POS_INT,
        "dtype": DTYPE,
    }

    rules: dict[str, dict[str, Checker]] = {
        "train": {
            "num_steps": POS_INT.like(1000),
            "global_batch_size": POS_INT.like(64),
            "seed": SEED,
            "ema_decay": PROB.like(0.99993),
            "curriculum_steps": optional(POS_INT),
            "steps_per_call": POS_INT,
            "unroll_steps": boolean,
            "log_every": POS_INT,
            "nan_at_step": integer(-1),
            "test_fault": Checker(lambda v: isinstance(v, str), "a quoted string", ""),
        },
        "ICTConfig": {
            "sigma_min": POS,
            "sigma_max": POS,
            "rho": POS,
            "sigma_data": POS,
            "p_mean": number(),
            "p_std": POS,
            "s0": POS_INT,
            "s1": POS_INT,
            "distance": one_of(*DISTANCES),
            "huber_c": optional(POS),
            "head": one_of(*HEAD_MODES),
            "joint_weight": number(0.0),
            "head_precond": one_of(*HEAD_PRECONDS),
        },
        "EMAConfig": {"warmup_steps": NONNEG_INT},
        "make_optimizer": {
            "learning_rate": POS.like(1e-4),
            "b1": number(0.0, 1.0).like(0.9),
            "b2": number(0.0, 1.0).like(0.999),
            "eps": number(0.0).like(1e-8),
            "impl": one_of("auto", "fused", "optax"),
        },
        "NCSNpp": {
            **network,
            "fir_kernel": sequence(POS, min_len=1),
            "resblock_type": one_of("biggan", "ddpm"),
            "progressive": one_of("none", "output_skip", "residual"),
            "progressive_input": one_of("none", "input_skip", "residual"),
            "progressive_combine": one_of("sum", "cat"),
        },
        "ScoreHead": {
            **network,
            "resample_kernel": sequence(POS, min_len=1),
            "fuse_channels": optional(POS_INT),
            "norm_groups": optional(POS_INT),
        },
        "make_train_iterator": {
            "dataset": text,
            "image_size": optional(POS_INT),
            "random_flip": boolean,
            "worker_count": NONNEG_INT,
            "shuffle": one_of(*SHUFFLE_MODES),
            "shuffle_buffer_size": POS_INT,
            "read_threads": NONNEG_INT,
            "prefetch_batches": NONNEG_INT,
            "worker_buffer_size": NONNEG_INT,
            "verify_checksums": optional(boolean),
            "with_labels": boolean,
            "with_record_index": boolean,
        },
        "EvalConfig": {
            "every": NONNEG_INT,
            "num_grid_samples": POS_INT,
            "two_step_sigma": POS,
            "head_heun_steps": NONNEG_INT,
        },
        "FIDConfig": {
            "every": NONNEG_INT,
            "num_samples": POS_INT,
            "batch_size": POS_INT,
            "stats": PATH,
            "inception_weights": PATH,
            "features": one_of("inception", "digits"),
        },
        "CheckpointConfig": {
            "save_every": POS_INT,
            "keep": POS_INT,
            "keep_best_fid": NONNEG_INT,
            "async_save": boolean,
            "background": boolean,
            "fid_metric": one_of("fid_1step", "fid_2step"),
            "replica_parallel_min_bytes": NONNEG_INT,
        },
        "StallConfig": {
            "timeout_s": POS,
            "slow_step_factor": POS,
            "in_jax_grace_s": number(0.0),
            "peer_silence_s": POS,
            "heartbeat_s": POS,
            "enabled": boolean,
        },
        "LeaseConfig": {
            "enabled": boolean,
            "expiry_s": POS,
            "renew_every_s": optional(POS),
        },
        "WandbConfig": {
            "mode": optional(one_of("online", "offline", "disabled")),
            "project": text,
            "entity": PATH,
            "name": PATH,
            "tags": sequence(text),
        },
        "make_mesh": {
            "data": Checker(
                lambda v: v == -1 or POS_INT(v) is None, "-1 (all) or an integer >= 1", -1
            ),
            "fsdp": POS_INT,
        },
        "state_shardings": {"strategy": one_of(*STRATEGIES), "fsdp_min_size": NONNEG_INT},
        "compile_cache": {
            "enabled": boolean,
            "directory": PATH,
            "min_compile_time_s": optional(number(0.0)),
        },
        "initialize": {
            "mode": optional(one_of(*DISTRIBUTED_MODES)),
            "coordinator_address": PATH,
            "num_processes": optional(POS_INT),
            "process_id": optional(NONNEG_INT),
            "initialization_timeout": POS_INT,
            "heartbeat_timeout": POS_INT,
            "peer_watchdog": boolean,
            "peer_exit_grace": number(0.0),
        },
        "inference": {
            "checkpoint_step": checkpoint_step,
            "num_samples": POS_INT,
            "sampler_steps": sequence(POS_INT, min_len=1),
            "intermediate_sigmas": optional(sequence(POS)),
            "head_sampler_steps": NONNEG_INT,
            "fid_stats": PATH,
            "batch_size": POS_INT,
            "seed": SEED,
            "fid_seed_sets": POS_INT,
        },
    }
    return rules


def __getattr__(name: str) -> Any:
    if name == "RULES":  # validate.RULES, built on first use (see _rules)
        return _rules()
    raise AttributeError(name)


# Parameters the code passes itself (gin cannot usefully bind them); the coverage test skips them.
UNCHECKED = {
    "make_networks": ("image_shape", "head_mode"),  # from the data and ICTConfig.head
    "make_mesh": ("devices",),  # tests pass device lists
    "make_train_iterator": ("global_batch_size", "seed", "process_index", "process_count"),
    "state_shardings": ("abstract_state", "mesh"),
}

# Relations between parameters of one configurable: (configurable, test, message).
RELATIONS: list[tuple[str, Callable[[dict], bool], str]] = [
    (
        "ICTConfig",
        lambda b: b.get("sigma_min", 0.002) < b.get("sigma_max", 80.0),
        "ICTConfig needs sigma_min < sigma_max",
    ),
    ("ICTConfig", lambda b: b.get("s0", 10) <= b.get("s1", 1280), "ICTConfig needs s0 <= s1"),
    (
        "StallConfig",
        lambda b: b.get("peer_silence_s", 10.0) >= 3 * b.get("heartbeat_s", 1.0),
        "StallConfig.peer_silence_s must be at least 3 * StallConfig.heartbeat_s",
    ),
    (
        "LeaseConfig",
        lambda b: b.get("renew_every_s") is None or b["renew_every_s"] < b.get("expiry_s", 60.0),
        "LeaseConfig.renew_every_s must be shorter than LeaseConfig.expiry_s",
    ),
]

REQUIRED = {"train": ("num_steps", "global_batch_size")}


def _example(binding: str, value: Any) -> str:
    """How the value is written on the command line, so the fix can be copied."""
    return f"--gin.{binding}=" + (f'"{value!r}"' if isinstance(value, str) else repr(value))


def _bindings(name: str) -> dict[str, Any]:
    try:
        return dict(gin.get_bindings(name))
    except ValueError:  # not registered in this process (e.g. a module not imported)
        return {}


def bound_problems(rules: dict[str, dict[str, Checker]] | None = None) -> list[str]:
    """Every problem of the current gin bindings, one line each (empty: all good)."""
    rules = _rules() if rules is None else rules
    problems = []
    for name, params in rules.items():
        for param, value in _bindings(name).items():
            check = params.get(param)
            what = check(value) if check is not None else None
            if what is not None:
                problems.append(
                    f"{name}.{param}={value!r} ({type(value).__name__}): must be {what}; "
                    f"e.g. {_example(f'{name}.{param}', check.example)}"
                )
    for name, test, message in RELATIONS:
        bound = _bindings(name)
        try:
            ok = test(bound)
        except TypeError:
            continue  # a wrong type is reported above
        if not ok:
            problems.append(f"{message} (bound: {bound})")
    return problems


def check_bindings(*, training: bool = True) -> None:
    """Raise ConfigError naming every binding that is missing, of the wrong type or out of range."""
    problems = []
    if training:
        for name, params in REQUIRED.items():
            missing = [p for p in params if p not in _bindings(name)]
            if missing:
                problems.append(
                    f"the gin configuration binds no {', '.join(f'{name}.{p}' for p in missing)} "
                    "(gin/joint.gin sets both; add e.g. --gin.train.num_steps=1000)"
                )
    problems += bound_problems()
    if problems:
        raise ConfigError("bad setting: " + "\nbad setting: ".join(problems))


def check_command_line(*, workdir: str, log_level: str, run_id: str | None) -> None:
    """The command line's own values (see `jcdm.main.parse_args`); raises ConfigError."""
    problems = []
    if not workdir.strip():
        problems.append(
            "--workdir is empty: name the run's folder, e.g. --workdir runs/demo (an empty value "
            "would train into the current directory)"
        )
    elif "://" in workdir:
        scheme, _, rest = workdir.partition("://")
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not rest.split("/")[0]:
            problems.append(f"--workdir {workdir!r} is not a bucket URL like gs://BUCKET/runs/NAME")
    else:
        problems += _local_workdir_problems(workdir)
    if logging.getLevelName(log_level.upper()) not in (
        logging.DEBUG,
        logging.INFO,
        logging.WARNING,
        logging.ERROR,
        logging.CRITICAL,
    ):
        problems.append(
            f"--log_level {log_level!r} is not a level: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    if run_id is not None and not RUN_ID_RE.fullmatch(run_id):
        problems.append(
            f"--run_id {run_id!r} (or $JCDM_RUN_ID): use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (W&B ids and file names refuse / \\ # ? % : and "
            "spaces), e.g. --run_id cifar-joint-01"
        )
    if problems:
        raise ConfigError("\n".join(problems))


def _local_workdir_problems(workdir: str) -> list[str]:
    p = os.path.abspath(workdir)
    if os.path.exists(p) and not os.path.isdir(p):
        return [f"--workdir {workdir!r} is a file, not a folder: choose another path"]
    parent = p
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return [f"--workdir {workdir!r}: {parent!r} is a file, so the folder cannot be created"]
    return []
