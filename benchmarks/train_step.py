"""Trainer throughput on one device: samples/s, peak memory and MFU of the product's train step.

    python -m benchmarks.train_step --config configs/t3d.yaml [--runs 0 2 3 2+triton] [--steps 12]

One process, one device, no Ray: ``trainer.step.train_step`` on the engine ``trainer.engine.init_engine``
builds (DeepSpeed ZeRO, bf16 on a GPU), fed synthetic int16 batches at the config's grid (the whole
volume, ``data.views.n`` views, ``data.max_text_tokens`` tokens). This is what one Ray Train worker runs
per micro-step minus the loader, which ``benchmarks.stream`` measures. A run spec is the ZeRO stage,
optionally ``+triton`` (both fused kernels: ``tma.kernel`` and ``train.augment_kernel``),
``+nobench`` (cuDNN's autotuning off, which ``init_engine`` turns on for a GPU), ``+cl`` (the image
encoder's input in ``channels_last_3d``, so its convolutions run channels-last), ``+bN`` (batch N per micro-step) and ``+prof`` (print the top CUDA kernels of
two steps from ``torch.profiler``).

Model FLOPs per micro-step are counted once with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matrix products and attention, forward and backward); MFU = those FLOPs per second /
``--peak-tflops`` (default 989 TFLOP/s: dense bf16 of an H100/H200 SXM by the datasheet).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time


def synthetic_batch(cfg, batch: int, vocab: int, device, seed: int = 0):
    import numpy as np
    import torch

    from data_service.views import AugmentParams
    from trainer.step import Batch

    g = torch.Generator().manual_seed(seed)
    d, v = cfg.data, cfg.data.views.n
    image = torch.randint(-1000, 1500, (batch, 1, *d.size), generator=g, dtype=torch.int16)
    views = torch.randint(-1000, 1500, (batch, v, 1, *d.views.size), generator=g, dtype=torch.int16)
    shape = (batch, 1 + v)
    params = AugmentParams(flips=torch.randint(0, 2, (*shape, 3), generator=g).numpy() > 0, scale=np.ones(shape),
                           shift=np.zeros(shape), noise_std=np.full(shape, float(d.views.noise_std)),
                           seed=np.arange(batch * (1 + v), dtype=np.int64).reshape(shape))
    if cfg.model.text_unit == "sentence":      # (B, S, Ls): every sentence slot full, the worst case
        ids = torch.randint(5, vocab, (batch, d.max_sentences, d.max_sentence_tokens), generator=g)
    else:
        ids = torch.randint(5, vocab, (batch, d.max_text_tokens), generator=g)
    return Batch(image.to(device), views.to(device) if v else None, params, ids.to(device),
                 torch.ones_like(ids).to(device))


def run_one(spec: str, args) -> dict:
    import torch

    from common.config import load_config
    from trainer import engine as eng
    from trainer.losses import T3DLoss
    from trainer.model import build_model
    from trainer.step import train_step

    zero, *opts = spec.split("+")
    kernel = "triton" if "triton" in opts else "auto"
    batch = [f"train.batch_size={o[1:]}" for o in opts if o[:1] == "b" and o[1:].isdigit()]
    cfg = load_config(args.config, [*args.set, *batch, f"deepspeed.zero_stage={int(zero)}", f"tma.kernel={kernel}",
                                    f"train.augment_kernel={kernel}", f"train.steps={10**6}"])
    cuda = torch.cuda.is_available() and cfg.ray.use_gpu
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    held = torch.cuda.memory_allocated() if cuda else 0      # what earlier runs in this process still hold
    model = build_model(cfg, args.vocab).to(dev)
    if "cl" in opts:     # DeepSpeed flattens parameters (contiguous only): the activations go channels-last
        model.image.register_forward_pre_hook(
            lambda mod, a: (a[0].contiguous(memory_format=torch.channels_last_3d), *a[1:]))
    engine = eng.init_engine(model, cfg)
    torch.backends.cudnn.benchmark = cuda and "nobench" not in opts
    dtype = torch.bfloat16 if eng.use_bf16(cfg) else torch.float32
    loss_fn, b = T3DLoss(cfg.tma), synthetic_batch(cfg, cfg.train.batch_size, args.vocab, dev)

    def step():
        return train_step(engine, loss_fn, b, cfg.data, dtype, kernel)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        logs = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    if "prof" in opts:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(), step()
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=14,
                                        max_name_column_width=60))
    out = {"spec": spec, "s_per_step": dt, "samples_s": cfg.train.batch_size / dt, "flops": flops,
           "peak_gib": (torch.cuda.max_memory_allocated() - held) / 2**30 if cuda else float("nan"),
           "loss": float(logs["loss"]), "batch": cfg.train.batch_size}
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/t3d.yaml")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--runs", nargs="+", default=["0", "2", "3"], help="ZeRO stage, optionally +triton")
    p.add_argument("--steps", type=int, default=12, help="timed micro-steps per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed micro-steps first (cuDNN autotuning)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args(argv)
    import torch

    from trainer.engine import ensure_process_group

    ensure_process_group()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {name}, torch {torch.__version__}, config {a.config} {' '.join(a.set)}")
    rows, flops, base = [], None, None          # flops: model FLOPs per sample
    for spec in a.runs:
        a.count_flops = flops is None
        try:
            r = run_one(spec, a)
        except Exception as e:  # noqa: BLE001 - one failing stage must not hide the others
            print(f"run {spec}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        flops = flops or (r["flops"] / r["batch"] if r["flops"] else None)
        base = base or r["samples_s"]
        mfu = flops * r["samples_s"] / (a.peak_tflops * 1e12) if flops else float("nan")
        rows.append(r)
        print(f"run {spec:>10}: batch {r['batch']}  {r['s_per_step'] * 1e3:8.1f} ms/step  "
              f"{r['samples_s']:7.2f} samples/s  ratio x{r['samples_s'] / base:.2f}  "
              f"peak {r['peak_gib']:6.1f} GiB  MFU {mfu:6.1%}  loss {r['loss']:.3f}", flush=True)
    if flops:
        print(f"model FLOPs per sample (fwd+bwd): {flops / 1e12:.4g} TFLOP; peak {a.peak_tflops:.0f} TFLOP/s")
    return 0 if len(rows) == len(a.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
