"""Device-side float work of a training sample (the loader ships int16 and parameters; see
``data_service.views``): HU window -> [0, 1], flips, intensity scale and shift, gaussian noise.

``augment_reference`` is the PyTorch reference; ``trainer.kernels.augment`` dispatches to the fused
Triton kernel on a GPU. Noise comes from a counter-based generator (a 32-bit integer hash of the
sample's seed and the voxel's index, then Box-Muller), so the reference and the kernel draw the
very same numbers on any device, and a resumed run the same as an uninterrupted one.
"""
from __future__ import annotations

import math

import numpy as np
import torch

M32 = 0xFFFFFFFF
_C1, _C2, _GOLD = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow."""
    return ((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c & M32


def hash32(x):
    """lowbias32 (C. Wellons): int64 in [0, 2^32) -> int64 in [0, 2^32); a tensor or a Python int."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def noise_key(seed: int) -> int:
    """The counter key of a sample's noise, on the host (its seed is a host parameter)."""
    return (hash32(int(seed) & M32) + _GOLD) & M32


def host_params(params) -> np.ndarray:
    """The (N, 7) augmentation parameters as host float64: they steer Python control flow and the
    kernel's launch, and the loader ships them as numpy (a device tensor is copied back, a sync)."""
    if isinstance(params, torch.Tensor):
        params = params.detach().cpu().numpy()
    return np.asarray(params, dtype=np.float64)


def hash_normal(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` standard normals for ``seed`` (float32): element i from hash(key + 2i), hash(key + 2i + 1)."""
    key = noise_key(seed)
    i = torch.arange(n, device=device, dtype=torch.int64)
    b1 = hash32((key + 2 * i) & M32)
    b2 = hash32((key + 2 * i + 1) & M32)
    u1 = (b1.to(torch.float32) + 0.5) * 2.0 ** -32
    u2 = (b2.to(torch.float32) + 0.5) * 2.0 ** -32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def augment_reference(x: torch.Tensor, params: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """x (N, 1, X, Y, Z) HU of any dtype; params (N, 7) (``data_service.views.N_PARAMS``) ->
    float32 (N, 1, X, Y, Z): clip((x - lo) / (hi - lo), 0, 1), flipped, times scale plus shift,
    plus noise_std x hash_normal(seed) (indexed by the output voxel)."""
    if x.ndim != 5 or params.shape != (x.shape[0], 7):
        raise ValueError(f"augment: expected x (N,1,X,Y,Z) and params (N,7), got {tuple(x.shape)}, {tuple(params.shape)}")
    lo, hi = float(window[0]), float(window[1])
    y = ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    out = torch.empty_like(y)
    p = host_params(params)
    for k in range(x.shape[0]):
        flips = [ax + 2 for ax in range(3) if p[k, ax] > 0.5]
        v = y[k:k + 1].flip(flips) if flips else y[k:k + 1]
        v = v * float(p[k, 3]) + float(p[k, 4])
        if p[k, 5] > 0:
            v = v + float(p[k, 5]) * hash_normal(int(p[k, 6]), v.numel(), v.device).view(v.shape)
        out[k:k + 1] = v
    return out
