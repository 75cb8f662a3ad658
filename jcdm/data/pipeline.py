"""The training input pipeline: a deterministic global stream of images, cut into process batches.

Definition (what every process, worker count and restart must agree on):

* The *stream* is the concatenation of per-epoch orders of the N records. Epoch e's order is a
  permutation seeded by (seed, e): a uniform global shuffle ("global", iCT), or the order a
  1,000-image shuffle buffer produces from storage order ("buffer", the reference project).
* Global batch t is stream positions [t*G, (t+1)*G). Process p of n receives rows
  [p*L, (p+1)*L) of it, L = G / n, so concatenating the processes' batches gives exactly the
  one-process batch.
* Position s is flipped horizontally iff a keyed hash of (seed, s) says so: the same image at
  the same step gets the same flip on any host or worker.

Each Grain element is one whole local batch, built with vectorised NumPy (read records, decode,
flip, scale to [-1, 1]); that keeps per-image Python work out of the hot path. Grain supplies
thread prefetching and, with `worker_count > 0`, worker processes that build batches in parallel
and hand them over in order. The iterator's state is the next global batch index plus the
settings that define the stream, so it resumes exactly and with any worker count.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import gin
import grain
import numpy as np

from jcdm.data.fingerprint import identify
from jcdm.data.sources import mix64, open_source
from jcdm.data.spec import DataError

SHUFFLE_MODES = ("global", "buffer")
STATE_VERSION = 1
# Settings that describe, but do not define, the stream: never compared on restore.
_NOT_COMPARED = ("process_index", "process_count", "dataset")
_FLIP_TAG = 0xF11B
_SHUFFLE_TAG = 0x5F1E


def _seed_key(seed: int, tag: int) -> int:
    """A 64-bit key derived from (seed, tag); distinct uses of one seed get unrelated keys."""
    return int(np.random.SeedSequence([seed, tag]).generate_state(1, np.uint64)[0])


def buffer_shuffle_order(
    num_records: int, buffer_size: int, rng: np.random.Generator
) -> np.ndarray:
    """The order a shuffle buffer of `buffer_size` emits records 0..N-1 read in storage order.

    Like `tf.data.Dataset.shuffle`: fill the buffer, then repeatedly emit a uniformly chosen slot
    and refill it with the next record; once the input is exhausted, drain the buffer randomly.
    Output k is always one of the records [0, k + buffer_size), so mixing is only local.
    """
    buffer = list(range(min(buffer_size, num_records)))
    next_record = len(buffer)
    draws = rng.random(num_records)
    order = np.empty(num_records, np.int64)
    for k in range(num_records):
        slot = int(draws[k] * len(buffer))
        order[k] = buffer[slot]
        if next_record < num_records:
            buffer[slot] = next_record
            next_record += 1
        else:
            buffer[slot] = buffer[-1]
            buffer.pop()
    return order


class StreamOrder:
    """Maps global stream positions to record indices, caching the two most recent epochs."""

    def __init__(self, num_records: int, seed: int, shuffle: str, buffer_size: int) -> None:
        self.num_records = num_records
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self._cache: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Workers rebuild the permutations they need rather than receiving them pickled.
        return {**self.__dict__, "_cache": {}}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Record indices of epoch `epoch`, a permutation of range(N) seeded by (seed, epoch)."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch, _SHUFFLE_TAG])
            if self.shuffle == "global":
                order = rng.permutation(self.num_records)
            else:
                order = buffer_shuffle_order(self.num_records, self.buffer_size, rng)
            if len(self._cache) >= 2:
                del self._cache[min(self._cache)]
            self._cache[epoch] = order
        return self._cache[epoch]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Record index at each stream position."""
        epochs, offsets = np.divmod(positions, self.num_records)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self.epoch_order(int(epoch))[offsets[mask]]
        return out


class LocalBatches:
    """Random-access source of this process's batches; element t is its share of global batch t.

    Infinite (length `sys.maxsize`): epochs follow each other inside the stream. Top-level and
    holding only picklable state, so Grain can ship it to spawned worker processes.
    """

    def __init__(
        self,
        source: Any,
        order: StreamOrder,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        flip_key: int | None,
        with_labels: bool,
        with_record_index: bool,
    ) -> None:
        self.source = source
        self.order = order
        self.local_batch_size = global_batch_size // process_count
        self.offset = process_index * self.local_batch_size
        self.global_batch_size = global_batch_size
        self.flip_key = flip_key
        self.with_labels = with_labels
        self.with_record_index = with_record_index
        h, w, c = source.spec.shape
        # Flipping = gathering each flattened image through this column order; much faster than
        # copying a reversed, 3-byte-strided view.
        self._flip_columns = np.arange(h * w * c).reshape(h, w, c)[:, ::-1].reshape(-1)

    def __len__(self) -> int:
        return sys.maxsize

    def positions(self, step: int) -> np.ndarray:
        """Global stream positions of this process's rows of global batch `step`."""
        start = step * self.global_batch_size + self.offset
        return np.arange(start, start + self.local_batch_size, dtype=np.int64)

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        positions = self.positions(int(step))
        indices = self.order(positions)
        images, labels = self.source.read_batch(indices)
        if self.flip_key is not None:
            flip = np.flatnonzero(mix64(positions, self.flip_key) >> np.uint64(63))
            rows = images.reshape(len(images), -1).copy()
            rows[flip] = np.take(rows[flip], self._flip_columns, axis=1)
            images = rows.reshape(images.shape)
        # Division (not multiplication by 1/127.5) keeps 0 -> -1 and 255 -> 1 exact in float32.
        batch = {"image": images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)}
        if self.with_labels:
            batch["label"] = np.asarray(labels, np.int32)
        if self.with_record_index:
            batch["record_index"] = indices
        return batch


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """Run in each worker process: a Ctrl-C in a terminal (or a closed terminal's SIGHUP) reaches
    the whole process group, and the trainer, not its data workers, decides how to stop (it still
    needs batches to reach the step it saves at); Grain ends the workers when the trainer exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _ensure_absl_flags_parsed() -> None:
    """Grain reads absl flags when it starts worker processes; unparsed flags make it raise.

    Programs started with `absl.app.run` have parsed them already; others (argparse, pytest)
    get the defaults, which is what they would have had anyway.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator(grain.DatasetIterator):
    """Endless iterator over this process's batches, resumable with `get_state`/`set_state`.

    A `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` and
    `CheckpointRestore(it)` store it in Orbax checkpoints. Call `close()` when done to stop the
    worker processes.

    Attributes:
      spec: the `ImageSpec` of the dataset (image shape, records per epoch).
      batches: the underlying `LocalBatches` (stream positions, record order).
    """

    def __init__(
        self,
        batches: LocalBatches,
        *,
        worker_count: int,
        read_options: grain.ReadOptions,
        worker_buffer_size: int,
        settings: dict[str, Any],
    ) -> None:
        super().__init__()
        self.batches = batches
        self.spec = batches.source.spec
        self._dataset = grain.MapDataset.source(batches)
        self._worker_count = worker_count
        self._read_options = read_options
        self._worker_buffer_size = worker_buffer_size
        self._settings = settings
        self._next_batch = 0
        self._inner: grain.DatasetIterator | None = None

    def _start(self) -> grain.DatasetIterator:
        if self._inner is None:
            ds = self._dataset[self._next_batch :] if self._next_batch else self._dataset
            ds = ds.to_iter_dataset(self._read_options)
            if self._worker_count > 0:
                _ensure_absl_flags_parsed()
                options = grain.MultiprocessingOptions(
                    num_workers=self._worker_count,
                    per_worker_buffer_size=self._worker_buffer_size,
                )
                ds = ds.mp_prefetch(options, worker_init_fn=_ignore_interrupts)
            self._inner = iter(ds)
        return self._inner

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._start())
        self._next_batch += 1
        if self._worker_count > 0:
            # Worker batches live in shared memory that Grain frees behind our back on close;
            # a private copy stays valid for as long as the caller keeps it.
            batch = {k: np.array(v) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the next global batch index and the settings that define the stream."""
        return {"version": STATE_VERSION, "next_batch": self._next_batch, **self._settings}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state` (from `get_state` of an iterator with the same stream settings).

        The process count and worker count may differ from the saving run: the state names a
        global batch, and each process takes its own rows of it.

        Raises:
          DataError: the state is from another format or a stream with different settings.
        """
        if state.get("version") != STATE_VERSION or "next_batch" not in state:
            raise DataError(
                f"data iterator state {state!r} was not written by this pipeline (expected "
                f"version {STATE_VERSION} with 'next_batch')"
            )
        self._check_same_dataset(state)
        changed = {
            k: (state.get(k), v)
            for k, v in self._settings.items()
            if k not in _NOT_COMPARED
            # States saved before datasets had fingerprints cannot be checked for it.
            and not (k == "dataset_fingerprint" and k not in state)
            and state.get(k) != v
        }
        if changed:
            details = ", ".join(
                f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in changed.items()
            )
            raise DataError(
                f"the checkpointed data stream differs from this run's ({details}); resuming "
                "would not continue the same sequence of batches. Restore with the original "
                "data settings, or start a new run in a fresh workdir."
            )
        self._stop_reading()
        self._next_batch = int(state["next_batch"])

    def _check_same_dataset(self, state: dict[str, Any]) -> None:
        saved = state.get("dataset_fingerprint")
        if saved is None or saved == self._settings["dataset_fingerprint"]:
            return
        raise DataError(
            "this run reads another dataset than the checkpoint was trained on: the checkpoint "
            f"read {state.get('dataset', '(not recorded)')} (fingerprint {saved}); this run "
            f"reads {self._settings['dataset']} (fingerprint "
            f"{self._settings['dataset_fingerprint']}). Resume with the checkpoint's dataset "
            "(make_train_iterator.dataset / DATA_DIR in <workdir>/config.gin), or start a new "
            "run in a fresh workdir to train on this one."
        )

    def start_prefetch(self) -> None:
        """Starts reading (and the worker processes) before the first `next`."""
        self._start().start_prefetch()

    def _stop_reading(self) -> None:
        """Stops prefetching; the next `next` starts it again from the current position."""
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        """Releases the worker processes and buffers; the iterator cannot be used afterwards."""
        self._stop_reading()
        super().close()


@gin.configurable(module="jcdm.data")
def make_train_iterator(
    *,
    dataset: str = gin.REQUIRED,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    image_size: int | None = None,
    random_flip: bool = True,
    worker_count: int = 0,
    shuffle: str = "global",
    shuffle_buffer_size: int = 1000,
    read_threads: int = 2,
    prefetch_batches: int = 4,
    worker_buffer_size: int = 2,
    verify_checksums: bool | None = None,
    with_labels: bool = False,
    with_record_index: bool = False,
) -> TrainIterator:
    """Endless iterator of `{"image": float32 [G / process_count, H, W, C] in [-1, 1]}` batches.

    See the module docstring for the exact stream definition; it does not depend on
    `process_count` or `worker_count`.

    Args:
      dataset: "synthetic[:HxWxC[:N]]", "digits", or a directory from tools/prepare_cifar10.py.
      global_batch_size: G, images per step over all processes; divisible by `process_count`.
      seed: non-negative; fixes every epoch's order and every flip.
      process_index: this process's index p in [0, process_count).
      process_count: number of processes sharing each global batch.
      image_size: square size for synthetic/digits; for directories None or the stored size.
      random_flip: flip half the images horizontally.
      worker_count: Grain worker processes building batches (0: in this process, with threads).
      shuffle: "global" (uniform permutation per epoch, iCT) or "buffer" (the reference
        project's shuffle buffer over storage order).
      shuffle_buffer_size: buffer size for shuffle="buffer".
      read_threads: threads per process that build batches ahead of use.
      prefetch_batches: batches each process buffers ahead.
      worker_buffer_size: batches each worker process buffers ahead.
      verify_checksums: hash every shard before starting (None: only datasets up to 2 GiB).
      with_labels: also yield "label" int32 [L] (-1 for unlabeled data).
      with_record_index: also yield "record_index" int64 [L] (tests and debugging).

    Raises:
      DataError: invalid settings or dataset, before any batch is read.
    """
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index {process_index} is not in [0, process_count={process_count})"
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(
            f"global_batch_size {global_batch_size} must be positive and divisible by "
            f"process_count {process_count}"
        )
    if shuffle not in SHUFFLE_MODES:
        raise DataError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
    if shuffle == "buffer" and shuffle_buffer_size <= 0:
        raise DataError(f"shuffle_buffer_size must be positive, got {shuffle_buffer_size}")
    if seed < 0 or worker_count < 0 or read_threads < 0 or prefetch_batches < 0:
        raise DataError("seed, worker_count, read_threads and prefetch_batches must be >= 0")
    source = open_source(dataset, image_size=image_size, verify_checksums=verify_checksums)
    spec = source.spec
    order = StreamOrder(spec.num_records, seed, shuffle, shuffle_buffer_size)
    batches = LocalBatches(
        source,
        order,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        flip_key=_seed_key(seed, _FLIP_TAG) if random_flip else None,
        with_labels=with_labels,
        with_record_index=with_record_index,
    )
    fingerprint, described = identify(dataset, source)
    settings = {
        "dataset": described,
        "dataset_fingerprint": fingerprint,
        "seed": seed,
        "global_batch_size": global_batch_size,
        "num_records": spec.num_records,
        "image_shape": list(spec.shape),
        "shuffle": shuffle if shuffle == "global" else f"buffer:{shuffle_buffer_size}",
        "random_flip": random_flip,
        "process_index": process_index,
        "process_count": process_count,
    }
    return TrainIterator(
        batches,
        worker_count=worker_count,
        read_options=grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=prefetch_batches
        ),
        worker_buffer_size=max(1, worker_buffer_size),
        settings=settings,
    )
