"""Device-side float work of a training sample (the loader ships int16 and parameters; see
``data_service.views``): HU window -> [0, 1] (``data_service.preprocess.hu_to_unit``, the
evaluation's window too), flips, intensity scale and shift, gaussian noise.

``augment_reference`` is the PyTorch reference; ``trainer.kernels.augment`` dispatches to the fused
Triton kernel on a GPU. Noise comes from a counter-based generator (a 32-bit integer hash of the
sample's seed and the voxel's index, then Box-Muller), so the reference and the kernel draw the
very same numbers on any device, and a resumed run the same as an uninterrupted one.
"""
from __future__ import annotations

import math

import torch

from data_service.preprocess import hu_to_unit
from data_service.views import AugmentParams

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


def host_params(params) -> AugmentParams:
    """The augmentation parameters as host data (``AugmentParams``): they steer Python control flow
    and the kernel's launch. ``AugmentParams`` passes through (the training path: no copy, no sync);
    a packed (N, 7) array (numpy, or a tensor: a device one is copied back, a sync) is unpacked by
    ``AugmentParams.from_array``."""
    if isinstance(params, AugmentParams):
        return params
    if isinstance(params, torch.Tensor):
        params = params.detach().cpu().numpy()
    return AugmentParams.from_array(params)


def hash_normal(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` standard normals for ``seed`` (float32): element i from hash(key + 2i), hash(key + 2i + 1)."""
    key = noise_key(seed)
    i = torch.arange(n, device=device, dtype=torch.int64)
    b1 = hash32((key + 2 * i) & M32)
    b2 = hash32((key + 2 * i + 1) & M32)
    u1 = (b1.to(torch.float32) + 0.5) * 2.0 ** -32
    u2 = (b2.to(torch.float32) + 0.5) * 2.0 ** -32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def augment_reference(x: torch.Tensor, params: AugmentParams, window: tuple[float, float]) -> torch.Tensor:
    """x (N, 1, X, Y, Z) HU of any dtype; params (N,) ``AugmentParams`` (or its packed (N, 7) array)
    -> float32 (N, 1, X, Y, Z): ``hu_to_unit`` (clip((x - lo) / (hi - lo), 0, 1)), flipped, times
    scale plus shift, plus noise_std x hash_normal(seed) (indexed by the output voxel)."""
    p = host_params(params)
    if x.ndim != 5 or p.shape != (x.shape[0],):
        raise ValueError(f"augment: expected x (N,1,X,Y,Z) and params (N,), got {tuple(x.shape)}, {p.shape}")
    y = hu_to_unit(x.float(), window)
    out = torch.empty_like(y)
    for k in range(x.shape[0]):
        flips = [ax + 2 for ax in range(3) if p.flips[k, ax]]
        v = y[k:k + 1].flip(flips) if flips else y[k:k + 1]
        v = v * float(p.scale[k]) + float(p.shift[k])
        if p.noise_std[k] > 0:
            v = v + float(p.noise_std[k]) * hash_normal(int(p.seed[k]), v.numel(), v.device).view(v.shape)
        out[k:k + 1] = v
    return out
