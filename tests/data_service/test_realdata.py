"""Importers, orientation and resampling on real CT nobody here wrote (../shared/realdata)."""
from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_service.io import Reject, list_dicom_files, read_dicom_series, read_nifti, read_volume
from data_service.preprocess import CanonicalCT


def test_jpeg2000_dicom_lands_on_reference_grid(realdata):
    """The JPEG 2000 DICOM series and TotalSegmentator's reference NIfTI (LAS) of it share a grid:
    same canonical affine, and the reference labels sit on the right tissue."""
    vol = read_volume(realdata / "totalseg/example_ct_dicom", min_slices=16)
    assert vol.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    assert vol.array.shape == (512, 512, 20)
    seg = nib.load(str(realdata / "totalseg/example_seg_dicom.nii.gz"))
    assert "".join(nib.aff2axcodes(seg.affine)) == "LAS"
    canon = CanonicalCT([0.9765625, 0.9765625, 2.0], [512, 512, 20])
    hu, aff = canon(vol.array, vol.affine)
    lab = canon.mask(np.asarray(seg.dataobj), seg.affine)
    ref_aff = np.asarray(nib.as_closest_canonical(seg).affine)
    np.testing.assert_allclose(aff, ref_aff, atol=1e-3)
    mean = {k: float(hu[lab == k].mean()) for k in (0, 1, 5, 69, 70)}
    assert 30 < mean[1] < 150, mean   # spleen: soft tissue
    assert 40 < mean[5] < 150, mean   # liver: soft tissue
    assert mean[69] > 300 and mean[70] > 300, mean   # humeri: bone
    assert mean[0] < -500, mean       # background incl. air
    # sensitivity: the same check fails on a mis-stacked (flipped) series
    flipped = hu[:, ::-1, :]
    assert not (40 < float(flipped[lab == 5].mean()) < 150 and float(flipped[lab == 69].mean()) > 300)


def test_nifti_orientations_agree(realdata, tmp_path):
    """An LPS file and an RAS-reoriented copy of it give the same canonical volume."""
    src = realdata / "totalseg/pulmonary_report_ct_cropped.nii.gz"
    img = nib.load(str(src))
    assert "".join(nib.aff2axcodes(img.affine)) == "LPS"
    ras = nib.as_closest_canonical(img)
    nib.save(ras, str(tmp_path / "ras.nii.gz"))
    canon = CanonicalCT([2.0, 2.0, 4.0], [96, 96, 48])
    a, aa = canon(*(lambda v: (v.array, v.affine))(read_nifti(src)))
    b, ab = canon(*(lambda v: (v.array, v.affine))(read_nifti(tmp_path / "ras.nii.gz")))
    np.testing.assert_allclose(aa, ab, atol=1e-4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.allclose(np.diag(aa)[:3], [2.0, 2.0, 4.0])  # RAS, positive diagonal
    # and the reorientation is not a no-op: the raw arrays differ
    assert not np.array_equal(np.asarray(img.dataobj), np.asarray(ras.dataobj))


def test_canonical_world_positions_match_source(realdata):
    """Every output voxel samples the input at the same world point (RAS file, 3 mm)."""
    v = read_nifti(realdata / "totalseg/example_ct_sm.nii.gz")
    hu, aff = CanonicalCT([3.0, 3.0, 3.0], [128, 128, 32])(v.array, v.affine)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(5, s - 5, 300) for s in v.array.shape], 1)
    world = (v.affine @ np.c_[idx, np.ones(300)].T).T
    out_idx = np.rint((np.linalg.inv(aff) @ world.T).T[:, :3]).astype(int)
    got = hu[tuple(out_idx.T)]
    want = np.clip(v.array[tuple(idx.T)], -1024, 3071)
    assert np.median(np.abs(got - want)) < 1.0


def _ge_files(realdata):
    return sorted((realdata / "dcm_qa_ct/In/GE").glob("*.dcm"))


def test_gantry_tilted_series_rejected_with_reason(realdata):
    with pytest.raises(Reject) as e:
        read_dicom_series(_ge_files(realdata), min_slices=4)
    assert e.value.reason == "inconsistent_spacing"
    assert "1.081" in e.value.detail and "6.999" in e.value.detail


def test_gantry_tilt_corrected_on_even_part(realdata):
    """The first 14 GE slices are evenly spaced (4.22 mm along z) but tilted 18.5 deg: the sheared
    affine must put each source pixel at its true world position after resampling."""
    files = _ge_files(realdata)[:14]
    hdr = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    vol = read_dicom_series(files, min_slices=4)
    assert vol.meta["tilt_corrected"]
    assert abs(vol.meta["gantry_tilt_deg"] - float(hdr.GantryDetectorTilt)) < 0.2
    canon = CanonicalCT([1.0, 1.0, 1.0], [260, 260, 80])
    hu, aff = canon(vol.array, vol.affine)
    assert np.allclose(aff[:3, :3], np.diag([1.0, 1.0, 1.0]))
    # the same slices stacked as if untilted (step along the slice normal) misplace the anatomy
    untilted = vol.affine.copy()
    n = np.cross(untilted[:3, 0], untilted[:3, 1])
    untilted[:3, 2] = n / np.linalg.norm(n) * 4.0 * np.sign(n @ untilted[:3, 2])
    hu2, aff2 = canon(vol.array, untilted)
    # independent world positions straight from the DICOM headers (LPS -> RAS)
    rng = np.random.default_rng(1)
    errs = {"tilted": [], "untilted": []}
    for f in files[2:12]:
        ds = pydicom.dcmread(str(f))
        px = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ipp = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(x) for x in ds.PixelSpacing)
        for _ in range(80):
            r, c = rng.integers(100, 412, 2)
            lps = ipp + c * dc * iop[:3] + r * dr * iop[3:]
            ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
            want = float(np.clip(px[r, c], -1024, 3071))
            for name, h, a in (("tilted", hu, aff), ("untilted", hu2, aff2)):
                o = np.rint((np.linalg.inv(a) @ ras)[:3]).astype(int)
                if np.all(o >= 0) and np.all(o < h.shape):
                    errs[name].append(abs(float(h[tuple(o)]) - want))
    assert len(errs["tilted"]) > 300
    med = {k: float(np.median(v)) for k, v in errs.items()}
    assert med["tilted"] < 40, med
    assert med["untilted"] > 2 * med["tilted"], med


def test_too_few_and_noncontiguous_slices_rejected(realdata):
    with pytest.raises(Reject) as e:
        read_volume(realdata / "monai_ct_dicom", min_slices=16)
    assert e.value.reason == "too_few_slices"
    with pytest.raises(Reject) as e:
        read_volume(realdata / "monai_ct_dicom", min_slices=2)
    assert e.value.reason == "inconsistent_spacing"


def test_truncated_real_files_rejected(realdata, tmp_path):
    data = (realdata / "totalseg/example_ct_sm.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(Reject) as e:
        read_nifti(tmp_path / "cut.nii.gz")
    assert e.value.reason in ("truncated", "unreadable") and "cut.nii.gz" in e.value.detail
    d = tmp_path / "dcm"
    shutil.copytree(realdata / "totalseg/example_ct_dicom", d)
    victim = list_dicom_files(d)[7]
    victim.write_bytes(victim.read_bytes()[:3000])
    with pytest.raises(Reject) as e:
        read_volume(d, min_slices=16)
    assert e.value.reason in ("truncated", "unreadable") and victim.name in e.value.detail


def test_not_ct_rejected(tmp_path):
    img = nib.Nifti1Image(np.random.default_rng(0).integers(0, 255, (32, 32, 32)).astype(np.uint8), np.eye(4))
    nib.save(img, str(tmp_path / "mr.nii.gz"))
    with pytest.raises(Reject) as e:
        read_nifti(tmp_path / "mr.nii.gz")
    assert e.value.reason == "not_ct"


@pytest.mark.parametrize("case", ["lps_crop", "tilted", "mask"])
def test_lazy_single_resample_equals_eager_resample_then_crop(realdata, case):
    """CanonicalCT applies Spacing + the centred pad/crop as one lazy resample onto the target grid.
    It must give what resampling the whole field and then cropping gives: the same affine and the
    same values everywhere except the one-voxel rim at the edge of the source field (there the lazy
    path blends the edge voxel with the air padding, eager pads hard). Checked on a grid that
    crops in-plane and pads along z, for an LPS file, the sheared GE series and a label mask."""
    from scipy.ndimage import binary_erosion

    canon = CanonicalCT([1.0, 1.0, 4.0], [200, 160, 40])
    nearest = case == "mask"
    if case == "tilted":
        v = read_dicom_series(_ge_files(realdata)[:14], min_slices=4)
        arr, aff = v.array, v.affine
    elif case == "mask":
        seg = nib.load(str(realdata / "totalseg/example_seg.nii.gz"))
        arr, aff = np.asarray(seg.dataobj).astype(np.float32), seg.affine
    else:
        v = read_nifti(realdata / "totalseg/pulmonary_report_ct_cropped.nii.gz")
        arr, aff = v.array, v.affine
    x = arr.astype(np.float32) - (0.0 if nearest else 1024.0)
    lazy, lazy_aff = canon._grid(x, aff, nearest=nearest, lazy=True)
    eager, eager_aff = canon._grid(x, aff, nearest=nearest, lazy=False)
    assert lazy.shape == eager.shape == (200, 160, 40)
    np.testing.assert_allclose(lazy_aff, eager_aff, atol=1e-6)
    field, _ = canon._grid(np.ones_like(x), aff, nearest=False, lazy=False)
    inside = binary_erosion(field > 0.999, iterations=2)
    assert inside.mean() > 0.05 and (~inside).mean() > 0.05        # the grid both crops and pads
    content = np.unique(eager[inside]).size > 5
    assert content                                                  # real data inside the field
    if nearest:   # a tie at exactly half a voxel may round either way with float32 coordinates
        assert (lazy[inside] != eager[inside]).mean() < 1e-4
    else:
        # float32 sampling coordinates: within 0.05 HU (the output is rounded to whole HU)
        np.testing.assert_allclose(lazy[inside], eager[inside], atol=0.05)
    far = binary_erosion(field < 1e-6, iterations=2)
    np.testing.assert_allclose(lazy[far], 0.0, atol=1e-6)           # well outside: air (0 after the shift)
    np.testing.assert_allclose(eager[far], 0.0, atol=1e-6)
