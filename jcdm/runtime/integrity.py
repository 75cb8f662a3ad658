"""What is restored is what was saved: a checkpoint's hash manifest, and whether a state fits.

Every checkpoint carries a `hashes` item (JSON, written by process 0 as part of the Orbax save,
so it is committed together with the arrays): for each array of the state its dtype, shape and
a 64-bit hash of its values, and a SHA-256 of the `data` and `meta` items. A restore hashes the
values it got back and compares; any difference is handled like an unreadable checkpoint.

The array hash is a sum, modulo 2**64, of one mixed 64-bit word per element, computed from the
element's flat index in the global array and its raw bits (`element_word`). A sum does not
depend on how the array is cut into shards: each process hashes only the shards it owns
(replica 0 of each), on the host, from the same values Orbax writes, and the partial sums add up
to the same number whatever the mesh or process count, at save and at restore alike. So no
process ever gathers a whole array (an FSDP state may not fit one host), saving and restoring
on different meshes verify against each other, and `tools/inspect_checkpoint.py` checks a
checkpoint from full numpy arrays with the same function. One changed element changes the sum
unless two 64-bit mixes collide (probability 2**-64); this detects corruption, it does not
authenticate against someone who can also rewrite the manifest.

Processes other than 0 hand their partial sums to process 0 through the coordination service's
key-value store, not a device collective: a background save runs in its own thread, and
collectives from two threads may be ordered differently on different hosts.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

log = logging.getLogger(__name__)

ITEM = "hashes"  # the Orbax item (a directory of the step) holding the manifest
ALGORITHM = "jcdm-element-mix64-sum-v1"
_MASK = (1 << 64) - 1
_CHUNK = 1 << 16  # elements hashed per NumPy pass: fits the cache, ~2 GB/s on one CPU core
_SEED = np.uint64(0x6A09E667F3BCC908)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_KV_TIMEOUT_MS = 10 * 60 * 1000  # process 0 waits this long for another process's sums


# --- Array hashes ---------------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _word_sum(index: np.ndarray, bits: np.ndarray, wide: bool) -> int:
    """Sum of the mixed words of elements with these flat indices and raw bits."""
    b = bits.astype(np.uint64)
    if wide:  # 8-byte values (or arrays of 2**32 elements or more): mix the index first
        x = _mix(index * _GOLDEN + _SEED)
        x ^= b
    else:  # index and value side by side in one word: injective, one mix
        x = (index << np.uint64(32)) | b
        x += _SEED
    return int(_mix(x).sum(dtype=np.uint64))


def _block_sum(bits: np.ndarray, base: int, strides: tuple[int, ...], wide: bool) -> int:
    """Hash sum of a C-contiguous block whose element [0, ..., 0] sits at flat index `base` of
    an array with element `strides`; visits the block in cache-sized chunks."""
    if bits.ndim == 0 or bits.size <= _CHUNK:
        index = np.full((), base, np.uint64)
        for axis, (n, stride) in enumerate(zip(bits.shape, strides, strict=True)):
            shape = [1] * bits.ndim
            shape[axis] = n
            index = index + (np.arange(n, dtype=np.uint64) * np.uint64(stride)).reshape(shape)
        return _word_sum(np.broadcast_to(index, bits.shape).ravel(), bits.ravel(), wide)
    row = bits[0].size
    total = 0
    if row > _CHUNK:  # one leading index at a time, each split further
        for i in range(bits.shape[0]):
            total += _block_sum(bits[i], base + i * strides[0], strides[1:], wide)
    else:
        rows = max(1, _CHUNK // max(row, 1))
        for i in range(0, bits.shape[0], rows):
            total += _block_sum(bits[i : i + rows], base + i * strides[0], strides, wide)
    return total & _MASK


def element_word_sum(values: np.ndarray, start: tuple[int, ...], global_shape) -> int:
    """The hash contribution of `values`, the block of a `global_shape` array that starts at
    index `start` (all zeros for a whole array). Adding the contributions of disjoint blocks
    that cover the array gives the array's hash."""
    arr = np.ascontiguousarray(values).reshape(np.shape(values))  # keeps 0-d arrays 0-d
    if not arr.ndim == len(start) == len(global_shape):
        raise ValueError(f"a {arr.ndim}-d block at {start} of a {len(global_shape)}-d array")
    width = arr.dtype.itemsize
    if width not in (1, 2, 4, 8):
        raise TypeError(f"cannot hash {arr.dtype} values (item size {width})")
    bits = arr.view(f"<u{width}" if arr.dtype.byteorder != ">" else f">u{width}")
    strides = [1] * len(global_shape)
    for axis in range(len(global_shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * int(global_shape[axis + 1])
    base = sum(int(s) * st for s, st in zip(start, strides, strict=True))
    wide = width == 8 or int(np.prod(global_shape, dtype=np.int64)) >= 1 << 32
    return _block_sum(bits, base, tuple(strides), wide)


def path_name(path) -> str:
    """A key path as dotted names: a dataclass attribute, a dict key and a sequence index all
    become strings, so a TrainState and its stored metadata (nested dicts) name leaves alike."""

    def part(k) -> str:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return ".".join(part(k) for k in path)


def local_sums(tree, *, threads: int | None = None) -> dict[str, int]:
    """{leaf name: this process's share of its hash}. A `jax.Array` contributes the shards this
    process owns (replica 0 only, so every element is counted once over all processes); a NumPy
    array is a whole array held by this process alone.

    Blocks are hashed by `threads` threads (default: the host's cores, at most 16): NumPy
    releases the GIL inside each chunk's arithmetic. Each block reaches host memory only while
    it is hashed."""
    blocks = []  # (name, get host values, start, global shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_name(path)
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:
                    start = tuple(s.start or 0 for s in shard.index)
                    blocks.append((name, shard.data, start, leaf.shape))
        else:
            arr = np.asarray(leaf)
            blocks.append((name, arr, (0,) * arr.ndim, arr.shape))
    sums = {path_name(p): 0 for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def one(block) -> tuple[str, int]:
        name, values, start, shape = block
        return name, element_word_sum(np.asarray(jax.device_get(values)), start, shape)

    workers = threads or min(16, os.cpu_count() or 1)
    if workers > 1 and len(blocks) > 1:
        with concurrent.futures.ThreadPoolExecutor(workers, "jcdm-hash") as pool:
            results = list(pool.map(one, blocks))
    else:
        results = [one(b) for b in blocks]
    for name, value in results:
        sums[name] = (sums[name] + value) & _MASK
    return sums


def add_sums(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The sum of several processes' `local_sums`, per leaf."""
    out: dict[str, int] = {}
    for part in parts:
        for name, value in part.items():
            out[name] = (out.get(name, 0) + int(value)) & _MASK
    return out


def json_sha256(obj: Any) -> str:
    """SHA-256 of a JSON item's canonical text (sorted keys), as it is stored and read back."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --- The manifest ---------------------------------------------------------------------------------


def leaf_specs(tree) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{leaf name: (dtype name, shape)} of a state, abstract state or stored metadata tree."""
    return {
        path_name(p): (np.dtype(x.dtype).name, tuple(int(d) for d in x.shape))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def manifest(state, sums: Mapping[str, int], items: Mapping[str, Any]) -> dict:
    """The `hashes` item: per-array dtype, shape and hash; SHA-256 of each JSON item."""
    arrays = {
        name: {"dtype": dtype, "shape": list(shape), "hash": f"{sums[name]:016x}"}
        for name, (dtype, shape) in leaf_specs(state).items()
    }
    return {
        "algorithm": ALGORITHM,
        "arrays": arrays,
        "items": {name: json_sha256(value) for name, value in items.items()},
    }


def read_manifest(step_dir: epath.Path) -> dict | None:
    """The manifest of a checkpoint step directory, or None for one saved before manifests
    existed. Raises ValueError if it exists but is not a manifest (a damaged checkpoint)."""
    path = epath.Path(step_dir) / ITEM / "metadata"
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(found, dict) or found.get("algorithm") != ALGORITHM:
        raise ValueError(f"{path} is not a {ALGORITHM} manifest")
    if not isinstance(found.get("arrays"), dict) or not isinstance(found.get("items"), dict):
        raise ValueError(f"{path} lacks its 'arrays' or 'items'")
    return found


def compare(
    found: dict,
    specs: Mapping[str, tuple[str, tuple[int, ...]]],
    sums: Mapping[str, int],
    items: Mapping[str, Any],
) -> list[str]:
    """What differs between a manifest and the values restored ([] if nothing does).

    `specs` and `sums` describe the restored arrays; `items` the restored JSON items. An array
    restored in another dtype than the one saved (a cast on restore) cannot be compared and is
    skipped with a warning; everything else must match exactly.
    """
    problems = []
    stored = found["arrays"]
    for name in sorted(set(stored) ^ set(specs)):
        problems.append(f"{name} {'not restored' if name in stored else 'not in the manifest'}")
    for name in sorted(set(stored) & set(specs)):
        entry, (dtype, shape) = stored[name], specs[name]
        if not isinstance(entry, dict) or list(shape) != entry.get("shape"):
            problems.append(f"{name}: shape {list(shape)}, manifest {entry}")
        elif dtype != entry.get("dtype"):
            log.warning("%s restored as %s, saved as %s: not verified", name, dtype, entry["dtype"])
        elif f"{sums[name]:016x}" != entry.get("hash"):
            problems.append(f"{name}: hash {sums[name]:016x}, manifest {entry.get('hash')}")
    for name, value in items.items():
        if json_sha256(value) != found["items"].get(name):
            problems.append(f"item {name!r} differs from its SHA-256 in the manifest")
    return problems


def shapes_agree(step_dir: epath.Path, stored_tree) -> bool:
    """Whether a step's array metadata names the arrays and shapes its manifest does (True for
    steps saved without a manifest). Raises ValueError for an unreadable manifest."""
    found = read_manifest(step_dir)
    if found is None:
        return True
    listed = {name: entry.get("shape") for name, entry in found["arrays"].items()}
    return listed == {name: list(shape) for name, (_, shape) in leaf_specs(stored_tree).items()}


def verify_restored(step_dir: epath.Path, abstract_state, state, data: dict | None) -> list[str]:
    """What differs between a restored step and its manifest ([] if nothing, or if the step
    was saved without one, with a warning). `data`: the restored `data` item, or None if it was
    not restored (then only `meta` is checked beside the arrays).

    Every process must call it (the hashes are summed over all processes), with `state` None
    where its read failed; the answer then means nothing and is [].
    """
    names = sorted(leaf_specs(abstract_state))
    totals = sum_over_processes(local_sums(state) if state is not None else {}, names)
    if state is None:
        return []
    try:
        found = read_manifest(step_dir)
        meta = json.loads((epath.Path(step_dir) / "meta" / "metadata").read_text())
    except (OSError, ValueError) as e:  # JSON errors are ValueErrors
        return [f"{type(e).__name__}: {e}"]
    if found is None:
        log.warning(
            "checkpoint %s has no hash manifest (saved by an older version): restored without "
            "verification",
            step_dir,
        )
        return []
    items = {"meta": meta} if data is None else {"meta": meta, "data": data}
    return compare(found, leaf_specs(state), totals, items)


def set_aside(directory: epath.Path, steps: list[int], aside: epath.Path) -> None:
    """Move damaged checkpoint steps from `directory` into `aside` as `<step>-<time>` (process
    0; every process returns once they are moved). Where a directory cannot be renamed (some
    object stores), it is copied file by file and then removed: never only deleted."""
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            src, dst = epath.Path(directory) / str(step), aside / f"{step}-{stamp}"
            try:
                src.rename(dst)
            except Exception as e:
                log.warning("could not rename %s (%s); copying it to %s", src, e, dst)
                for f in src.rglob("*"):
                    if f.is_file():
                        target = dst / f.relative_to(src)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(f.read_bytes())
                src.rmtree()
            log.warning("moved damaged checkpoint %d to %s", step, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jcdm checkpoints set aside")


# --- Across processes -----------------------------------------------------------------------------


def gather_to_process_0(sums: dict[str, int], tag: str) -> dict[str, int] | None:
    """Process 0: every process's `sums` added up; other processes: None. Through the
    coordination service's key-value store, so a background thread may call it."""
    if jax.process_count() == 1:
        return dict(sums)
    from jax._src import distributed as _dist

    client = _dist.global_state.client
    prefix = f"jcdm/checkpoint_hashes/{tag}/"
    me = jax.process_index()
    client.key_value_set(prefix + str(me), json.dumps({k: str(v) for k, v in sums.items()}))
    if me != 0:
        return None
    parts = [sums]
    for p in range(1, jax.process_count()):
        text = client.blocking_key_value_get(prefix + str(p), _KV_TIMEOUT_MS)
        parts.append({k: int(v) for k, v in json.loads(text).items()})
    for p in range(jax.process_count()):
        try:
            client.key_value_delete(prefix + str(p))
        except Exception:  # a leftover key costs a few kB of the coordinator's memory
            pass
    return add_sums(parts)


def sum_over_processes(sums: dict[str, int], names: list[str]) -> dict[str, int]:
    """Every process's `sums` added up, on every process (a device collective: main thread
    only). Leaves missing from `sums` (a failed read) count as 0."""
    if jax.process_count() == 1:
        return {n: sums.get(n, 0) for n in names}
    from jax.experimental import multihost_utils

    # 64-bit values travel as two uint32 halves: without jax_enable_x64 a uint64 is truncated.
    words = np.asarray([sums.get(n, 0) for n in names], np.uint64)
    halves = np.stack([words & np.uint64(0xFFFFFFFF), words >> np.uint64(32)], -1)
    gathered = np.asarray(multihost_utils.process_allgather(halves.astype(np.uint32)))
    parts = [
        {n: int(lo) | (int(hi) << 32) for n, (lo, hi) in zip(names, proc.tolist(), strict=True)}
        for proc in gathered
    ]
    return add_sums(parts)


# --- Does a stored state fit the model? -----------------------------------------------------------


def describe_mismatch(stored_tree, abstract_state) -> str | None:
    """What differs between a stored state's metadata tree and `abstract_state` (parameter
    names and shapes; dtypes are cast on restore), or None if they fit."""
    stored = {k: s for k, (_, s) in leaf_specs(stored_tree).items()}
    wanted = {k: s for k, (_, s) in leaf_specs(abstract_state).items()}
    if stored == wanted:
        return None
    problems = [f"{p} missing" for p in sorted(set(wanted) - set(stored))]
    problems += [f"{p} not in this model" for p in sorted(set(stored) - set(wanted))]
    problems += [
        f"{p} stored {stored[p]}, model {wanted[p]}"
        for p in sorted(set(stored) & set(wanted))
        if stored[p] != wanted[p]
    ]
    more = f", and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more
