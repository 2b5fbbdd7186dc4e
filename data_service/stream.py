"""Ray Data streaming of multi-view batches to training workers, with an exact data position.

Plan (pure, no Ray): for epoch e the train keys are permuted with seed (train.seed, e); a
micro-step of W ranks takes the epoch's next W*B keys (rank r the r-th B), and an epoch tail
shorter than W*B is counted and skipped. The data position is a count of samples, saved with each
checkpoint: a resumed run, with the same or another number of workers, continues at the next
sample and neither repeats nor skips one, and every rank gets the same number of batches (no
collective hangs).

Execution (Ray Data, per worker): the rank's ordered rows ``(key, shard, offsets)`` go through
``map_batches`` on a task pool (at most ``data.loader_actors`` tasks in flight x
``data.loader_cpus_per_actor`` CPUs) that reads each sample by byte offset, decodes it, makes the
TMA views and tokenizes the report; ``preserve_order`` keeps the plan's order. Corrupt samples
come back flagged, are counted and skipped by the loop.
Why chunks of ``data.loader_chunk`` micro-steps, one Ray Data execution each: Ray Data 2.60's
streaming executor loops without sleeping while it is backpressured with no task in flight (its
``ray.wait`` only runs when tasks are active). A loader faster than the trainer is backpressured
most of the time, so one execution for the whole run spins a core inside every training worker
and takes the GIL from its loop: on the 2-core machine, trainer throughput halved
(benchmarks/RESULTS.md, "Loader spin"). A chunk's execution fits in the object store budget, runs
to its end and stops. The next chunk's execution starts ``LEAD`` batches before the current chunk
ends, in a thread that takes its first batch, so its start-up overlaps training. Tasks, not
actors: a task pool reuses warm worker processes, while an actor pool would start new actors for
every chunk.
Why not ``streaming_split``: it hands blocks to whichever consumer asks first, so which rank
trains on which sample is not reproducible and an exact resume cannot be proven (docs/design.md).
"""
from __future__ import annotations

import functools
import json
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common import storage
from common.text import encode_reports
from data_service.config import DataConfig
from data_service.shards import MASK_MEMBERS, CorruptSample, decode_sample, split_shards
from data_service.views import N_PARAMS, MultiViewCrop, prepare_sample, seed_for


def build_index(shards_dir: str | Path, split: str = "train") -> dict[str, dict[str, Any]]:
    """key -> {shard, members: {name: [offset, size]}} from the tar headers (no data read; on an
    object store, ranged reads of the headers)."""
    index: dict[str, dict[str, Any]] = {}
    for path in split_shards(shards_dir, split):
        with storage.open_input(path) as f, tarfile.open(fileobj=f) as tf:
            for m in tf.getmembers():
                key, _, member = m.name.partition(".")
                entry = index.setdefault(key, {"shard": str(path), "members": {}})
                entry["members"][member] = [m.offset_data, m.size]
    return index


@dataclass
class Plan:
    """The exact data order, as a position in samples.

    Epoch e is the permutation of the sorted train keys seeded by (seed, e); the data position is
    ``e * n + offset``. A micro-step of a world of W ranks takes the next ``W * batch`` keys of the
    epoch, rank r the r-th ``batch`` of them; when fewer than ``W * batch`` are left in the epoch,
    they are unused (counted) and the step starts the next epoch. The position after each step is
    saved with a checkpoint, so a run resumed with another number of workers continues at the same
    sample: nothing is repeated or skipped (but the tail of the epoch it is in, which depends on W).
    """
    keys: list[str]           # sorted train keys
    batch: int                # per rank and micro-step
    seed: int

    def steps_per_epoch(self, world: int) -> int:
        n = len(self.keys) // (world * self.batch)
        if n == 0:
            raise ValueError(f"{len(self.keys)} train samples < one global batch "
                             f"({world} workers x {self.batch}); lower train.batch_size")
        return n

    def unused_per_epoch(self, world: int) -> int:
        return len(self.keys) - self.steps_per_epoch(world) * world * self.batch

    def epoch_order(self, epoch: int) -> list[str]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.keys))
        return [self.keys[i] for i in perm]

    def steps(self, world: int, position: int, n_micro: int) -> list[tuple[int, list[str]]]:
        """``n_micro`` global micro-steps from ``position``: (position after it, keys in rank order)."""
        n, gb = len(self.keys), world * self.batch
        self.steps_per_epoch(world)                       # raises when one global batch does not fit
        out, orders, pos = [], {}, position
        for _ in range(n_micro):
            epoch, off = divmod(pos, n)
            if off + gb > n:
                epoch, off = epoch + 1, 0
            if epoch not in orders:
                orders = {epoch: self.epoch_order(epoch)}
            pos = epoch * n + off + gb
            out.append((pos, orders[epoch][off:off + gb]))
        return out

    def rank_keys(self, rank: int, world: int, position: int, first_micro: int,
                  n_micro: int) -> list[tuple[int, str, int]]:
        """(global micro-step, key, position after that micro-step) for this rank."""
        return [(first_micro + i, k, after)
                for i, (after, keys) in enumerate(self.steps(world, position, n_micro))
                for k in keys[rank * self.batch:(rank + 1) * self.batch]]

    def position_of(self, micro: int, world: int) -> int:
        """The position after ``micro`` micro-steps at a fixed world (checkpoints written before
        positions were saved)."""
        spe = self.steps_per_epoch(world)
        epoch, s = divmod(micro, spe)
        return epoch * len(self.keys) + s * world * self.batch


class DecodeCrop:
    """Decode and crop: rows of (micro, key, shard, members) -> int16 image and views, their float
    augmentation parameters, and the tokenized (sampled) report (data_service.views)."""

    def __init__(self, data: DataConfig, tokenizer_dir: str, seed: int, text_unit: str = "report"):
        from common.text import load_tokenizer

        self.data, self.seed, self.text_unit = data, seed, text_unit
        self.tok = load_tokenizer(tokenizer_dir)
        self.crop = MultiViewCrop(data.views)
        self.cache = storage.FileCache(data.cache_dir, data.cache_mb) if data.cache_dir else None

    def _read(self, shard: str, members: dict[str, list[int]], key: str) -> dict[str, Any]:
        """The sample's members by byte range: from the shard itself (a local file, or ranged GETs on
        an object store: nothing copied), or from its copy in ``data.cache_dir``."""
        raw: dict[str, Any] = {"__key__": key}
        if self.cache is not None and storage.is_remote(shard):
            shard = str(self.cache.get(shard))
        with storage.open_input(shard) as f:
            for name, (off, size) in members.items():
                if name in MASK_MEMBERS:                   # training never reads the organ mask
                    continue
                raw[name] = f.read_at(size, off)
                if len(raw[name]) != size:
                    raise CorruptSample(f"sample {key!r}: member '{name}' truncated in {shard}")
        return raw

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        d, v = self.data, self.data.views
        n = len(batch["key"])
        image = np.empty((n, 1, *d.size), np.int16)            # every row is written below (zeros if it failed)
        if v.on_device:                                        # the trainer cuts: boxes and shifts only
            cut = {"boxes": np.zeros((n, v.n, 6), np.int32), "shift": np.zeros((n, 3), np.int32)}
        else:
            cut = {"views": np.empty((n, v.n, 1, *v.size), np.int16)}
        params = np.zeros((n, 1 + v.n, N_PARAMS), np.float64)
        reports, errors = [], []
        ok = np.ones(n, np.int8)
        for i in range(n):
            key, micro = str(batch["key"][i]), int(batch["micro"][i])
            try:
                raw = self._read(str(batch["shard"][i]), json.loads(batch["members"][i]), key)
                # on_device ships the volume as stored: decoded straight into the batch
                s = decode_sample(raw, ct_out=image[i, 0] if v.on_device else None)
                p = prepare_sample(s, d, seed_for(self.seed, micro, key), self.crop)
                if not np.may_share_memory(p["image"], image[i]):
                    image[i] = p["image"]
                params[i] = p["params"]
                for k, a in cut.items():
                    a[i] = p[k]
                reports.append(p["report"])
                errors.append("")
            except (CorruptSample, OSError, ValueError) as e:
                ok[i] = 0
                image[i] = 0
                for a in cut.values():
                    a[i] = 0
                reports.append("")
                errors.append(str(e)[:500])
        neg = self.text_unit == "sentence" and d.augment.negated_sentences
        enc = encode_reports(self.tok, reports, self.text_unit, d.max_text_tokens, d.max_sentences,
                             d.max_sentence_tokens, pad_to_max=True, return_tensors="np", negations=neg)
        extra = {k: enc[k].astype(np.int64) for k in ("neg_input_ids", "neg_attention_mask") if k in enc}
        return {**extra, "key": batch["key"], "micro": batch["micro"], "position": batch["position"] if "position" in batch else np.full(n, -1), "ok": ok, "error": np.array(errors, dtype=object),
                "image": image, **cut, "params": params, "input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64)}


def loader_rows(index: dict[str, dict[str, Any]], triples) -> list[dict[str, Any]]:
    """(micro-step, key, data position after it) triples -> the rows ``DecodeCrop`` reads: where each
    sample's members lie in its shard (``build_index``)."""
    return [{"micro": m, "position": pos, "key": k, "shard": index[k]["shard"],
             "members": json.dumps(index[k]["members"])} for m, k, pos in triples]


def loader_batch(index: dict[str, dict[str, Any]], triples) -> dict[str, np.ndarray]:
    """The same rows as one column batch, as Ray Data hands them to ``DecodeCrop``: for callers that
    decode in their own process (benchmarks, tests)."""
    rows = loader_rows(index, triples)
    return {name: np.array([r[name] for r in rows]) for name in rows[0]}


def rank_stream(index: dict[str, dict[str, Any]], plan: Plan, rank: int, world: int, position: int,
                first_micro: int, n_micro: int, data: DataConfig, tokenizer_dir: str,
                text_unit: str = "report") -> Iterator[dict[str, Any]]:
    """Yields one batch dict per micro-step, in plan order (Ray Data task pools underneath, one
    execution per ``data.loader_chunk`` micro-steps); each carries ``micro`` and ``position`` (the
    data position after it)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    rows = loader_rows(index, plan.rank_keys(rank, world, position, first_micro, n_micro))
    if not rows:
        return
    per = plan.batch * data.loader_chunk
    chunks = [rows[i:i + per] for i in range(0, len(rows), per)]

    def execution(part: list[dict[str, Any]]) -> "_Started":
        ds = ray.data.from_items(part, override_num_blocks=len(part) // plan.batch)
        ds = ds.map_batches(decode_crop, batch_size=plan.batch, num_cpus=data.loader_cpus_per_actor,
                            compute=ray.data.TaskPoolStrategy(size=data.loader_actors),
                            fn_kwargs={"data": data, "tokenizer_dir": tokenizer_dir, "seed": plan.seed,
                                       "text_unit": text_unit})
        return _Started(iter(ds.iter_batches(batch_size=plan.batch, batch_format="numpy", prefetch_batches=2)))

    announce, current, upcoming = ctx.print_on_execution_start, execution(chunks[0]), None
    try:
        for i, part in enumerate(chunks):
            n = len(part) // plan.batch
            for j, b in enumerate(current.batches()):
                if j == max(0, n - 1 - LEAD) and i + 1 < len(chunks):
                    ctx.print_on_execution_start = False  # the plan is printed once, not per chunk
                    upcoming = execution(chunks[i + 1])   # starts while this chunk's last batches train
                yield b
            current, upcoming = upcoming, None
    finally:
        ctx.print_on_execution_start = announce
        for s in (current, upcoming):
            if s is not None:
                s.close()


LEAD = 2        # batches before a chunk's end at which the next chunk's execution starts


class _Started(threading.Thread):
    """A Ray Data batch iterator whose execution starts now, in the background: its first batch is
    taken in this thread (Ray Data starts an execution at the first ``next``), so a chunk's
    start-up overlaps the previous chunk's last training steps; the rest is iterated by the
    caller. Its executor finishes the chunk and stops before the trainer catches up (module doc)."""

    def __init__(self, it: Iterator[dict[str, Any]]):
        super().__init__(daemon=True, name="rank-stream-chunk")
        self.it, self.first, self.error = it, None, None
        self.start()

    def run(self) -> None:
        try:
            self.first = next(self.it, None)              # None: an empty execution
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer by batches()
            self.error = e

    def batches(self) -> Iterator[dict[str, Any]]:
        self.join()
        if self.error is not None:
            raise self.error
        if self.first is None:
            return
        first, self.first = self.first, None
        yield first
        yield from self.it

    def close(self) -> None:
        self.join()
        getattr(self.it, "close", lambda: None)()


class _ByRepr:
    """``obj`` hashed and compared by its repr (a config dataclass is not hashable)."""

    def __init__(self, obj):
        self.obj, self.key = obj, repr(obj)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ByRepr) and other.key == self.key


@functools.lru_cache(maxsize=4)
def _decoder(data: _ByRepr, tokenizer_dir: str, seed: int, text_unit: str) -> "DecodeCrop":
    return DecodeCrop(data.obj, tokenizer_dir, seed, text_unit)


def decode_crop(batch: dict[str, np.ndarray], data: DataConfig, tokenizer_dir: str, seed: int,
                text_unit: str = "report") -> dict[str, Any]:
    """Ray Data task: ``DecodeCrop`` on one batch, built once per worker process and configuration
    (the task pool reuses processes across chunks, so a tokenizer is loaded once per process, not
    per batch; the last 4 configurations are kept, for sweeps whose trials share processes)."""
    return _decoder(_ByRepr(data), tokenizer_dir, seed, text_unit)(batch)
