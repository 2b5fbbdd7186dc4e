"""Fused kernels vs their PyTorch references: time, peak memory and the largest difference.

    python -m benchmarks.kernels [--bi 8 --bt 64 --l 256 --n 32 --d 256 --iters 20] [--volumes 8]

- token-region attention (``tma.kernel``), forward + backward. The defaults are the paper preset's
  local alignment: 8 images per worker against 8 workers x 8 reports, 256 tokens, 32 regions per
  128x128x64 view, 256-d.
- device-side augmentation (``train.augment_kernel``) of one paper-grid micro-batch: ``--volumes``
  int16 volumes of 256x256x128 and two 128x128x64 views each, window + flips + jitter + noise;
- the views cut on the device (``data.views.on_device``): crop, resize and shift of that micro-batch.

Needs a CUDA GPU for numbers. On a machine without one it checks parity at a small size in
Triton's interpreter and says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _run(fn, r, t, m, iters: int, cuda: bool):
    import torch

    def once():
        s = fn(r, t, m)
        s.sum().backward()
        r.grad = t.grad = None

    once()                                       # compile / warm up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters, (torch.cuda.max_memory_allocated() if cuda else float("nan"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    for k, v in (("bi", 8), ("bt", 64), ("l", 256), ("n", 32), ("d", 256), ("iters", 20), ("volumes", 8)):
        p.add_argument(f"--{k}", type=int, default=v)
    a = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
        a.bi, a.bt, a.l, a.n, a.d, a.iters = 2, 4, 40, 18, 32, 1
        print("no CUDA device: parity check only, in Triton's interpreter, at a small size")
    import torch.nn.functional as F

    from trainer.losses.tma import token_region_similarity

    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    r = F.normalize(torch.randn(a.bi, a.n, a.d, device=dev, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(a.bt, a.l, a.d, device=dev, generator=g), dim=-1).requires_grad_()
    m = torch.ones(a.bt, a.l, device=dev)
    ref = lambda r, t, m: token_region_similarity(r, t, m, 0.07, kernel="torch")     # noqa: E731
    fused = lambda r, t, m: token_region_similarity(r, t, m, 0.07, kernel="triton")  # noqa: E731
    err = (ref(r, t, m) - fused(r, t, m)).abs().max().item()
    print(f"shape Bi={a.bi} Bt={a.bt} L={a.l} N={a.n} D={a.d} on {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"max |fused - reference| (forward) = {err:.2e}")
    if not cuda:
        return 0 if err < 1e-5 else 1
    tr, mr = _run(ref, r, t, m, a.iters, cuda)
    tf, mf = _run(fused, r, t, m, a.iters, cuda)
    print(f"reference  {tr * 1e3:8.2f} ms/iter  peak {mr / 2**20:8.1f} MiB")
    print(f"fused      {tf * 1e3:8.2f} ms/iter  peak {mf / 2**20:8.1f} MiB")
    print(f"ratio      speed x{tr / tf:.2f}  memory x{mf / mr:.2f} (fused / reference)")
    ok = err < 1e-4
    ok = bench_augment(a.volumes, a.iters) and ok
    bench_cut(a.volumes, a.iters)
    return 0 if ok else 1


def bench_augment(volumes: int, iters: int) -> bool:
    """Reference vs fused augmentation on a paper-grid micro-batch; True when they agree to 1e-5."""
    import numpy as np
    import torch

    from data_service.views import AugmentParams
    from trainer.augment import augment_reference
    from trainer.kernels import augment

    g = torch.Generator().manual_seed(0)
    window = (-1000.0, 1000.0)
    out = []
    for shape in ((volumes, 1, 256, 256, 128), (2 * volumes, 1, 128, 128, 64)):
        n = shape[0]
        x = torch.randint(-1200, 3200, shape, generator=g, dtype=torch.int16).cuda()
        p = AugmentParams(flips=torch.randint(0, 2, (n, 3), generator=g).numpy() > 0, scale=np.full(n, 1.05),
                          shift=np.full(n, -0.02), noise_std=np.full(n, 0.02), seed=np.arange(n, dtype=np.int64) * 7919)
        err = (augment(x, p, window, "triton") - augment_reference(x, p, window)).abs().max().item()
        times = {}
        for name, fn in (("reference", lambda: augment_reference(x, p, window)),
                         ("fused", lambda: augment(x, p, window, "triton"))):
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            times[name] = ((time.perf_counter() - t0) / iters, torch.cuda.max_memory_allocated() - base)
        (tr, mr), (tf, mf) = times["reference"], times["fused"]
        gb = x.numel() * (2 + 4) / 1e9                          # int16 read + float32 written, at least
        print(f"augment {tuple(shape)}: max |fused - reference| = {err:.2e}")
        print(f"  reference {tr * 1e3:8.2f} ms  peak +{mr / 2**20:8.1f} MiB")
        print(f"  fused     {tf * 1e3:8.2f} ms  peak +{mf / 2**20:8.1f} MiB  ({gb / tf:.0f} GB/s of int16 in + "
              f"float32 out)")
        print(f"  ratio     speed x{tr / tf:.2f}  memory x{mf / mr:.2f} (fused / reference)")
        out.append(err < 1e-5)
    return all(out)


def bench_cut(volumes: int, iters: int) -> None:
    """The views cut on the device (``data.views.on_device``): a paper-grid micro-batch of
    ``volumes`` int16 volumes, two views each (boxes drawn as the loader draws them), plus a shift."""
    import numpy as np
    import torch

    from data_service.config import ViewsConfig
    from data_service.views import MultiViewCrop, cut_on_device, draw_shift

    rng = np.random.default_rng(0)
    x = torch.randint(-1200, 3200, (volumes, 1, 256, 256, 128), dtype=torch.int16).cuda()
    crop = MultiViewCrop(ViewsConfig(n=2, size=[128, 128, 64], scale=[0.75, 1.0]))
    boxes = np.stack([crop.draw(x.shape[2:], rng)[0] for _ in range(volumes)])
    shift = np.stack([draw_shift(x.shape[2:], rng, 0.1) for _ in range(volumes)])
    cut_on_device(x, shift, boxes, crop.cfg.size)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        cut_on_device(x, shift, boxes, crop.cfg.size)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    print(f"views cut on the device {tuple(x.shape)} + 2 views of 128x128x64 each, shifted: {dt * 1e3:.2f} ms "
          f"per micro-batch ({volumes / dt:.0f} volumes/s)")


if __name__ == "__main__":
    sys.exit(main())
