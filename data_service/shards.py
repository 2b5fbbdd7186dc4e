"""THE sample schema of our webdataset shards: one writer, one decoder, used everywhere.

A sample is a group of tar members sharing a key:
    {key}.ct.npz       int16 HU on the canonical grid, np.savez_compressed(hu=...)
    {key}.mask.npz     optional uint8 organ labels on the same grid (segmentation)
    {key}.report.txt   UTF-8 report text
    {key}.meta.json    id, patient_id, split, source, labels (18 CT-RATE names -> 0/1, or null),
                       affine, spacing, size, source geometry, ingest details
Shards are ``{split}-{index:06d}.tar`` in one folder with ``manifest.json`` and ``rejects.jsonl``.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

SCHEMA_VERSION = 1
MEMBERS = ("ct.npz", "report.txt", "meta.json")


class CorruptSample(ValueError):
    """A sample in a shard could not be decoded; the message names the key and member."""


def safe_key(study_id: str) -> str:
    """webdataset splits keys at the first dot: keep ids dot-free and path-free."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", study_id)


def encode_sample(study_id: str, hu: np.ndarray, report: str, meta: dict[str, Any],
                  mask: np.ndarray | None = None) -> dict[str, Any]:
    if hu.dtype != np.int16 or hu.ndim != 3:
        raise ValueError(f"{study_id}: ct must be a 3D int16 array, got {hu.dtype} {hu.shape}")
    buf = io.BytesIO()
    np.savez_compressed(buf, hu=hu)
    sample = {"__key__": safe_key(study_id), "ct.npz": buf.getvalue(),
              "report.txt": report.encode("utf-8"),
              "meta.json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    if mask is not None:
        mbuf = io.BytesIO()
        np.savez_compressed(mbuf, mask=mask.astype(np.uint8))
        sample["mask.npz"] = mbuf.getvalue()
    return sample


def decode_sample(raw: dict[str, Any], decode_ct: bool = True) -> dict[str, Any]:
    """Raw member bytes (as webdataset / Ray Data give them) -> sample dict.
    Raises CorruptSample naming the key and the member that failed."""
    key = raw.get("__key__", "?")
    for m in MEMBERS:
        if raw.get(m) is None:
            raise CorruptSample(f"sample {key!r}: member '{m}' is missing")
    try:
        meta = json.loads(bytes(raw["meta.json"]).decode("utf-8"))
        report = bytes(raw["report.txt"]).decode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSample(f"sample {key!r}: meta/report not decodable: {e}") from e
    out = {"key": key, "meta": meta, "report": report}
    if decode_ct:
        out["ct"] = _load_npz(raw["ct.npz"], "hu", key, "ct.npz")
        if tuple(out["ct"].shape) != tuple(meta.get("size", out["ct"].shape)):
            raise CorruptSample(f"sample {key!r}: ct shape {out['ct'].shape} != meta size {meta.get('size')}")
        if raw.get("mask.npz") is not None:
            out["mask"] = _load_npz(raw["mask.npz"], "mask", key, "mask.npz")
    return out


def _load_npz(data: Any, name: str, key: str, member: str) -> np.ndarray:
    try:
        with np.load(io.BytesIO(bytes(data))) as z:
            return z[name]
    except Exception as e:
        raise CorruptSample(f"sample {key!r}: member '{member}' is corrupt: {type(e).__name__}: {e}") from e


def write_shard(path: str | Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Write samples atomically (tmp file, then rename); return {path, n, sha256, bytes}."""
    import webdataset as wds

    path = Path(path)
    tmp = path.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as w:  # fixed mtime: same input, same bytes
        for s in samples:
            w.write(s)
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    tmp.replace(path)
    return {"path": path.name, "n": len(samples), "sha256": digest, "bytes": size}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_raw(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, in file order (webdataset's tar grouping)."""
    import webdataset as wds

    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    for s in ds:
        yield {k: v for k, v in s.items() if k != "__url__"}


def load_manifest(shards_dir: str | Path) -> dict[str, Any]:
    p = Path(shards_dir) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no manifest.json; run `python -m data_service.ingest` first")
    return json.loads(p.read_text())


def split_shards(shards_dir: str | Path, split: str) -> list[Path]:
    """Shard paths of one split, from the manifest; clear error if the split is absent."""
    man = load_manifest(shards_dir)
    paths = [Path(shards_dir) / s["path"] for s in man["shards"] if s["split"] == split and s["n"] > 0]
    if not paths:
        have = sorted({s["split"] for s in man["shards"] if s["n"] > 0})
        raise ValueError(f"{shards_dir}: split {split!r} has no samples (splits present: {have})")
    return paths


def iter_split(shards_dir: str | Path, split: str, decode_ct: bool = True,
               on_corrupt=None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one split. Corrupt samples go to ``on_corrupt(key, error)`` (or raise)."""
    for path in split_shards(shards_dir, split):
        for raw in iter_raw(path):
            try:
                yield decode_sample(raw, decode_ct=decode_ct)
            except CorruptSample as e:
                if on_corrupt is None:
                    raise
                on_corrupt(raw.get("__key__", "?"), e)
