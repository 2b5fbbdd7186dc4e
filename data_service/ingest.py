"""Ingest a dataset into webdataset shards on the canonical grid.

    python -m data_service.ingest --source ctrate|inspect|bimcvr|folder --input DIR --out SHARDS
        [--config configs/debug.yaml] [--set data.shard_size=16] [--engine local|ray] [--workers N]

The plan is deterministic: studies sorted by (split, id) and cut into shards of
``data.shard_size``. Each shard is one task (a process locally, or a Ray Data ``map`` over the
shard plan on a cluster: the same function). A shard is written to a temp file and renamed, then
its sidecar ``{shard}.json`` (sha256, keys, rejects). A re-run skips shards whose sidecar matches
the tar on disk, so a crashed run finishes only the missing shards. Memory is bounded by one
volume per worker plus one shard's compressed samples.
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

from common.config import add_config_args, load_config
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
    return sh.encode_sample(study.id, c.hu, study.report, meta, c.mask)


def process_shard(spec: dict[str, Any], data: DataConfig, out_dir: str) -> dict[str, Any]:
    """Write one shard + sidecar; return the sidecar. Top-level so processes/Ray can run it."""
    out = Path(out_dir)
    samples, rejects = [], []
    for sd in spec["studies"]:
        study = Study(**sd)
        try:
            samples.append(process_study(study, data))
        except Reject as r:
            rejects.append({"id": study.id, "split": study.split, "reason": r.reason, "detail": r.detail,
                            "image": study.image if isinstance(study.image, str) else str(study.image[0])})
        except MemoryError as e:
            rejects.append({"id": study.id, "split": study.split, "reason": "preprocess_error",
                            "detail": f"MemoryError: {e}", "image": str(study.image)})
    info = sh.write_shard(out / spec["name"], samples)
    side = {**info, "split": spec["split"], "n_in": len(spec["studies"]),
            "keys": [s["__key__"] for s in samples], "rejects": rejects, "plan": spec["plan_hash"]}
    tmp = out / (spec["name"] + ".json.tmp")
    tmp.write_text(json.dumps(side))
    tmp.replace(out / (spec["name"] + ".json"))
    return side


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


def _done(spec: dict[str, Any], out: Path) -> dict[str, Any] | None:
    side_p, tar_p = out / (spec["name"] + ".json"), out / spec["name"]
    if not (side_p.is_file() and tar_p.is_file()):
        return None
    try:
        side = json.loads(side_p.read_text())
    except json.JSONDecodeError:
        return None
    if side.get("plan") != spec["plan_hash"] or side.get("bytes") != tar_p.stat().st_size:
        return None
    if sh.sha256_file(tar_p) != side.get("sha256"):
        return None
    return side


def run(source: str, input_dir: str, out_dir: str, data: DataConfig, engine: str = "local",
        workers: int = 0, progress: bool = True) -> dict[str, Any]:
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies, early = discover(source, input_dir, data.test_fraction_of_valid)
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
        sides += _run_ray(todo, data, str(out))
    elif todo:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s["studies"]) for s in todo), unit="vol", disable=not progress,
                   desc="ingest", file=sys.stdout)
        if n_workers == 1:
            for spec in todo:
                sides.append(process_shard(spec, data, str(out)))
                bar.update(len(spec["studies"]))
        else:
            # spawn, not fork: forking a process whose torch/OpenMP threads already ran deadlocks
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(n_workers, len(todo)), mp_context=ctx) as pool:
                futs = {pool.submit(process_shard, s, data, str(out)): s for s in todo}
                for f in as_completed(futs):
                    sides.append(f.result())
                    bar.update(len(futs[f]["studies"]))
        bar.close()
    for side in sides:
        rejects += side["rejects"]
    sides.sort(key=lambda s: s["path"])
    written = sum(s["n"] for s in sides)
    if n_in != written + len(rejects):
        raise RuntimeError(f"ingest counts do not add up: in={n_in} written={written} rejected={len(rejects)}")
    rejects.sort(key=lambda r: str(r["id"]))
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    by_split = Counter()
    for s in sides:
        by_split[s["split"]] += s["n"]
    manifest = {
        "schema_version": sh.SCHEMA_VERSION, "source": source, "input": str(Path(input_dir).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": {"in": n_in, "written": written, "rejected": len(rejects),
                   "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
                   "written_by_split": dict(by_split)},
        "shards": [{k: s[k] for k in ("path", "split", "n", "sha256", "bytes")} for s in sides],
        "config": dataclasses.asdict(data), "seconds": round(time.time() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _run_ray(todo, data, out):
    """The same shard function as a Ray Data job (one row per shard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False)
    ds = ray.data.from_items([{"spec": json.dumps(s)} for s in todo])
    ds = ds.map(lambda row: {"side": json.dumps(process_shard(json.loads(row["spec"]), data, out))},
                num_cpus=1)
    return [json.loads(r["side"]) for r in ds.take_all()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_service.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=["ctrate", "inspect", "bimcvr", "folder"])
    p.add_argument("--input", required=True, help="dataset folder in the source's layout")
    p.add_argument("--out", required=True, help="output folder for shards, manifest, rejects")
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=0, help="processes (local engine); 0 = config/cores")
    p.add_argument("--no-progress", action="store_true")
    add_config_args(p)
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    man = run(a.source, a.input, a.out, cfg.data, a.engine, a.workers, not a.no_progress)
    c = man["counts"]
    print(f"ingest: in={c['in']} written={c['written']} rejected={c['rejected']} "
          f"{c['rejected_by_reason']} splits={c['written_by_split']} -> {a.out} ({man['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
