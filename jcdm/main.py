"""Command line: `jcdm --gin gin/joint.gin --workdir DIR [--gin_bindings B ...] [--gin.K=V ...]`.

Every failure maps to an exit code of `jcdm.exit_codes`, the contract with the launchers: a
problem found before the first step (command line, gin, data, mesh, checkpoints that do not fit,
a workdir whose lease another run holds) exits 2 and is not retried; any error once training has
started exits 1 and is retried; Ctrl-C or SIGHUP saves and exits 4, not retried.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from jcdm import exit_codes

log = logging.getLogger("jcdm")

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class UsageError(ValueError):
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jcdm",
        description="Train (or sample from) a joint consistency + diffusion model.",
        epilog="Short form: --gin.train.num_steps=100 equals --gin_bindings train.num_steps=100.",
    )
    p.add_argument(
        "--gin",
        action="append",
        default=[],
        metavar="FILE",
        help="gin config file (repeatable; later files override earlier ones)",
    )
    p.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        metavar="BINDING",
        help="one gin binding, e.g. 'train.num_steps=100' (repeatable)",
    )
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, samples")
    p.add_argument(
        "--run_id",
        default=os.environ.get("JCDM_RUN_ID"),
        help="run id (W&B id); default: created once per workdir",
    )
    p.add_argument(
        "--only_inference",
        action="store_true",
        help="restore a checkpoint and write samples (and FID) instead of training",
    )
    p.add_argument(
        "--take_over_lease",
        action="store_true",
        help="take the workdir over from the run that holds its lease (only once you have "
        "checked that run is dead: its process or machine is gone)",
    )
    p.add_argument("--log_level", default="INFO")
    short = [a for a in argv if a.startswith("--gin.")]
    rest = [a for a in argv if not a.startswith("--gin.")]
    args = p.parse_args(rest)
    from jcdm.training import validate

    try:  # before the workdir becomes absolute: "" would become the current directory
        validate.check_command_line(
            workdir=args.workdir, log_level=args.log_level, run_id=args.run_id
        )
    except validate.ConfigError as e:
        p.error(str(e))
    if "://" not in args.workdir:  # Orbax/TensorStore need absolute local paths
        args.workdir = os.path.abspath(args.workdir)
    for a in short:
        binding = a[len("--gin.") :]
        if "=" not in binding:
            p.error(f"{a}: the short form is --gin.KEY=VALUE")
        args.gin_bindings.append(binding)
    if not args.gin:
        p.error("at least one --gin FILE is required (e.g. --gin gin/demo.gin)")
    return args


def configure_logging(level: str) -> None:
    import jax

    fmt = f"%(asctime)s p{jax.process_index()} %(levelname).1s %(name)s] %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, datefmt="%H:%M:%S", force=True)
    # Gloo and absl chatter drowns the trainer's own lines.
    for noisy in ("absl", "jax._src", "orbax", "etils", "grain", "fsspec", "gcsfs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Parse files then bindings; any unknown configurable, parameter or file is a UsageError."""
    import gin

    import jcdm.register  # noqa: F401  (imports every configurable so gin can see it)
    from jcdm.runtime import io

    gin.add_config_file_search_path(GIN_DIR)
    gin.add_config_file_search_path(os.getcwd())
    # A bucket run's own config.gin (the command it prints at its end) is read from the bucket.
    gin.config.register_file_reader(_open_url, lambda f: f.startswith("gs://") and io.exists(f))
    for f in files:
        if not io.is_local(f):
            if io.exists(f):
                continue
            raise UsageError(f"gin file {f!r} not found")
        if not os.path.exists(f) and not os.path.exists(os.path.join(GIN_DIR, f)):
            raise UsageError(f"gin file {f!r} not found (configs live in {GIN_DIR})")
    quiet = _DropGinPathProbes()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
    except Exception as e:  # gin raises ValueError, KeyError, SyntaxError, TokenError...
        msg = str(e).strip().splitlines()
        raise UsageError(
            "bad gin configuration: " + " | ".join(msg[:3]) + "\nCheck the spelling against "
            "gin/joint.gin (a run's full config: <workdir>/config.gin); strings need quotes: "
            "\"ICTConfig.head='vanilla'\"."
        ) from e
    finally:
        logging.getLogger().removeFilter(quiet)


def _open_url(f: str):
    from jcdm.runtime import io

    return io.path(f).open("r")


def _check_missing_bucket_client(args: argparse.Namespace) -> None:
    from jcdm.runtime import io

    for p in [args.workdir, *args.gin]:
        if message := io.missing_bucket_client(p):
            raise UsageError(message)


class _DropGinPathProbes(logging.Filter):
    """gin logs an ERROR for every search path it probes for an `include` before finding it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found")


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.only_inference:
        from jcdm.runtime import preemption

        # Keep a SIGTERM that arrives while starting up (the loop acts on it), and own SIGTERM
        # before jax.distributed starts JAX's notifier, which would swallow it (see preemption).
        preemption.install()
    from jcdm.runtime import distributed

    try:
        _check_missing_bucket_client(args)
        parse_gin(args.gin, args.gin_bindings)
        from jcdm.training import validate

        try:  # every binding's type and range, before anything is started or written
            validate.check_bindings(training=not args.only_inference)
        except validate.ConfigError as e:
            raise UsageError(str(e)) from e
    except UsageError as e:
        print(f"jcdm: error: {e}", file=sys.stderr)
        return exit_codes.USAGE
    try:
        distributed.initialize()
    except ValueError as e:
        print(f"jcdm: error: {e}", file=sys.stderr)
        return exit_codes.USAGE
    configure_logging(args.log_level)

    from jcdm.runtime import compile_cache, lease
    from jcdm.training import train as train_lib

    try:
        with train_lib.startup_errors():
            compile_cache.compile_cache(workdir=args.workdir)
        if args.only_inference:
            from jcdm.training import inference

            with train_lib.startup_errors():  # nothing is trained: every input is configuration
                inference.run(workdir=args.workdir)
        else:
            with contextlib.ExitStack() as stack:
                with train_lib.startup_errors():
                    stack.enter_context(_workdir_lease(args))
                train_lib.train(workdir=args.workdir, run_id=args.run_id)
    except lease.LeaseHeld as e:
        log.error("%s (exit %d)", e, exit_codes.USAGE)
        distributed.shutdown()  # every process learns the refusal before process 0 leaves
        return exit_codes.USAGE
    except train_lib.StartupError as e:
        log.error(
            "%s (found before the first step: exit %d, a restart cannot help)", e, exit_codes.USAGE
        )
        return exit_codes.USAGE
    except train_lib.Interrupted as e:
        log.warning("%s (exit %d, not restarted by the launchers)", e, exit_codes.INTERRUPTED)
        distributed.shutdown()
        return exit_codes.INTERRUPTED
    except train_lib.Preempted as e:
        log.warning("%s (exit %d)", e, exit_codes.PREEMPTED)
        distributed.shutdown()
        return exit_codes.PREEMPTED
    except train_lib.NumericalError as e:
        log.error("%s (exit %d)", e, exit_codes.NUMERICAL)
        return exit_codes.NUMERICAL
    except ImportError as e:  # e.g. gcsfs for a gs:// path in a binding: a retry cannot fix it
        log.error(
            "%s (exit %d: a package is missing; install it, e.g. `pip install -e .` for jcdm's "
            "dependencies, then rerun)",
            e,
            exit_codes.USAGE,
        )
        return exit_codes.USAGE
    except Exception as e:  # once training has started, everything is worth a retry
        log.exception(
            "%s: %s (exit %d, retried by the launchers)", type(e).__name__, e, exit_codes.FAILURE
        )
        return exit_codes.FAILURE
    log.info("done")
    distributed.shutdown()
    return exit_codes.SUCCESS


def _workdir_lease(args: argparse.Namespace):
    """The workdir's lease for this job (process 0 takes it before anything is written; the
    others learn the outcome), and the run id it records, created here on a new workdir."""
    import uuid

    import jax

    from jcdm.runtime import io, lease
    from jcdm.training import train as train_lib

    kv = None
    if jax.process_count() > 1:
        from jax._src import distributed as _dist

        kv = _dist.global_state.client
    run_id, new_id = args.run_id, None
    id_path = io.path(args.workdir) / "run_id"
    if run_id is None and jax.process_index() == 0:
        run_id = io.read_text(id_path).strip() if io.exists(id_path) else None
        if run_id is None:
            run_id = new_id = uuid.uuid4().hex[:12]

    workdir = io.path(args.workdir)
    fresh = jax.process_index() == 0 and not io.exists(workdir)

    @contextlib.contextmanager
    def held():
        try:
            with lease.hold(
                args.workdir,
                run_id=run_id,
                take_over=args.take_over_lease,
                process_index=jax.process_index(),
                kv=kv,
            ):
                if new_id is not None:  # the run id the lease names is the one train() reads
                    io.write_text(id_path, new_id)
                yield
        except train_lib.StartupError:
            # A refused start leaves no trace: the workdir the lease created goes again (a
            # workdir that existed before keeps its run id and lock file, as they were).
            if fresh:
                _remove_fresh_workdir(workdir)
            raise

    return held()


def _remove_fresh_workdir(workdir) -> None:
    """Remove what the lease and the run id put into a workdir this run created, and the
    workdir itself if nothing else is in it."""
    for name in ("run_id", "LEASE.lock"):
        try:
            (workdir / name).unlink()
        except (FileNotFoundError, OSError):
            pass
    try:
        if not any(workdir.iterdir()):
            workdir.rmdir()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    code = run(sys.argv[1:] if argv is None else argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: Grain workers and async checkpoint threads can hang it.
    os._exit(code)


if __name__ == "__main__":
    main()
