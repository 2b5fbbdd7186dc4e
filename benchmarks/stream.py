"""Multi-view batches/s delivered to a trainer, and trainer samples/s per ZeRO stage (CPU).

    python -m benchmarks.stream [--n 32] [--batches 24] [--skip-zero]

(1) Our path: ingested shards -> Ray Data actor pool (decode, views, tokenize) -> batches, vs
    a MONAI Dataset + DataLoader reading the raw NIfTI files and making the same views
    (LoadImaged, Orientationd, Spacingd, ResizeWithPadOrCropd, then our MultiViewCrop), with
    the same number of workers. One run, same cores; the ratio is printed.
(2) Trainer samples/s with 2 Ray Train workers at ZeRO 0/1/2/3 (debug flavour, short runs).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_ours(shards: str, cfg, tok_dir: str, batches: int) -> float:
    from data_service.stream import Plan, build_index, rank_stream

    index = build_index(shards, "train")
    plan = Plan(sorted(index), 1, cfg.train.batch_size, 0)
    it = rank_stream(index, plan, 0, 0, batches + 2, cfg.data, tok_dir)
    next(it), next(it)                                     # warm-up: actor start
    t, n = time.perf_counter(), 0
    for b in it:
        n += 1
        assert b["views"].shape[1] == cfg.data.views.n
    return n / (time.perf_counter() - t)


def bench_monai(raw: str, cfg, batches: int, workers: int) -> float:
    from monai.data import DataLoader, Dataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    from data_service.views import MultiViewCropd

    files = [{"image": str(p), "seed": i} for i, p in
             enumerate(sorted(Path(raw).glob("train/*/*/*.nii.gz")))]
    tf = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
                  Spacingd("image", pixdim=cfg.data.spacing), ScaleIntensityRanged("image", -1000, 1000, 0, 1, clip=True),
                  ResizeWithPadOrCropd("image", cfg.data.size), MultiViewCropd(cfg.data.views)])
    reps = (batches + 2) * cfg.train.batch_size // len(files) + 1
    dl = DataLoader(Dataset(files * reps, tf), batch_size=cfg.train.batch_size, num_workers=workers,
                    multiprocessing_context="spawn")
    it = iter(dl)
    next(it), next(it)
    t = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        assert b["views"].shape[1] == cfg.data.views.n
    return batches / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--skip-zero", action="store_true")
    a = p.parse_args(argv)
    import ray

    from common.config import load_config
    from common.text import build_tokenizer
    from data_service import ingest, synth
    from data_service.shards import iter_split

    cfg = load_config(REPO / "configs/debug.yaml", ["data.loader_actors=2", "data.loader_cpus_per_actor=1"])
    with tempfile.TemporaryDirectory() as d:
        raw, shards = Path(d) / "raw", Path(d) / "shards"
        synth.generate(raw, a.n, seed=0, valid_fraction=0.2)
        ingest.run("ctrate", str(raw), str(shards), cfg.data, progress=False)
        build_tokenizer([s["report"] for s in iter_split(shards, "train", decode_ct=False)], 1000, Path(d) / "tok")
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20)
        ours = bench_ours(str(shards), cfg, str(Path(d) / "tok"), a.batches)
        monai = bench_monai(str(raw), cfg, a.batches, workers=2)
        print(f"multi-view batches/s (batch {cfg.train.batch_size}, {cfg.data.views.n} views): "
              f"ours (Ray Data, 2 actors) {ours:.2f}, MONAI DataLoader (2 workers) {monai:.2f}, ratio x{ours / monai:.2f}")
        if not a.skip_zero:
            from trainer.pretrain import fit

            rates = {}
            for stage in (0, 1, 2, 3):
                c = load_config(REPO / "configs/debug.yaml", [
                    f"data.shards={shards}", f"train.output_dir={d}/runs", f"train.run_name=z{stage}",
                    "train.steps=12", "train.checkpoint_every=12", "train.log_every=4", "train.batch_size=4",
                    f"deepspeed.zero_stage={stage}"])
                result, run_dir, _, _ = fit(c)
                import json

                rates[stage] = json.loads((run_dir / "step_0000012/state.json").read_text())["samples_per_s"]
            base = rates[0]
            print("trainer samples/s, 2 CPU workers, debug flavour: " +
                  ", ".join(f"ZeRO-{s} {r:.2f} (x{r / base:.2f})" for s, r in rates.items()))
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
