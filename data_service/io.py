"""Read CT volumes (NIfTI file or DICOM series) into (HU float32 array, RAS affine, meta).

Every problem raises ``Reject(reason, detail)`` so that ingest can write it to rejects.jsonl.
Array axes are voxel indices (i, j, k); the affine maps them to RAS world millimetres
(nibabel's convention; DICOM's LPS is converted).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REASONS = ("unreadable", "truncated", "missing_report", "missing_image", "not_ct", "too_few_slices",
           "inconsistent_spacing", "gantry_tilt", "bad_geometry", "preprocess_error", "duplicate_id",
           "too_large", "worker_crashed", "bad_path")
DEFAULT_MAX_VOXELS = 2**30
"""Larger than any clinical CT (512 x 512 x 4096 is half of it)."""
WORKING_COPIES = 4
"""float32 copies of a volume the read + resample path holds at its peak (measured, see docs)."""


def check_size(where: str, shape: Sequence[int], max_voxels: int, max_bytes: int | None) -> None:
    """Reject a volume from its header alone, before any voxel is read: more than ``max_voxels``
    voxels, or a decoded working size above ``max_bytes`` (None: no byte bound)."""
    n = 1
    for d in shape:
        if int(d) <= 0:
            raise Reject("bad_geometry", f"{where}: header shape {tuple(shape)} has an empty axis")
        n *= int(d)
    if n > max_voxels:
        raise Reject("too_large", f"{where}: header claims {tuple(int(d) for d in shape)} = {n:,} voxels "
                                  f"> data.max_voxels={max_voxels:,}")
    need = n * 4 * WORKING_COPIES
    if max_bytes is not None and need > max_bytes:
        raise Reject("too_large", f"{where}: {n:,} voxels need about {need / 2**30:.1f} GiB to read and "
                                  f"resample > data.worker_memory_mb={max_bytes // 2**20}")


class Reject(Exception):
    """A study that cannot be used; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Volume:
    array: np.ndarray            # float32 HU, shape (i, j, k)
    affine: np.ndarray           # 4x4, voxel -> RAS mm
    meta: dict[str, Any] = field(default_factory=dict)


def check_ct_values(arr: np.ndarray, where: str) -> None:
    """Reject arrays whose value range cannot be Hounsfield units of a CT."""
    if arr.size == 0:
        raise Reject("bad_geometry", f"{where}: empty image")
    if not np.isfinite(arr).all():
        raise Reject("unreadable", f"{where}: image contains NaN/inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo > -500 or hi > 40000 or hi - lo < 200:
        raise Reject("not_ct", f"{where}: value range [{lo:.0f}, {hi:.0f}] is not Hounsfield units "
                               "(a CT has air near -1000 HU)")


# ----------------------------------------------------------------------------------------- NIfTI
def read_nifti(path: str | Path, rescale: tuple[float, float] | None = None,
               spacing_override: Sequence[float] | None = None, min_slices: int = 1,
               max_voxels: int = DEFAULT_MAX_VOXELS, max_bytes: int | None = None) -> Volume:
    """Load a NIfTI volume. ``rescale=(slope, intercept)`` is applied to the *stored* values
    (CT-RATE keeps them in its metadata CSV); ``spacing_override`` replaces the voxel sizes
    while keeping the header's axis directions. Fewer than ``min_slices`` along the
    superior-inferior axis (the axis closest to it) is rejected, as for DICOM. The header's
    shape is checked against ``max_voxels`` / ``max_bytes``, and against the file's size (or, for
    .nii.gz, the size gzip records), before any voxel is read."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise Reject("missing_image", f"{path}: no such file")
    try:
        img = nib.load(str(path))               # reads the header only
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for corrupt headers
        raise Reject("unreadable", f"{path}: {type(e).__name__}: {e}") from e
    check_size(str(path), img.shape[:3] if len(img.shape) >= 3 else img.shape, max_voxels, max_bytes)
    dtype = np.dtype(img.header.get_data_dtype())
    if dtype.kind not in "iuf" or dtype.names is not None:
        raise Reject("unreadable", f"{path}: data type {dtype} is not an intensity type (integer or float)")
    _check_data_size(path, img)
    try:
        if rescale is not None:
            arr = np.asarray(img.dataobj.get_unscaled(), dtype=np.float32)
            arr = arr * float(rescale[0]) + float(rescale[1])
        else:
            arr = np.asarray(img.get_fdata(dtype=np.float32))
    except MemoryError as e:
        raise Reject("too_large", f"{path}: out of memory while reading: {e}") from e
    except (EOFError, zlib.error) as e:
        raise Reject("truncated", f"{path}: {type(e).__name__}: {e}") from e
    except Exception as e:  # nibabel raises many types for corrupt headers
        msg = str(e)
        reason = "truncated" if ("truncat" in msg.lower() or "end of file" in msg.lower()
                                 or "buffer" in msg.lower()) else "unreadable"
        raise Reject(reason, f"{path}: {type(e).__name__}: {msg}") from e
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise Reject("bad_geometry", f"{path}: expected a 3D volume, got shape {arr.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if spacing_override is not None:
        cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        affine = affine.copy()
        affine[:3, :3] = cols * np.asarray(spacing_override, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise Reject("bad_geometry", f"{path}: singular or non-finite affine")
    codes = nib.aff2axcodes(affine)
    si = [i for i, c in enumerate(codes) if c in "SI"]
    n_slices = arr.shape[si[0]] if si else min(arr.shape)
    if n_slices < min_slices:
        raise Reject("too_few_slices", f"{path}: {n_slices} slices < min_slices={min_slices}")
    check_ct_values(arr, str(path))
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return Volume(arr, affine, {"source_format": "nifti", "source_shape": list(arr.shape),
                                "source_spacing": [round(float(z), 4) for z in zooms],
                                "source_axcodes": "".join(nib.aff2axcodes(affine))})


def _check_data_size(path: Path, img) -> None:
    """The bytes the header promises against what the file holds (gzip stores the uncompressed
    size mod 2^32 in its last 4 bytes): a lying header or a cut file is rejected unread."""
    import struct

    hdr = img.header
    try:
        offset = max(int(hdr.get_data_offset()), int(getattr(hdr, "single_vox_offset", 0)))
        need = offset + int(np.prod(img.shape)) * np.dtype(hdr.get_data_dtype()).itemsize
    except (TypeError, ValueError) as e:
        raise Reject("unreadable", f"{path}: header: {e}") from e
    size = path.stat().st_size
    if path.name.endswith(".gz"):
        if size < 18:
            raise Reject("truncated", f"{path}: {size} bytes is not a gzip file")
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = struct.unpack("<I", f.read(4))[0]
        if need < 2**32 and isize < need:      # (ISIZE is mod 2^32: larger files are bounded by max_voxels)
            raise Reject("truncated", f"{path}: gzip holds {isize:,} bytes but the header needs {need:,}: "
                                      "truncated file or lying header")
    elif size < need:
        raise Reject("truncated", f"{path}: {size:,} bytes < {need:,} the header needs")


# ----------------------------------------------------------------------------------------- DICOM
def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    if path.name.endswith((".nii", ".nii.gz", ".json", ".csv", ".txt", ".md")):
        return False
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(132)
            return head[128:132] == b"DICM"
        except OSError:
            return False
    return False


def list_dicom_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_dicom(p))


def _series_key(ds) -> tuple:
    iop = tuple(round(float(v), 3) for v in getattr(ds, "ImageOrientationPatient", []) or [])
    return (str(getattr(ds, "SeriesInstanceUID", "") or ""), str(getattr(ds, "SeriesNumber", "")),
            iop, int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0)))


def read_dicom_series(files: Sequence[str | Path], min_slices: int = 16,
                      max_spacing_jitter_mm: float = 0.05, max_tilt_deg: float = 30.0,
                      max_voxels: int = DEFAULT_MAX_VOXELS, max_bytes: int | None = None) -> Volume:
    """Stack one CT series. Groups files into series and keeps the largest (others are listed in
    meta), sorts slices by position along the slice normal, applies rescale slope/intercept,
    and corrects gantry tilt with a sheared affine (resampling then lands it on a regular grid).
    Uneven slice gaps, missing orientation, non-CT modality and too few slices are rejected."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [Path(f) for f in files]
    if not files:
        raise Reject("missing_image", "no DICOM files")
    where = str(files[0].parent)
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError) as e:
            raise Reject("unreadable", f"{f}: {type(e).__name__}: {e}") from e
        headers.append((f, ds))
    groups: dict[tuple, list] = {}
    for f, ds in headers:
        groups.setdefault(_series_key(ds), []).append((f, ds))
    series = max(groups.values(), key=len)
    skipped = sum(len(g) for g in groups.values() if g is not series)
    ds0 = series[0][1]
    modality = str(getattr(ds0, "Modality", ""))
    if modality and modality != "CT":
        raise Reject("not_ct", f"{where}: Modality is {modality!r}, not 'CT'")
    if len(series) < min_slices:
        raise Reject("too_few_slices", f"{where}: {len(series)} slices < min_slices={min_slices}")
    try:
        check_size(where, (int(ds0.Rows), int(ds0.Columns), len(series)), max_voxels, max_bytes)
    except (AttributeError, TypeError, ValueError) as e:
        raise Reject("bad_geometry", f"{where}: no usable Rows/Columns: {e}") from e
    try:
        iop = np.array([float(v) for v in ds0.ImageOrientationPatient], dtype=np.float64)
        row_dir, col_dir = iop[:3], iop[3:]
        normal = np.cross(row_dir, col_dir)
        ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in series])
        px = [float(v) for v in ds0.PixelSpacing]  # [row spacing, column spacing]
    except (AttributeError, TypeError, ValueError) as e:
        raise Reject("bad_geometry", f"{where}: missing orientation/position/spacing: {e}") from e
    order = np.argsort(ipps @ normal)
    ipps = ipps[order]
    series = [series[i] for i in order]
    pos = ipps @ normal
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise Reject("inconsistent_spacing", f"{where}: duplicate slice positions along the normal")
    if gaps.max() - gaps.min() > max_spacing_jitter_mm:
        raise Reject("inconsistent_spacing",
                     f"{where}: slice gaps along the normal range {gaps.min():.3f}-{gaps.max():.3f} mm "
                     f"(> {max_spacing_jitter_mm} mm jitter); cannot stack on one regular grid")
    step = (ipps[-1] - ipps[0]) / (len(series) - 1)
    residual = np.abs(ipps - (ipps[0] + np.outer(np.arange(len(series)), step))).max()
    if residual > max(0.1, max_spacing_jitter_mm):
        raise Reject("inconsistent_spacing", f"{where}: slice positions are not on a line "
                                             f"(max deviation {residual:.2f} mm)")
    cos_t = float(abs(step @ normal) / np.linalg.norm(step))
    tilt = math.degrees(math.acos(min(1.0, cos_t)))
    if tilt > max_tilt_deg:
        raise Reject("gantry_tilt", f"{where}: tilt {tilt:.1f} deg > max_gantry_tilt_deg={max_tilt_deg}")
    slices = []
    for f, _ in series:
        try:
            ds = pydicom.dcmread(str(f))
            arr = ds.pixel_array.astype(np.float32)
        except MemoryError as e:
            raise Reject("too_large", f"{f}: out of memory while reading: {e}") from e
        except Exception as e:  # truncated pixel data, missing decoder, ...
            msg = f"{f}: {type(e).__name__}: {e}"
            low = msg.lower()
            reason = "truncated" if ("truncat" in low or "expected" in low or "length" in low
                                     or "end of" in low) else "unreadable"
            raise Reject(reason, msg) from e
        if arr.shape != (int(ds0.Rows), int(ds0.Columns)):
            raise Reject("bad_geometry", f"{f}: slice shape {arr.shape} differs from the series")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        slices.append(arr * slope + inter)
    vol = np.stack(slices, axis=0).transpose(2, 1, 0)  # (k, rows, cols) -> (i=col, j=row, k)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * px[1]
    lps[:3, 1] = col_dir * px[0]
    lps[:3, 2] = step
    lps[:3, 3] = ipps[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    check_ct_values(vol, where)
    meta = {"source_format": "dicom", "source_shape": list(vol.shape),
            "source_spacing": [px[1], px[0], round(float(np.linalg.norm(step)), 4)],
            "slice_gap_mm": round(float(gaps.mean()), 4), "gantry_tilt_deg": round(tilt, 3),
            "tilt_corrected": bool(tilt > 0.01), "n_files": len(files), "skipped_other_series": skipped,
            "transfer_syntax": str(getattr(getattr(ds0, "file_meta", None), "TransferSyntaxUID", ""))}
    return Volume(vol.astype(np.float32), affine, meta)


def read_volume(ref: str | Path | Sequence[str | Path], **kw) -> Volume:
    """A NIfTI path, a DICOM folder or a list of DICOM files."""
    if isinstance(ref, (list, tuple)):
        return read_dicom_series(ref, **{k: v for k, v in kw.items() if k in _DICOM_KW})
    p = Path(ref)
    if p.is_dir():
        files = list_dicom_files(p)
        if not files:
            raise Reject("missing_image", f"{p}: folder holds no DICOM files")
        return read_dicom_series(files, **{k: v for k, v in kw.items() if k in _DICOM_KW})
    if p.name.endswith((".nii", ".nii.gz")):
        return read_nifti(p, **{k: v for k, v in kw.items() if k in _NIFTI_KW})
    if not p.exists():
        raise Reject("missing_image", f"{p}: no such file or folder")
    raise Reject("unreadable", f"{p}: not a NIfTI file (.nii/.nii.gz) or DICOM folder")


_DICOM_KW = ("min_slices", "max_spacing_jitter_mm", "max_tilt_deg", "max_voxels", "max_bytes")
_NIFTI_KW = ("rescale", "spacing_override", "min_slices", "max_voxels", "max_bytes")


def read_mask(path: str | Path, shape: Sequence[int]) -> np.ndarray:
    """An integer label map (NIfTI) that must lie on the image's voxel grid ``shape``."""
    import nibabel as nib

    try:
        arr = np.asarray(nib.load(str(path)).dataobj)
    except Exception as e:  # noqa: BLE001 - any reader failure is this study's reject
        raise Reject("unreadable", f"{path}: mask: {type(e).__name__}: {e}") from e
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise Reject("bad_geometry", f"{path}: mask shape {arr.shape} != image {tuple(shape)}")
    return arr
