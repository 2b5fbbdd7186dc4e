"""Fused device-side augmentation (Triton): int16 HU -> window -> flips -> scale/shift -> noise.

Reference: ``trainer.augment.augment_reference``. One program writes a block of output voxels of
one volume: it reads the (flipped) int16 source voxel, normalises it to the HU window (the formula
of ``data_service.preprocess.hu_to_unit``, which Triton cannot call; the parity test checks it), applies the
intensity scale and shift, and adds noise from the same counter-based generator as the reference
(lowbias32 hash of key + 2i and key + 2i + 1, Box-Muller), so the output matches the reference
to float32 rounding. The reference makes five full-size float32 passes (cast, window, flip,
jitter, noise, plus the int64 hash tensors); the kernel reads int16 once and writes float32 once.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from data_service.views import AugmentParams
from trainer.augment import host_params, noise_key

try:  # optional: the PyTorch reference runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None

BLOCK = 1024


def kernel_params(p: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's host inputs from the named fields, the one place their kernel layout is written:
    (N, 6) float32 rows (flip x, y, z, scale, shift, noise std) and the (N,) int64 noise keys."""
    rows = np.concatenate([p.flips.astype(np.float32), p.scale[:, None], p.shift[:, None], p.noise_std[:, None]],
                          axis=1, dtype=np.float32)
    keys = torch.tensor([noise_key(int(s)) for s in p.seed], dtype=torch.int64)
    return torch.from_numpy(np.ascontiguousarray(rows)), keys


if triton is not None:

    @triton.jit
    def _hash(x):
        """lowbias32 on uint64 lanes holding 32-bit values (masked after each multiply)."""
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _augment_kernel(x_ptr, out_ptr, p_ptr, key_ptr, X, Y, Z, lo, span, BLOCK: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        yz = Y * Z
        total = X * yz
        inside = offs < total
        i = offs // yz
        j = (offs % yz) // Z
        k = offs % Z
        row = p_ptr + n * 6                # kernel_params: flip x, y, z, scale, shift, noise std
        fx = tl.load(row + 0)
        fy = tl.load(row + 1)
        fz = tl.load(row + 2)
        a = tl.load(row + 3)
        b = tl.load(row + 4)
        std = tl.load(row + 5)
        si = tl.where(fx > 0.5, X - 1 - i, i)
        sj = tl.where(fy > 0.5, Y - 1 - j, j)
        sk = tl.where(fz > 0.5, Z - 1 - k, k)
        v = tl.load(x_ptr + n.to(tl.int64) * total + si * yz + sj * Z + sk, mask=inside, other=0).to(tl.float32)
        v = (v - lo) / span                # hu_to_unit: clip((x - lo) / (hi - lo), 0, 1)
        v = tl.minimum(tl.maximum(v, 0.0), 1.0)
        v = v * a + b
        key = tl.load(key_ptr + n).to(tl.uint64)
        o = offs.to(tl.uint64)
        b1 = _hash((key + 2 * o) & 0xFFFFFFFF)
        b2 = _hash((key + 2 * o + 1) & 0xFFFFFFFF)
        u1 = (b1.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        u2 = (b2.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        noise = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        v = tl.where(std > 0, v + std * noise, v)
        tl.store(out_ptr + n.to(tl.int64) * total + offs, v, mask=inside)


def augment(x: torch.Tensor, params: AugmentParams, window) -> torch.Tensor:
    """Same contract as ``trainer.augment.augment_reference`` (x (N,1,X,Y,Z), params (N,))."""
    p = host_params(params)
    if x.ndim != 5 or p.shape != (x.shape[0],):
        raise ValueError(f"augment: expected x (N,1,X,Y,Z) and params (N,), got {tuple(x.shape)}, {p.shape}")
    n, _, X, Y, Z = x.shape
    fparams, key_t = kernel_params(p)
    if x.is_cuda:          # pinned, so the copies queue behind the GPU's work instead of waiting for it
        fparams, key_t = (t.pin_memory().to(x.device, non_blocking=True) for t in (fparams, key_t))
    else:
        fparams, key_t = fparams.to(x.device), key_t.to(x.device)
    out = torch.empty((n, 1, X, Y, Z), dtype=torch.float32, device=x.device)
    grid = (n, math.ceil(X * Y * Z / BLOCK))
    _augment_kernel[grid](x.contiguous(), out, fparams, key_t, X, Y, Z, float(window[0]),
                          float(window[1]) - float(window[0]), BLOCK=BLOCK)
    return out
