"""Fuzz: a corpus of malformed inputs made here, through the folder importer and the one-volume CLI.
Nothing crashes, every input is accounted for with a reason that names it, memory stays bounded."""
from __future__ import annotations

import gzip
import json
import os
import resource

import nibabel as nib
import numpy as np
import pytest

from data_service import ingest
from data_service.io import REASONS, Reject


def _ct(shape=(40, 40, 24)) -> np.ndarray:
    a = np.full(shape, -1000, np.int16)
    a[8:32, 8:32, 4:20] = 40
    a[18:22, 18:22, 4:20] = 700
    return a


def _dicom_series(folder, n=20, modality="CT", drop=(), size=32):
    """A small synthetic CT series written with pydicom (``drop``: tags to leave out)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    vol = _ct((size, size, n))
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        values = {"Modality": modality, "SeriesInstanceUID": series, "SOPClassUID": CTImageStorage,
                  "SOPInstanceUID": meta.MediaStorageSOPInstanceUID, "Rows": size, "Columns": size,
                  "PixelSpacing": [1.0, 1.0], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                  "ImagePositionPatient": [0.0, 0.0, 2.0 * k], "SliceThickness": 2.0, "SamplesPerPixel": 1,
                  "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15,
                  "PixelRepresentation": 1, "RescaleSlope": 1, "RescaleIntercept": 0, "InstanceNumber": k + 1}
        for tag, v in values.items():
            if tag not in drop:
                setattr(ds, tag, v)
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def _corpus(root):
    """(id, image path relative to root) for every malformed input; one good study of each kind too."""
    cases = []

    def nifti(name, arr, affine=None, gz=True, header=None):
        img = nib.Nifti1Image(arr, np.diag([2.0, 2.0, 4.0, 1.0]) if affine is None else affine, header)
        p = root / (name + (".nii.gz" if gz else ".nii"))
        nib.save(img, str(p))
        return p

    good = nifti("good", _ct())
    cases.append(("good_nifti", good.name))
    data = good.read_bytes()
    for off in (0, 10, 100, 348, 352, 1000, len(data) // 2, len(data) - 4):       # truncated at many offsets
        (root / f"cut{off}.nii.gz").write_bytes(data[:off])
        cases.append((f"cut{off}", f"cut{off}.nii.gz"))
    raw = nifti("plain", _ct(), gz=False).read_bytes()
    for off in (200, 352, len(raw) // 3):
        (root / f"cutraw{off}.nii").write_bytes(raw[:off])
        cases.append((f"cutraw{off}", f"cutraw{off}.nii"))
    for name, shape in (("bomb", (1200, 1200, 1000)), ("giga", (4000, 4000, 4000))):  # lying headers
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(shape)
        hdr.set_data_dtype(np.int16)
        (root / f"{name}.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\1" * 4096))
        cases.append((name, f"{name}.nii.gz"))
    f = _ct().astype(np.float64)
    f[0, 0, 0] = np.nan
    cases.append(("nan_values", nifti("nan_values", f).name))
    cases.append(("complex", nifti("complex", _ct().astype(np.complex64)).name))
    cases.append(("uint8", nifti("uint8", (np.arange(40 * 40 * 24) % 255).astype(np.uint8).reshape(40, 40, 24)).name))
    cases.append(("four_d", nifti("four_d", np.stack([_ct()] * 3, -1)).name))
    cases.append(("two_d", nifti("two_d", _ct()[:, :, 0]).name))
    def raw_header(name, mutate):
        """A good image whose header is then edited by hand (nibabel refuses to write these)."""
        arr = _ct()
        hdr = nib.Nifti1Image(arr, np.diag([2.0, 2.0, 4.0, 1.0])).header.copy()
        hdr.set_data_dtype(np.int16)
        mutate(hdr)
        (root / f"{name}.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + arr.tobytes(order="F")))
        return f"{name}.nii.gz"

    def zero_spacing(h):
        h["pixdim"][2] = 0.0
        h["srow_y"][1] = 0.0
        h["qform_code"] = 0

    def nan_affine(h):
        h["srow_x"][3] = np.nan
        h["qform_code"] = 0

    cases.append(("zero_spacing", raw_header("zero_spacing", zero_spacing)))
    cases.append(("nan_affine", raw_header("nan_affine", nan_affine)))
    (root / "empty.nii.gz").write_bytes(b"")
    cases.append(("empty_file", "empty.nii.gz"))
    (root / "noise.nii.gz").write_bytes(os.urandom(5000))
    cases.append(("random_bytes", "noise.nii.gz"))
    cases.append(("good_dicom", _dicom_series(root / "dcm_good").name))
    cases.append(("mr_dicom", _dicom_series(root / "dcm_mr", modality="MR").name))
    cases.append(("no_position", _dicom_series(root / "dcm_nopos", drop=("ImagePositionPatient",)).name))
    cases.append(("no_spacing", _dicom_series(root / "dcm_nospacing", drop=("PixelSpacing",)).name))
    cut = _dicom_series(root / "dcm_cut")
    victim = sorted(cut.glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:600])
    cases.append(("dicom_truncated", cut.name))
    junk = root / "dcm_junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(os.urandom(3000))
    cases.append(("dicom_junk", junk.name))
    loop = root / "dcm_loop"
    loop.mkdir()
    os.symlink(loop, loop / "self")                                          # a symlink loop
    cases.append(("symlink_loop", loop.name))
    (root.parent / "outside.nii.gz").write_bytes(data)
    cases.append(("outside", "../outside.nii.gz"))                           # leaves the input folder
    cases.append(("missing", "nope.nii.gz"))
    return cases


@pytest.mark.timeout(900)
def test_malformed_inputs_are_accounted_for(tmp_path, debug_cfg):
    root = tmp_path / "in"
    root.mkdir()
    cases = _corpus(root)
    rows = ["id,image,report,split"] + [f"{cid},{img},Findings: case {cid}.,train" for cid, img in cases]
    (root / "reports.csv").write_text("\n".join(rows) + "\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    man = ingest.run("folder", str(root), str(tmp_path / "out"), debug_cfg.data, workers=2, progress=False)
    c = man["counts"]
    assert c["in"] == len(cases) == c["written"] + c["rejected"]
    rejects = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    written = set(cases_ids := [cid for cid, _ in cases]) - set(rejects)
    # a .nii.gz cut inside its 8-byte gzip trailer still holds every voxel: it is read, not rejected
    trailer_cut = f"cut{len((root / 'good.nii.gz').read_bytes()) - 4}"
    assert written == {"good_nifti", "good_dicom", trailer_cut}, (written, rejects)
    for cid, r in rejects.items():
        assert r["reason"] in REASONS and r["detail"], r
        img = dict(cases)[cid]
        assert os.path.basename(img.rstrip("/")) in r["detail"] or cid in r["detail"], r
    assert {rejects[k]["reason"] for k in ("bomb", "giga")} == {"too_large"}
    assert rejects["outside"]["reason"] == "bad_path" and rejects["mr_dicom"]["reason"] == "not_ct"
    assert rejects["four_d"]["reason"] == "bad_geometry" and rejects["missing"]["reason"] == "missing_image"
    assert sorted(cases_ids) == sorted(written | set(rejects))
    # memory stays bounded: no worker grew anywhere near the bombs' claims
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss - before < 2 * 2**20    # KiB: < 2 GiB

    # the one-volume CLI: every bad input ends in a clear refusal naming the volume, never a traceback
    from evaluators import embed
    from tests.evaluators.test_tasks import _plain_export

    ck = _plain_export(tmp_path)
    for cid, img in cases:
        if cid in ("good_nifti", "good_dicom", "outside", trailer_cut):
            continue
        path = str(root / img)
        with pytest.raises(SystemExit) as e:
            embed.main(["--checkpoint", str(ck), "--volume", path, "--out", str(tmp_path / "e.npy")])
        assert "cannot use this volume" in str(e.value) and os.path.basename(path) in str(e.value), (cid, e.value)
    assert embed.main(["--checkpoint", str(ck), "--volume", str(root / "good.nii.gz"), "--out",
                       str(tmp_path / "e.npy")]) == 0


def test_reject_reasons_are_checked():
    with pytest.raises(ValueError, match="unknown reject reason"):
        Reject("nonsense", "x")
