"""Fused token-region kernel vs its PyTorch reference: time and peak memory, forward + backward.

    python -m benchmarks.kernels [--bi 8 --bt 64 --l 256 --n 32 --d 256 --iters 20]

Needs a CUDA GPU for numbers (the defaults are the paper preset's local alignment: 8 images per
worker against 8 workers x 8 reports, 256 tokens, 32 regions per 128x128x64 view, 256-d). On a
machine without one it checks parity at a small size in Triton's interpreter and says so.
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
    for k, v in (("bi", 8), ("bt", 64), ("l", 256), ("n", 32), ("d", 256), ("iters", 20)):
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
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
