"""Loader throughput per CPU core: our shard stream vs a MONAI pipeline on the raw files, one run.

    python -m benchmarks.stream [--config configs/t3d.yaml] [--n 12] [--views 2] [--ray] [--zero]

Three sides, each in its own process, in one run, make what a training step needs from one study: the
whole volume and ``--views`` TMA views, on one core each (torch and blosc2 on one thread):
- ours: a shard sample read by byte offset -> decoded (``data.codec``) -> int16 volume, int16 views
  (random crop + MONAI ``Resize``), augmentation parameters, tokenized report (``DecodeCrop``, the
  Ray Data task's function); the float work runs later on the trainer's device;
- on-device: the same with ``data.views.on_device``: the loader decodes and draws, the views are
  cut on the trainer's device (printed too: what that cut costs per volume on one CPU core);
- MONAI: ``LoadImaged`` on the raw .nii.gz -> ``Orientationd`` -> ``Spacingd`` ->
  ``ScaleIntensityRanged`` -> ``ResizeWithPadOrCropd`` -> ``RandSpatialCropSamplesd`` (the views,
  at the config's crop scale) -> ``Resized``.
Printed: volumes/s per core for each, the ratio (``ratio xN.NN``) and each side's peak RSS. With
``--ray``, the same shards through the Ray Data task pool (``data.loader_actors`` tasks in flight); with
``--spin``, the loader CPU a backpressured training worker pays, chunked vs one execution; with
``--zero`` trainer samples/s at ZeRO 0/1/2/3 (debug flavour, 2 CPU workers).
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

REPO = Path(__file__).resolve().parents[1]
SIDES = ("ours", "on-device", "monai")   # loader-cut views, views cut on the trainer (data.views.on_device), MONAI raw


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        import blosc2

        blosc2.set_nthreads(1)
    except ImportError:
        pass


def run_ours(cfg_path: str, shards: str, tok: str, views: int, reps: int, on_device: bool = False) -> dict:
    _one_thread()
    from common.config import load_config
    from data_service.stream import DecodeCrop, build_index, loader_batch

    cfg = load_config(cfg_path, [f"data.views.n={views}", f"data.views.on_device={str(on_device).lower()}"])
    index = build_index(shards, "train")
    keys = sorted(index)
    actor = DecodeCrop(cfg.data, tok, seed=0, text_unit=cfg.model.text_unit)
    batch = loader_batch(index, [(0, k, -1) for k in keys])
    out = actor({k: v[:1] for k, v in batch.items()})               # warm-up
    t = time.perf_counter()
    for r in range(reps):
        batch["micro"][:] = r
        out = actor(batch)
    dt = time.perf_counter() - t
    assert out["ok"].all() and (out["boxes"] if on_device else out["views"]).shape[1] == views
    res = {"volumes": reps * len(keys), "seconds": dt, "peak_rss_mb": _rss_mb()}
    if on_device:                      # what the trainer then pays per volume to cut, here on this CPU core
        import torch

        from data_service.views import cut_on_device

        image = torch.from_numpy(out["image"])
        t = time.perf_counter()
        cut_on_device(image, out["shift"], out["boxes"], cfg.data.views.size)
        res["cut_s_per_volume"] = (time.perf_counter() - t) / len(keys)
    return res


def run_monai(cfg_path: str, raw: str, views: int, reps: int) -> dict:
    _one_thread()
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandSpatialCropSamplesd,
        Resized,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    from common.config import load_config

    d = load_config(cfg_path).data
    roi = [int(round(s * d.views.scale[0])) for s in d.size]
    tf = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
                  Spacingd("image", pixdim=d.spacing, mode="bilinear"),
                  ScaleIntensityRanged("image", a_min=d.hu_window[0], a_max=d.hu_window[1], b_min=0.0, b_max=1.0,
                                       clip=True),
                  ResizeWithPadOrCropd("image", d.size),
                  RandSpatialCropSamplesd("image", roi_size=roi, num_samples=views, random_size=True,
                                          max_roi_size=[int(round(s * d.views.scale[1])) for s in d.size]),
                  Resized("image", spatial_size=d.views.size)])
    tf.set_random_state(0)
    files = [{"image": str(p)} for p in sorted(Path(raw).glob("train/*/*/*.nii.gz"))]
    tf(files[0])                                                     # warm-up
    t = time.perf_counter()
    n = 0
    for _ in range(reps):
        for f in files:
            out = tf(f)
            assert len(out) == views
            n += 1
    return {"volumes": n, "seconds": time.perf_counter() - t, "peak_rss_mb": _rss_mb()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _side(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.stream", *args], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return json.loads(out.stdout.split("RESULT ", 1)[1])


def prepare(cfg_path: str, d: Path, n: int) -> tuple[str, str, str]:
    from common.config import load_config
    from common.text import build_tokenizer
    from data_service import ingest, synth
    from data_service.shards import iter_split

    cfg = load_config(cfg_path)
    raw, shards = d / "raw", d / "shards"
    synth.generate(raw, n, seed=0, valid_fraction=0.2, workers=2)
    ingest.run("ctrate", str(raw), str(shards), cfg.data, progress=False)
    build_tokenizer([s["report"] for s in iter_split(shards, "train", decode_ct=False)], cfg.model.vocab_size or 1000,
                    d / "tok")
    return str(raw), str(shards), str(d / "tok")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream")
    p.add_argument("--config", default=str(REPO / "configs/t3d.yaml"))
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--ray", action="store_true", help="also the Ray Data task pool path")
    p.add_argument("--zero", action="store_true", help="also trainer samples/s per ZeRO stage (debug)")
    p.add_argument("--spin", action="store_true", help="also the loader's CPU in a backpressured worker, "
                   "chunked vs one Ray Data execution")
    p.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--data", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        raw, shards, tok = a.data
        r = (run_monai(a.config, raw, a.views, max(1, a.reps // 2)) if a.one == "monai"
             else run_ours(a.config, shards, tok, a.views, a.reps, on_device=a.one == "on-device"))
        print("RESULT " + json.dumps(r))
        return 0
    with tempfile.TemporaryDirectory() as d:
        raw, shards, tok = prepare(a.config, Path(d), a.n)
        res = {side: _side(["--one", side, "--config", a.config, "--views", str(a.views), "--reps", str(a.reps),
                            "--data", raw, shards, tok]) for side in SIDES}
        for side, r in res.items():
            r["vol_per_s"] = r["volumes"] / r["seconds"]
            print(f"{side:9s} {r['volumes']} volumes in {r['seconds']:.1f} s on one core = {r['vol_per_s']:.2f} "
                  f"volumes/s per core; peak RSS {r['peak_rss_mb']:.0f} MB")
        monai = res["monai"]["vol_per_s"]
        print(f"stream, {a.views} views, {Path(a.config).name}: ours {res['ours']['vol_per_s']:.2f} vs MONAI "
              f"{monai:.2f} volumes/s per core, ratio x{res['ours']['vol_per_s'] / monai:.2f}")
        dev = res["on-device"]
        print(f"stream, views cut on the device, {Path(a.config).name}: {dev['vol_per_s']:.2f} volumes/s per loader core, "
              f"x{dev['vol_per_s'] / res['ours']['vol_per_s']:.2f} the loader-cut stream, x{dev['vol_per_s'] / monai:.2f} "
              f"MONAI; the cut then costs the trainer {dev['cut_s_per_volume'] * 1e3:.1f} ms per volume on one CPU core")
        if a.ray:
            print(f"Ray Data task pool: {ray_pool(a.config, shards, tok, a.views):.2f} volumes/s")
        if a.spin:
            loader_spin(a.config, shards, tok, a.views)
        if a.zero:
            zero_stages(a.config, shards, Path(d))
    return 0


def ray_pool(cfg_path: str, shards: str, tok: str, views: int, batches: int = 12) -> float:
    import ray

    from common.config import load_config
    from data_service.stream import Plan, build_index, rank_stream

    cfg = load_config(cfg_path, [f"data.views.n={views}", "data.loader_actors=2", "data.loader_cpus_per_actor=1"])
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, object_store_memory=1024 * 2**20)
    try:
        index = build_index(shards, "train")
        plan = Plan(sorted(index), 2, 0)
        it = rank_stream(index, plan, 0, 1, 0, 0, batches + 2, cfg.data, tok, cfg.model.text_unit)
        next(it), next(it)
        t, n = time.perf_counter(), 0
        for b in it:
            n += len(b["key"])
        return n / (time.perf_counter() - t)
    finally:
        ray.shutdown()


def loader_spin(cfg_path: str, shards: str, tok: str, views: int, batches: int = 100, pause: float = 0.25) -> None:
    """CPU the loader costs a training worker: this process pulls a batch every ``pause`` s (a
    trainer that is slower than its loader, so the stream is backpressured) through
    ``rank_stream``, once as one Ray Data execution for the whole run (the baseline: before
    ``data.loader_chunk``) and once chunked as the config says; printed: this process's CPU
    seconds per batch beyond its own sleeping, and the ratio."""
    import ray

    from common.config import load_config
    from data_service.stream import Plan, build_index, rank_stream

    cpu = {}
    for name, chunk in (("one execution", batches), ("chunked", None)):
        sets = [f"data.views.n={views}"] + ([f"data.loader_chunk={chunk}"] if chunk else [])
        cfg = load_config(cfg_path, sets)
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
        try:
            index = build_index(shards, "train")
            it = rank_stream(index, Plan(sorted(index), 4, 0), 0, 1, 0, 0, batches, cfg.data, tok, cfg.model.text_unit)
            next(it)
            c = time.process_time()
            for _ in it:
                time.sleep(pause)
            cpu[name] = (time.process_time() - c) / (batches - 1)
        finally:
            ray.shutdown()
        print(f"loader CPU in the consumer, {name} (data.loader_chunk={cfg.data.loader_chunk}): "
              f"{cpu[name] * 1000:.1f} ms per batch")
    print(f"loader spin: chunked {cpu['chunked'] * 1000:.1f} vs one execution {cpu['one execution'] * 1000:.1f} ms "
          f"CPU per batch, ratio x{cpu['one execution'] / max(cpu['chunked'], 1e-9):.2f} less")


def zero_stages(cfg_path: str, shards: str, d: Path) -> None:
    """(Meant with configs/debug.yaml: the debug model on the config's grid.)"""
    from common.config import load_config
    from trainer.pretrain import fit

    rates = {}
    for stage in (0, 1, 2, 3):
        c = load_config(cfg_path, ["model.flavour=debug",
            f"data.shards={shards}", f"train.output_dir={d}/runs", f"train.run_name=z{stage}", "train.steps=12",
            "train.checkpoint_every=12", "train.log_every=4", "train.batch_size=4", f"deepspeed.zero_stage={stage}"])
        result, run_dir, _, _ = fit(c)
        rates[stage] = json.loads((run_dir / "step_0000012/state.json").read_text())["samples_per_s"]
    print("trainer samples/s, 2 CPU workers, debug flavour: " +
          ", ".join(f"ZeRO-{s} {r:.2f} (x{r / rates[0]:.2f})" for s, r in rates.items()))


if __name__ == "__main__":
    sys.exit(main())
