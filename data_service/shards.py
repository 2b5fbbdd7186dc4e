"""THE sample schema of our webdataset shards: one writer, one decoder, used everywhere.

A sample is a group of tar members sharing a key (schema 2):
    {key}.ct.bin       int16 HU on the canonical grid (meta "size"), compressed with meta "codec"
    {key}.mask.bin     optional uint8 organ labels on the same grid (segmentation), same codec
    {key}.report.txt   UTF-8 report text
    {key}.meta.json    id, patient_id, split, source, labels (18 CT-RATE names -> 0/1, or null),
                       affine, spacing, size, codec, source geometry, ingest details
Schema 1 shards (``ct.npz`` / ``mask.npz``, np.savez_compressed) still read. The codec is chosen by
measurement (``benchmarks/codec.py``, ``data.codec``); ``manifest.json`` names it.
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

SCHEMA_VERSION = 2
MEMBERS = ("report.txt", "meta.json")
MASK_MEMBERS = ("mask.bin", "mask.npz")     # the organ mask (schema 2, schema 1): evaluation reads it, training not
CODECS = ("npz", "zstd", "zstd-shuffle", "blosc2-lz4", "blosc2-zstd")
"""Array codecs: ``npz`` (zlib, schema 1's), ``zstd`` (level 3), ``zstd-shuffle`` (bytes of each
int16 split into two planes first), ``blosc2-lz4`` / ``blosc2-zstd`` (blosc2 with its shuffle filter)."""


def encode_array(a: np.ndarray, codec: str) -> bytes:
    if codec == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, a=a)
        return buf.getvalue()
    if codec in ("zstd", "zstd-shuffle"):
        import zstandard

        data = a.tobytes() if codec == "zstd" else _shuffle(a)
        return zstandard.ZstdCompressor(level=3).compress(data)
    if codec in ("blosc2-lz4", "blosc2-zstd"):
        import blosc2

        c = blosc2.Codec.LZ4 if codec == "blosc2-lz4" else blosc2.Codec.ZSTD
        # one thread: with several, blosc2 lays blocks out in completion order and the same volume
        # gives other bytes (shards must be byte-deterministic: resume compares checksums)
        return blosc2.compress2(np.ascontiguousarray(a), codec=c, clevel=5 if codec == "blosc2-lz4" else 3,
                                filters=[blosc2.Filter.SHUFFLE], typesize=a.dtype.itemsize, nthreads=1)
    raise ValueError(f"codec {codec!r} is not one of {list(CODECS)}")


def decode_array(data: bytes, codec: str, shape, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Bytes -> an array of ``shape`` / ``dtype``; raises ValueError when they do not fit. ``out``
    (C-contiguous, that shape and dtype): decoded into it (blosc2 writes there directly, with no
    array of its own)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if out is not None and (out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.flags.c_contiguous):
        raise ValueError(f"out: expected a C-contiguous {dtype} array of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if codec in ("blosc2-lz4", "blosc2-zstd"):
        import blosc2

        buf = bytes(data)
        size = blosc2.get_cbuffer_sizes(buf)[0]
        if size != n:                                # a header claiming another size is not read
            raise ValueError(f"blosc2 chunk holds {size} bytes, {n} expected")
        dst = np.empty(tuple(shape), dtype) if out is None else out
        blosc2.decompress2(buf, dst=dst)
        return dst
    if out is not None:
        out[...] = decode_array(data, codec, shape, dtype)
        return out
    if codec == "npz":
        with np.load(io.BytesIO(bytes(data))) as z:
            out = z[z.files[0]]
    elif codec in ("zstd", "zstd-shuffle"):
        import zstandard

        size = zstandard.frame_content_size(bytes(data))
        if size not in (-1, n):                      # a frame claiming another size is not read
            raise ValueError(f"zstd frame holds {size} bytes, {n} expected")
        raw = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=n)
        if len(raw) != n:
            raise ValueError(f"{len(raw)} bytes decoded, {n} expected")
        out = np.frombuffer(raw, dtype) if codec == "zstd" else _unshuffle(raw, dtype)
    else:
        raise ValueError(f"codec {codec!r} is not one of {list(CODECS)}")
    return out.reshape(tuple(shape)) if out.size == int(np.prod(shape)) else _shape_error(out, shape)


def _shape_error(out, shape):
    raise ValueError(f"decoded shape {out.shape} does not fit {tuple(shape)}")


def _shuffle(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T).tobytes()


def _unshuffle(raw: bytes, dtype: np.dtype) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(b.T).view(dtype).ravel()


class CorruptSample(ValueError):
    """A sample in a shard could not be decoded; the message names the key and member."""


def safe_key(study_id: str) -> str:
    """webdataset splits keys at the first dot: keep ids dot-free and path-free."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", study_id)


def encode_sample(study_id: str, hu: np.ndarray, report: str, meta: dict[str, Any],
                  mask: np.ndarray | None = None, codec: str = "npz") -> dict[str, Any]:
    if hu.dtype != np.int16 or hu.ndim != 3:
        raise ValueError(f"{study_id}: ct must be a 3D int16 array, got {hu.dtype} {hu.shape}")
    meta = {**meta, "codec": codec, "size": list(hu.shape)}
    sample = {"__key__": safe_key(study_id), "ct.bin": encode_array(hu, codec),
              "report.txt": report.encode("utf-8"),
              "meta.json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    if mask is not None:
        sample["mask.bin"] = encode_array(mask.astype(np.uint8), codec)
    return sample


def decode_sample(raw: dict[str, Any], decode_ct: bool = True, ct_out: np.ndarray | None = None) -> dict[str, Any]:
    """Raw member bytes (as webdataset / Ray Data give them) -> sample dict; ``ct_out``: the array
    to decode the volume into (``decode_array``'s ``out``). Raises CorruptSample naming the key and
    the member that failed."""
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
        v1 = raw.get("ct.bin") is None                       # schema 1: npz members
        ct_member, mask_member = ("ct.npz", MASK_MEMBERS[1]) if v1 else ("ct.bin", MASK_MEMBERS[0])
        codec = "npz" if v1 else meta.get("codec")
        if raw.get(ct_member) is None:
            raise CorruptSample(f"sample {key!r}: member 'ct.bin' (or schema 1's 'ct.npz') is missing")
        if "size" not in meta and not v1:
            raise CorruptSample(f"sample {key!r}: meta.json has no 'size'")
        size = meta.get("size")
        if ct_out is not None and size is not None and tuple(size) != tuple(ct_out.shape):
            raise CorruptSample(f"sample {key!r}: ct size {tuple(size)} is not the grid read into, {tuple(ct_out.shape)}")
        out["ct"] = _decode(raw[ct_member], codec, size, np.int16, key, ct_member, ct_out if size else None)
        if size is not None and tuple(out["ct"].shape) != tuple(size):
            raise CorruptSample(f"sample {key!r}: ct shape {out['ct'].shape} != meta size {size}")
        if raw.get(mask_member) is not None:
            out["mask"] = _decode(raw[mask_member], codec, size, np.uint8, key, mask_member)
    return out


def _decode(data: Any, codec: str | None, shape, dtype, key: str, member: str, out=None) -> np.ndarray:
    try:
        if codec == "npz" and shape is None:
            with np.load(io.BytesIO(bytes(data))) as z:
                return z[z.files[0]]
        return decode_array(data, codec, shape, dtype, out)
    except Exception as e:  # noqa: BLE001 - any decoder failure is this sample's corruption
        raise CorruptSample(f"sample {key!r}: member '{member}' is corrupt: {type(e).__name__}: {e}") from e


class _Hashing:
    """A write-only stream that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def write_shard(path: str | Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Write samples atomically (``common.storage.output``: local or object store); return
    {path (its name), n, sha256, bytes}."""
    import webdataset as wds

    from common import storage

    with storage.output(path) as out:
        hashed = _Hashing(out)
        w = wds.TarWriter(hashed, mtime=0.0)  # fixed mtime: same input, same bytes
        for s in samples:
            w.write(s)
        w.close()
    return {"path": storage.name(path), "n": len(samples), "sha256": hashed.h.hexdigest(), "bytes": hashed.n}


def iter_raw(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, in file order (webdataset's tar grouping), streamed from local
    disk or an object store (``common.storage``)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from common import storage

    fs, p = storage.filesystem(path)
    # one shard, read whole by this process: no node or worker splitting (it would refuse to run
    # inside an initialized torch.distributed group, as in a training worker)
    with fs.open_input_stream(p) as f:
        for s in group_by_keys({**m, "__url__": str(path)} for m in tar_file_iterator(f)):
            yield {k: v for k, v in s.items() if k != "__url__"}


def load_manifest(shards_dir: str | Path) -> dict[str, Any]:
    from common import storage

    p = storage.join(shards_dir, "manifest.json")
    if not storage.isfile(p):
        raise FileNotFoundError(f"{p}: no manifest.json; run `python -m data_service.ingest` first")
    return json.loads(storage.read_text(p))


def split_shards(shards_dir: str | Path, split: str) -> list[str]:
    """Shard paths (local paths or URIs) of one split, from the manifest; clear error if the split is absent."""
    from common import storage

    man = load_manifest(shards_dir)
    paths = [storage.join(shards_dir, s["path"]) for s in man["shards"] if s["split"] == split and s["n"] > 0]
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
