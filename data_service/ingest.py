"""Ingest a dataset into webdataset shards on the canonical grid.

    python -m data_service.ingest --source ctrate|inspect|bimcvr|folder --input DIR --out SHARDS
        [--config configs/debug.yaml] [--set data.shard_size=16] [--engine local|ray] [--workers N]

The plan is deterministic: studies sorted by (split, id) and cut into shards of
``data.shard_size``. Each shard is one task (a process locally, or a Ray task on a cluster: the
same function). A shard is written to a temp file and renamed, then its sidecar ``{shard}.json``
(sha256, keys, rejects). A re-run skips shards whose sidecar matches the tar on disk, so a crashed
run finishes only the missing shards.
Bounded: a header claiming more than ``data.max_voxels`` (or more memory than a worker has) is
rejected unread (``too_large``); every worker caps its own memory (``data.worker_memory_mb``), so
what slips through fails that study; a worker that dies anyway has its shard retried once, then
each of its studies alone, and a study whose worker dies again is rejected (``worker_crashed``).
Outputs: shards, ``manifest.json`` (counts, shard list, checksums, config), ``rejects.jsonl``.
Counts must add up: in = written + rejected, or the run fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from common import storage
from common.config import add_config_args, parse_config_cli
from data_service import shards as sh
from data_service.config import DataConfig
from data_service.io import Reject
from data_service.preprocess import load_canonical
from data_service.sources import Study, discover


def process_study(study: Study, data: DataConfig) -> dict[str, Any]:
    """Study -> encoded sample. Raises Reject."""
    c = load_canonical(study.image, data, study.read_kw, study.mask)
    meta = {"id": study.id, "patient_id": study.patient_id, "split": study.split, "source": study.source,
            "labels": study.labels, "spacing": list(data.spacing), "size": list(c.hu.shape),
            "orientation": data.orientation, "affine": np.round(c.affine, 5).tolist(),
            "has_mask": c.mask is not None, "geometry": c.geometry, "study": study.meta,
            "read": {k: list(v) if isinstance(v, tuple) else v for k, v in study.read_kw.items()}}
    return sh.encode_sample(study.id, c.hu, study.report, meta, c.mask, data.codec)


def _reject(study: Study, reason: str, detail: str) -> dict[str, Any]:
    return {"id": study.id, "split": study.split, "reason": reason, "detail": detail,
            "image": study.image if isinstance(study.image, str) else str(study.image[0])}


def encode_one(sd: dict[str, Any], data: DataConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(sample, None) or (None, reject) for one study; never raises for a bad input."""
    study = Study(**sd)
    try:
        return process_study(study, data), None
    except Reject as r:
        return None, _reject(study, r.reason, r.detail)
    except MemoryError as e:
        return None, _reject(study, "too_large", f"{study.image}: out of memory (data.worker_memory_mb="
                                                 f"{data.worker_memory_mb}): {e}")
    except Exception as e:  # noqa: BLE001 - an unforeseen failure on one input is that input's reject
        return None, _reject(study, "preprocess_error", f"{study.image}: {type(e).__name__}: {e}")


def process_shard(spec: dict[str, Any], data: DataConfig, out_dir: str,
                  encoded: list[tuple[dict | None, dict | None]] | None = None, encode=encode_one) -> dict[str, Any]:
    """Write one shard + sidecar; return the sidecar. Top-level so processes/Ray can run it.
    ``encoded``: the studies' results when they were made elsewhere (isolated, one process each);
    ``encode``: the per-study function (tests replace it to kill a worker)."""
    results = encoded if encoded is not None else [encode(sd, data) for sd in spec["studies"]]
    samples = [smp for smp, _ in results if smp is not None]
    rejects = [rej for _, rej in results if rej is not None]
    info = sh.write_shard(storage.join(out_dir, spec["name"]), samples)
    side = {**info, "split": spec["split"], "n_in": len(spec["studies"]),
            "keys": [s["__key__"] for s in samples], "rejects": rejects, "plan": spec["plan_hash"]}
    storage.write_text(storage.join(out_dir, spec["name"] + ".json"), json.dumps(side))   # atomic, after the tar
    return side


def limit_memory(mb: int) -> None:
    """Cap this process's data segment (heap and anonymous mmaps) at ``mb`` MiB: an allocation past
    it raises MemoryError in this worker (one study fails), instead of the kernel killing a process."""
    if mb > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (mb * 2**20, mb * 2**20))


def _pool(n: int, data: DataConfig) -> ProcessPoolExecutor:
    # spawn, not fork: forking a process whose torch/OpenMP threads already ran deadlocks
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=limit_memory, initargs=(data.worker_memory_mb,))


def _run_local(todo: list[dict], data: DataConfig, out: str, n_workers: int, bar, encode=encode_one) -> list[dict]:
    """Shards in a process pool. A worker that dies (killed for memory, crashed) breaks the pool:
    its shards are retried once in a new pool; a shard that fails again has each of its studies
    run in a process of its own, and a study whose process dies is rejected (worker_crashed)."""
    from concurrent.futures.process import BrokenProcessPool

    sides, tries, pending, isolate = [], {s["name"]: 0 for s in todo}, list(todo), []
    while pending:
        with _pool(min(n_workers, len(pending)), data) as pool:
            futs = {pool.submit(process_shard, s, data, out, None, encode): s for s in pending}
            pending = []
            for f in as_completed(futs):
                spec = futs[f]
                try:
                    sides.append(f.result())
                    bar.update(len(spec["studies"]))
                except BrokenProcessPool:
                    tries[spec["name"]] += 1
                    (pending if tries[spec["name"]] == 1 else isolate).append(spec)
        if pending:
            print(f"ingest: a worker died; retrying {len(pending)} shard(s) once", flush=True)
    for spec in isolate:
        print(f"ingest: {spec['name']} failed twice; running its studies one process each", flush=True)
        results = []
        for sd in spec["studies"]:
            try:
                with _pool(1, data) as one:
                    results.append(one.submit(encode, sd, data).result())
            except BrokenProcessPool:
                results.append((None, _reject(Study(**sd), "worker_crashed", f"{sd['image']}: the worker process "
                                              "died on this study, twice (killed for memory, or a crash in a reader)")))
        sides.append(process_shard(spec, data, out, results))
        bar.update(len(spec["studies"]))
    return sides


def plan_shards(studies: list[Study], shard_size: int) -> list[dict[str, Any]]:
    import hashlib

    specs = []
    by_split: dict[str, list[Study]] = {}
    for s in sorted(studies, key=lambda s: (s.split, s.id)):
        by_split.setdefault(s.split, []).append(s)
    for split, group in by_split.items():
        for i in range(0, len(group), shard_size):
            chunk = [dataclasses.asdict(s) for s in group[i: i + shard_size]]
            h = hashlib.sha256(json.dumps(chunk, sort_keys=True, default=str).encode()).hexdigest()[:16]
            specs.append({"name": f"{split}-{i // shard_size:06d}.tar", "split": split,
                          "studies": chunk, "plan_hash": h})
    return specs


def _done(spec: dict[str, Any], out: str) -> dict[str, Any] | None:
    side_p, tar_p = storage.join(out, spec["name"] + ".json"), storage.join(out, spec["name"])
    if not (storage.isfile(side_p) and storage.isfile(tar_p)):
        return None
    try:
        side = json.loads(storage.read_text(side_p))
    except json.JSONDecodeError:
        return None
    if side.get("plan") != spec["plan_hash"] or side.get("bytes") != storage.size(tar_p):
        return None
    if storage.sha256(tar_p) != side.get("sha256"):
        return None
    return side


def run(source: str, input_dir: str, out_dir: str, data: DataConfig, engine: str = "local",
        workers: int = 0, progress: bool = True, encode=encode_one) -> dict[str, Any]:
    """Ingest ``input_dir`` (layout ``source``) into ``out_dir``; returns the manifest. ``encode``:
    the per-study function of the local engine (tests replace it to kill a worker)."""
    t0 = time.time()
    out = storage.normalize(out_dir)
    storage.check(out, write=True)          # a bad bucket, key or endpoint fails here, naming the URI
    studies, early = discover(source, input_dir, data.test_fraction_of_valid, data.text_fallback_encoding)
    n_in = len(studies) + len(early)
    keys = Counter(sh.safe_key(s.id) for s in studies)
    dup = {k for k, n in keys.items() if n > 1}
    rejects = [{"id": i, "split": None, "reason": r, "detail": d} for i, r, d in early]
    if dup:
        rejects += [{"id": s.id, "split": s.split, "reason": "duplicate_id",
                     "detail": f"{s.image}: id maps to shard key {sh.safe_key(s.id)!r} used by another study"}
                    for s in studies if sh.safe_key(s.id) in dup]
        studies = [s for s in studies if sh.safe_key(s.id) not in dup]
    specs = plan_shards(studies, data.shard_size)
    sides, todo = [], []
    for spec in specs:
        done = _done(spec, out)
        (sides.append(done) if done else todo.append(spec))
    n_workers = workers or data.workers or os.cpu_count() or 1
    print(f"ingest: {n_in} studies found ({len(rejects)} rejected by the importer); "
          f"{len(specs)} shards planned, {len(sides)} already done, {len(todo)} to write; "
          f"engine={engine}, workers={n_workers}", flush=True)
    if todo and engine == "ray":
        sides += _run_ray(todo, data, out)
    elif todo:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s["studies"]) for s in todo), unit="vol", disable=not progress,
                   desc="ingest", file=sys.stdout)
        sides += _run_local(todo, data, out, n_workers, bar, encode)
        bar.close()
    for side in sides:
        rejects += side["rejects"]
    sides.sort(key=lambda s: s["path"])
    written = sum(s["n"] for s in sides)
    if n_in != written + len(rejects):
        raise RuntimeError(f"ingest counts do not add up: in={n_in} written={written} rejected={len(rejects)}")
    rejects.sort(key=lambda r: str(r["id"]))
    storage.write_text(storage.join(out, "rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects))
    by_split = Counter()
    for s in sides:
        by_split[s["split"]] += s["n"]
    manifest = {
        "schema_version": sh.SCHEMA_VERSION, "codec": data.codec, "source": source, "input": str(Path(input_dir).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"in": n_in, "written": written, "rejected": len(rejects),
                   "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
                   "written_by_split": dict(by_split)},
        "shards": [{k: s[k] for k in ("path", "split", "n", "sha256", "bytes")} for s in sides],
        "config": dataclasses.asdict(data), "seconds": round(time.time() - t0, 2),
    }
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


def _run_ray(todo, data, out):
    """The same shard function as Ray tasks (one per shard), each capping its worker's memory. A
    task whose worker dies is retried once by Ray; then its studies run one task each, and a study
    whose worker dies again is rejected (worker_crashed)."""
    import ray
    from ray.exceptions import RayError

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False)

    def capped(fn, *args):
        limit_memory(data.worker_memory_mb)
        return fn(*args)

    task = ray.remote(num_cpus=1, max_retries=1)(capped)
    refs = {task.remote(process_shard, s, data, out): s for s in todo}
    sides = []
    for ref, spec in refs.items():
        try:
            sides.append(ray.get(ref))
        except RayError:
            one = ray.remote(num_cpus=1, max_retries=0)(capped)
            results = []
            for sd in spec["studies"]:
                try:
                    results.append(ray.get(one.remote(encode_one, sd, data)))
                except RayError as e:
                    results.append((None, _reject(Study(**sd), "worker_crashed",
                                                  f"{sd['image']}: the Ray worker died on this study: {str(e)[:200]}")))
            sides.append(process_shard(spec, data, out, results))
    return sides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_service.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=["ctrate", "inspect", "bimcvr", "folder"])
    p.add_argument("--input", required=True, help="dataset folder in the source's layout")
    p.add_argument("--out", required=True, help="output folder or URI (s3://bucket/prefix) for shards, manifest, rejects")
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=0, help="processes (local engine); 0 = config/cores")
    p.add_argument("--no-progress", action="store_true")
    add_config_args(p)
    a, cfg = parse_config_cli(p, argv)
    try:
        man = run(a.source, a.input, a.out, cfg.data, a.engine, a.workers, not a.no_progress)
    except FileNotFoundError as e:          # an --input that is not there: its message names it
        raise SystemExit(f"ingest: {e}") from e
    c = man["counts"]
    print(f"ingest: in={c['in']} written={c['written']} rejected={c['rejected']} "
          f"{c['rejected_by_reason']} splits={c['written_by_split']} -> {a.out} ({man['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
