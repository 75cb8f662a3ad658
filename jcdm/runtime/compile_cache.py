"""A persistent compilation cache, so a restarted run loads its programs instead of recompiling
them (system code; configured by `jcdm.main` before anything is compiled).

Where: `compile_cache.directory` (gin), else `$JAX_COMPILATION_CACHE_DIR`, else
`<workdir>/compile_cache`. The default lives with the run, so it survives a recreated spot VM
when the workdir is a bucket, and every process of a multi-host job sees the same directory:
JAX writes entries from process 0 only, so a directory that is not shared (a local path on each
host) is only ever hit by process 0. Entries are keyed by the program, the JAX/XLA version, the
XLA flags, the compile options and the devices, so a changed configuration or upgrade misses
rather than loads a wrong program; a broken entry is a warning and a recompile, not an error.

Multi-process CPU (the local cluster of `jcdm.dev.launch_local`): JAX 0.10.2 hashes the devices
through the CPU client's topology, which describes only the calling process's own devices
(process 1 sees ids 2048.., process 0 ids 0..), so the keys differed between processes and
process 1 never hit an entry (measured with the cache key's debug log: every component equal but
`accelerator_config`). `_share_cpu_keys` hashes the global device list instead (the same on every
process) plus the host's CPU flags (an XLA:CPU executable is compiled for the host's
instruction set, so machines with other CPUs must not share entries).
"""

from __future__ import annotations

import hashlib
import logging
import os

import gin
import jax

log = logging.getLogger(__name__)

_patched = False


@gin.configurable(module="jcdm", denylist=["workdir"])
def compile_cache(
    *,
    workdir: str,
    enabled: bool = True,
    directory: str | None = None,
    min_compile_time_s: float | None = None,
) -> str | None:
    """Turn the persistent compilation cache on (or off); returns its directory or None.

    `min_compile_time_s`: programs that compile faster are not stored (default: JAX's, 1 s, or
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS).
    """
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("persistent compilation cache: off")
        return None
    path = (
        directory
        or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or os.path.join(workdir, "compile_cache")
    )
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if min_compile_time_s is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    _share_cpu_keys()
    log.info("persistent compilation cache: %s", path)
    return path


def _share_cpu_keys() -> None:
    """Make every process of a multi-process CPU job compute the same cache key (see above)."""
    global _patched
    if _patched:
        return
    from jax._src import cache_key

    original = cache_key._hash_accelerator_config

    def hash_devices(hash_obj, accelerators) -> None:
        devices = list(accelerators.flat)
        if not devices or any(d.platform != "cpu" for d in devices):
            return original(hash_obj, accelerators)
        for d in devices:
            hash_obj.update(f"{d.platform}|{d.device_kind}|{d.id}|{d.process_index};".encode())
        hash_obj.update(_cpu_flags().encode())

    cache_key._hash_accelerator_config = hash_devices
    _patched = True


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()
