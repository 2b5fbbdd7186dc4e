"""THE preprocessing path: reading + canonical grid (``load_canonical``) and HU -> model input
(``to_model_input``). Ingest, the stream, the evaluators and the one-volume CLI all call these two,
so every entry point accepts and rejects the same inputs for the same reasons.

Canonical grid: RAS orientation, target spacing, target size, int16 HU (MONAI transforms).

``CanonicalCT`` is the array transform; ``CanonicalCTd`` the dictionary wrapper (image + optional
mask). Out-of-field voxels become air (-1024 HU), never water: MONAI pads with zeros, so the
intensities are shifted by +1024 around the resampling and shifted back afterwards.
Resampling uses ``Spacing(diagonal=True)``: oblique and gantry-tilted (sheared) inputs land on an
axis-aligned RAS grid, so every output affine is diagonal with the configured spacing.
Spacing and the centred pad/crop run lazily (MONAI lazy resampling) and are applied as ONE
resample straight onto the target grid: the same values as resampling the whole field of view
and then cropping (a test checks it), without interpolating the voxels that the crop throws
away (at 1x1x4 mm a 400 mm field is ~390x390 in-plane before the 256x256 crop; measured 1.5x
faster per study, benchmarks/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_service.config import DataConfig
from data_service.io import Reject, read_mask, read_volume

AIR = -1024.0


def _monai():
    try:
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing
        from monai.transforms.lazy.functional import apply_pending
    except ImportError as e:  # pragma: no cover - install problem
        raise ImportError("data_service.preprocess needs torch and monai: run `make install`") from e
    return torch, MetaTensor, Orientation, Spacing, ResizeWithPadOrCrop, apply_pending


class CanonicalCT:
    """(HU array, affine) -> (int16 HU array on the target grid, new affine)."""

    def __init__(self, spacing: Sequence[float], size: Sequence[int], axcodes: str = "RAS",
                 hu_clip: Sequence[float] = (-1024.0, 3071.0)):
        if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive numbers, got {spacing!r}")
        if len(size) != 3 or any(int(s) <= 0 for s in size):
            raise ValueError(f"size must be 3 positive integers, got {size!r}")
        self.spacing = [float(s) for s in spacing]
        self.size = [int(s) for s in size]
        self.axcodes = axcodes
        self.hu_clip = (float(hu_clip[0]), float(hu_clip[1]))

    def _grid(self, arr: np.ndarray, affine: np.ndarray, nearest: bool, lazy: bool = True):
        torch, MetaTensor, Orientation, Spacing, ResizeWithPadOrCrop, apply_pending = _monai()
        if arr.ndim != 3:
            raise ValueError(f"expected a 3D array, got shape {arr.shape}")
        x = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None],
                       affine=torch.as_tensor(affine, dtype=torch.float64))
        src = Orientation(axcodes=self.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
        mode = "nearest" if nearest else "bilinear"
        x = Spacing(pixdim=self.spacing, diagonal=True, mode=mode, padding_mode="zeros", align_corners=True,
                    lazy=lazy)(src)
        x = ResizeWithPadOrCrop(self.size, mode="constant", lazy=lazy)(x)
        if not lazy:
            return x[0].numpy(), np.asarray(x.affine, dtype=np.float64)
        dst = np.asarray(x.peek_pending_affine(), dtype=np.float64)
        m = np.linalg.inv(np.asarray(src.affine, dtype=np.float64)) @ dst      # target index -> source index
        if np.abs(m[:3, :3] - np.diag(np.diag(m[:3, :3]))).max() < 1e-9:
            return _axis_aligned_sample(src[0], m, [int(s) for s in x.peek_pending_shape()], mode), dst
        x, _ = apply_pending(x, overrides={"mode": mode, "padding_mode": "zeros", "align_corners": True})
        return x[0].numpy(), np.asarray(x.affine, dtype=np.float64)

    def __call__(self, arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, aff = self._grid(arr.astype(np.float32) - AIR, affine, nearest=False)
        out = np.clip(np.rint(out + AIR), *self.hu_clip).astype(np.int16)
        return out, aff

    def mask(self, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
        out, _ = self._grid(mask.astype(np.float32), affine, nearest=True)
        return np.rint(out).astype(np.uint8)


def _axis_aligned_sample(vol, m: np.ndarray, shape: list[int], mode: str) -> np.ndarray:
    """``grid_sample`` of ``vol`` at source index ``m @ target index`` when ``m`` is diagonal (a
    scale and a shift per axis: every input that is not sheared, once oriented). MONAI's resample
    builds the same grid through ``affine_grid``, a dense (N, 3) matrix product that took 0.32 s
    of a 0.45 s resample at 256x256x128 on one core (profile in benchmarks/RESULTS.md); here the grid
    is three 1-D coordinate vectors broadcast together, and the sampling is the same
    ``grid_sample`` call (align_corners=True, zero padding), so values match MONAI's (a test checks)."""
    import torch

    axes = []
    for a in range(3):   # source index -> grid_sample's normalised coordinate (align_corners=True)
        idx = m[a, a] * np.arange(shape[a], dtype=np.float64) + m[a, 3]
        n = vol.shape[a]
        axes.append(torch.as_tensor(2.0 * idx / (n - 1) - 1.0 if n > 1 else np.zeros_like(idx), dtype=torch.float32))
    d0, d1, d2 = shape
    grid = torch.empty((1, d0, d1, d2, 3), dtype=torch.float32)
    grid[..., 0] = axes[2].view(1, 1, 1, d2)     # grid_sample's x indexes the last input axis
    grid[..., 1] = axes[1].view(1, 1, d1, 1)
    grid[..., 2] = axes[0].view(1, d0, 1, 1)
    inp = torch.as_tensor(np.asarray(vol), dtype=torch.float32)[None, None]
    out = torch.nn.functional.grid_sample(inp, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


class CanonicalCTd:
    """Dictionary wrapper: keys ``image`` (+ ``affine``) and optional ``mask``."""

    def __init__(self, spacing, size, axcodes="RAS", hu_clip=(-1024.0, 3071.0),
                 image_key="image", mask_key="mask", affine_key="affine"):
        self.t = CanonicalCT(spacing, size, axcodes, hu_clip)
        self.image_key, self.mask_key, self.affine_key = image_key, mask_key, affine_key

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        src_affine = d[self.affine_key]
        if d.get(self.mask_key) is not None:
            d[self.mask_key] = self.t.mask(d[self.mask_key], src_affine)
        d[self.image_key], d[self.affine_key] = self.t(d[self.image_key], src_affine)
        return d


def hu_to_unit(x, window: Sequence[float] = (-1000.0, 1000.0)):
    """THE HU window, for evaluation and training alike: float HU (torch or numpy, any shape) ->
    clip((x - lo) / (hi - lo), 0, 1) in x's float dtype. ``to_model_input`` (evaluation) and
    ``trainer.augment.augment_reference`` (training) call it; the fused kernel
    (``trainer/kernels/augment_kernel.py``) computes the same formula, checked against the reference."""
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"hu_window must be increasing, got {window!r}")
    y = (x - lo) / (hi - lo)
    return y.clip(0.0, 1.0)


def to_model_input(hu, data: DataConfig):
    """HU of any dtype (torch tensor or numpy array, any shape) -> the network's float32 input in
    [0, 1] (``data.hu_window``, ``hu_to_unit``), on the same device: the training input with no
    augmentation (``trainer.augment`` with identity parameters gives the very same numbers)."""
    if isinstance(hu, np.ndarray):
        return hu_to_unit(hu.astype(np.float32), data.hu_window)
    return hu_to_unit(hu.float(), data.hu_window)


@dataclass
class Canonical:
    hu: np.ndarray                       # int16 HU on the canonical grid (data.size)
    affine: np.ndarray                   # voxel -> RAS mm, diagonal with data.spacing
    mask: np.ndarray | None = None       # uint8 labels on the same grid
    geometry: dict[str, Any] = field(default_factory=dict)   # the reader's source geometry


def load_canonical(ref: str | Path | Sequence[str | Path], data: DataConfig, read_kw: dict[str, Any] | None = None,
                   mask: str | Path | None = None) -> Canonical:
    """A NIfTI file or DICOM series (folder or file list) -> int16 HU on the canonical grid, with
    its organ mask when given. Every check lives in the reader (unreadable, truncated, not CT, too
    few slices, uneven spacing, gantry tilt, geometry); problems raise ``Reject(reason, detail)``.
    ``read_kw``: the importer's extra reader arguments (CT-RATE's rescale and spacing)."""
    try:
        vol = read_volume(ref, min_slices=data.min_slices, max_spacing_jitter_mm=data.max_spacing_jitter_mm,
                          max_tilt_deg=data.max_gantry_tilt_deg, max_voxels=data.max_voxels,
                          max_bytes=data.worker_memory_mb * 2**20 if data.worker_memory_mb else None,
                          **(read_kw or {}))
        m = read_mask(mask, vol.array.shape) if mask else None
    except (Reject, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a reader tripping on a malformed file: that file's reject
        raise Reject("unreadable", f"{ref}: {type(e).__name__}: {e}") from e
    canon = CanonicalCT(data.spacing, data.size, data.orientation, data.hu_clip)
    try:
        hu, affine = canon(vol.array, vol.affine)
        m = canon.mask(m, vol.affine) if m is not None else None
    except MemoryError as e:
        raise Reject("too_large", f"{ref}: out of memory while resampling (data.worker_memory_mb="
                                  f"{data.worker_memory_mb}): {e}") from e
    except Exception as e:  # noqa: BLE001 - a MONAI failure on one study is that study's reject
        if "can't allocate memory" in str(e) or "out of memory" in str(e).lower():
            raise Reject("too_large", f"{ref}: out of memory while resampling (data.worker_memory_mb="
                                      f"{data.worker_memory_mb}): {str(e)[:200]}") from e
        raise Reject("preprocess_error", f"{ref}: {type(e).__name__}: {e}") from e
    return Canonical(hu, affine, m, vol.meta)
