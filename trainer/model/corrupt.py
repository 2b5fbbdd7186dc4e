"""Corruption of the image encoder's input for the restoration term (``restore``; docs/design.md,
"Text-informed restoration"). Parameter-free and deterministic: every random number comes from the
counter-based hash of ``trainer.augment`` keyed by the sample's own augmentation seed (the
``seed`` field of ``data_service.views.AugmentParams``, drawn from the sample's key and micro-step), so a
resumed run corrupts each sample exactly as the uninterrupted run did, no global RNG is consumed,
and the CPU and a GPU draw the same numbers. No host synchronisation: the seeds stay on the device.

Three corruptions, combinable, applied in this order to x in [0, 1] (``data.hu_window``):
  downsample  area-average by ``restore.downsample`` per axis, trilinear back to the grid
  noise       + ``restore.noise_std`` x N(0, 1) on every voxel
  mask        ``restore.mask_ratio`` of the ``restore.block_size`` 3D blocks (exactly that many,
              rounded; partial blocks at the far edges count as blocks) set to 0 (-1000 HU in the
              default window: air)
The returned mask marks the corrupted voxels the loss counts: every voxel when downsampling or
noise is on (each voxel was changed), else the masked blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.augment import M32, hash32

_SALT_MASK, _SALT_NOISE = 0x5EED0001, 0x5EED0002


def _keys(seeds: torch.Tensor, salt: int) -> torch.Tensor:
    """(N,) integer seeds (any dtype holding integers exactly: ``AugmentParams.seed`` is int64) -> (N,)
    int64 keys in [0, 2^32), one stream per salt."""
    s = seeds.detach().to(torch.int64) & M32
    return hash32((hash32(s) + salt) & M32)


def _uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) keys -> (N, n) uniforms in (0, 1), element i from hash(key + i)."""
    i = torch.arange(n, device=keys.device, dtype=torch.int64)
    return (hash32((keys[:, None] + i) & M32).to(torch.float32) + 0.5) * 2.0 ** -32


def _normal(key: torch.Tensor, n: int) -> torch.Tensor:
    """0-d key -> n standard normals (Box-Muller on hash(key + 2i), hash(key + 2i + 1))."""
    i = torch.arange(n, device=key.device, dtype=torch.int64)
    u1 = (hash32((key + 2 * i) & M32).to(torch.float32) + 0.5) * 2.0 ** -32
    u2 = (hash32((key + 2 * i + 1) & M32).to(torch.float32) + 0.5) * 2.0 ** -32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def block_mask(seeds: torch.Tensor, grid: tuple[int, int, int], block: list[int] | tuple[int, ...],
               ratio: float) -> torch.Tensor:
    """(N,) seeds -> (N, 1, X, Y, Z) bool: ``round(ratio x blocks)`` blocks of ``block`` voxels
    masked per sample (those with the smallest hash values), the same for the same seed."""
    nb = [math.ceil(g / b) for g, b in zip(grid, block)]
    total = nb[0] * nb[1] * nb[2]
    k = int(round(ratio * total))
    n = seeds.shape[0]
    if k == 0:
        return torch.zeros(n, 1, *grid, dtype=torch.bool, device=seeds.device)
    rank = _uniform(_keys(seeds, _SALT_MASK), total).argsort(1).argsort(1)     # (N, blocks): each block's rank
    m = (rank < k).view(n, 1, *nb)
    for ax, b in enumerate(block):
        m = m.repeat_interleave(b, dim=2 + ax)
    return m[:, :, :grid[0], :grid[1], :grid[2]].contiguous()


def corrupt(x: torch.Tensor, seeds: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, 1, X, Y, Z) model input, seeds (N,) -> (corrupted x in x's dtype, (N, 1, X, Y, Z) bool
    mask of the corrupted voxels). ``cfg`` is the ``restore`` section (``RestoreConfig``)."""
    if x.ndim != 5 or x.shape[1] != 1 or seeds.shape != (x.shape[0],):
        raise ValueError(f"corrupt: expected x (N,1,X,Y,Z) and seeds (N,), got {tuple(x.shape)}, {tuple(seeds.shape)}")
    grid = tuple(x.shape[2:])
    y = x.float()
    everywhere = False
    if cfg.downsample > 1:
        small = F.interpolate(y, size=[math.ceil(g / cfg.downsample) for g in grid], mode="area")
        y = F.interpolate(small, size=grid, mode="trilinear", align_corners=False)
        everywhere = True
    if cfg.noise_std > 0:
        keys = _keys(seeds, _SALT_NOISE)
        per = y[0].numel()
        noise = torch.stack([_normal(keys[i], per) for i in range(x.shape[0])]).view_as(y)
        y = y + cfg.noise_std * noise
        everywhere = True
    mask = block_mask(seeds, grid, cfg.block_size, cfg.mask_ratio) if cfg.mask_ratio > 0 else \
        torch.zeros(y.shape, dtype=torch.bool, device=y.device)
    y = y.masked_fill(mask, 0.0)
    if everywhere:
        mask = torch.ones_like(mask)
    return y.to(x.dtype), mask
