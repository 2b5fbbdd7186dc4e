"""Shard codec for int16 CT volumes, chosen by measurement: size and single-core encode/decode speed.

    python -m benchmarks.codec [--config configs/t3d.yaml] [--n 4]

Phantom volumes on the config's canonical grid (paper grid by default: 256 x 256 x 128 int16,
16 MiB raw). Every codec runs on one thread (blosc2 too), so MB/s is per core. Baseline: what the
shards of schema 1 use, ``np.savez_compressed`` (zlib). Printed: MiB per volume, size vs raw,
encode and decode MB/s of raw data, volumes decoded per second per core, ratio vs npz.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def volumes(cfg_path: Path, n: int) -> list[np.ndarray]:
    from common.config import load_config
    from data_service import synth
    from data_service.preprocess import load_canonical
    from data_service.sources import discover

    cfg = load_config(cfg_path)
    with tempfile.TemporaryDirectory() as d:
        synth.generate(Path(d) / "raw", n, seed=0, valid_fraction=0.0, workers=2)
        studies, _ = discover("ctrate", Path(d) / "raw")      # the importer's reader args (rescale, spacing)
        return [load_canonical(st.image, cfg.data, st.read_kw).hu for st in studies[:n]]


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codec")
    p.add_argument("--config", default=str(REPO / "configs/t3d.yaml"))
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    import blosc2

    from data_service.shards import CODECS, decode_array, encode_array

    blosc2.set_nthreads(1)
    vols = volumes(Path(a.config), a.n)
    raw_mb = vols[0].nbytes / 2**20
    print(f"{len(vols)} volumes {vols[0].shape} int16 ({raw_mb:.1f} MiB raw each), one thread")
    rows = {}
    for name in CODECS:
        blobs = [encode_array(v, name) for v in vols]
        assert all(np.array_equal(decode_array(b, name, v.shape, v.dtype), v) for b, v in zip(blobs, vols))
        enc = np.mean([timed(lambda v=v: encode_array(v, name), a.reps) for v in vols])
        dec = np.mean([timed(lambda b=b, v=v: decode_array(b, name, v.shape, v.dtype), a.reps)
                       for b, v in zip(blobs, vols)])
        rows[name] = (np.mean([len(b) for b in blobs]) / 2**20, enc, dec)
    base = rows["npz"][2]
    print(f"{'codec':22s} {'MiB/vol':>8s} {'vs raw':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s} {'dec vol/s':>10s} "
          f"{'dec vs npz':>11s}")
    for name, (mb, enc, dec) in rows.items():
        print(f"{name:22s} {mb:8.2f} {mb / raw_mb:7.3f} {raw_mb / enc:9.0f} {raw_mb / dec:9.0f} {1 / dec:10.1f} "
              f"{'x%.2f' % (base / dec):>11s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
