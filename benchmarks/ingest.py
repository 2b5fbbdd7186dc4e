"""Ingest throughput and peak memory: our ingest vs a plain MONAI dictionary pipeline.

    python -m benchmarks.ingest [--config configs/t3d.yaml] [--n 24] [--workers 2]

Same phantom NIfTI inputs, same worker count, one run. Each side runs in its own subprocess so
peak RSS is its own (main process and the largest worker). The MONAI baseline is
LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRanged -> Resized
in a DataLoader; it only produces arrays in memory, while ours also reads the CT-RATE metadata,
pads/crops at fixed spacing, compresses and writes shards, manifest and rejects ledger.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> dict[str, float]:
    return {"main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_ours(raw: str, workers: int, cfg_path: str) -> dict:
    from common.config import load_config
    from data_service import ingest

    cfg = load_config(cfg_path)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        man = ingest.run("ctrate", raw, out, cfg.data, workers=workers, progress=False)
        dt = time.perf_counter() - t
    return {"volumes": man["counts"]["written"], "seconds": dt, **_rss_mb()}


def run_monai(raw: str, workers: int, cfg_path: str) -> dict:
    import torch
    from monai.data import DataLoader, Dataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Resized,
        ScaleIntensityRanged,
        Spacingd,
    )

    from common.config import load_config

    cfg = load_config(cfg_path).data
    files = [{"image": str(p)} for p in sorted(Path(raw).glob("*/*/*/*.nii.gz")) if "segmentations" not in str(p)]
    tf = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
                  Spacingd("image", pixdim=cfg.spacing, mode="bilinear"),
                  ScaleIntensityRanged("image", a_min=cfg.hu_window[0], a_max=cfg.hu_window[1], b_min=0.0, b_max=1.0, clip=True),
                  Resized("image", spatial_size=cfg.size)])
    dl = DataLoader(Dataset(files, tf), batch_size=1, num_workers=workers,
                    multiprocessing_context="spawn" if workers else None)
    t = time.perf_counter()
    n = 0
    for b in dl:
        n += int(b["image"].shape[0])
        assert torch.isfinite(b["image"]).all()
    return {"volumes": n, "seconds": time.perf_counter() - t, **_rss_mb()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/debug.yaml"))
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--one", choices=["ours", "monai"], help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        r = (run_ours if a.one == "ours" else run_monai)(a.raw, a.workers, a.config)
        print("RESULT " + json.dumps(r))
        return 0
    from data_service import synth

    with tempfile.TemporaryDirectory() as d:
        synth.generate(Path(d) / "raw", a.n, seed=0, workers=2)
        res = {}
        for side in ("ours", "monai"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.ingest", "--one", side, "--raw", str(Path(d) / "raw"),
                                  "--workers", str(a.workers), "--config", a.config], capture_output=True, text=True,
                                 check=True)
            res[side] = json.loads(out.stdout.split("RESULT ", 1)[1])
    for side, r in res.items():
        r["vol_per_s"] = r["volumes"] / r["seconds"]
        print(f"{side:6s} {r['volumes']} volumes in {r['seconds']:.1f} s = {r['vol_per_s']:.2f} vol/s "
              f"({r['vol_per_s'] / a.workers:.2f} per core, {a.workers} workers); peak RSS main {r['main_mb']:.0f} MB, "
              f"largest worker {r['worker_mb']:.0f} MB")
    print(f"ingest, {Path(a.config).name}: ratio x{res['ours']['vol_per_s'] / res['monai']['vol_per_s']:.2f} "
          f"(ours / MONAI throughput), worker peak RSS x{res['ours']['worker_mb'] / res['monai']['worker_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
