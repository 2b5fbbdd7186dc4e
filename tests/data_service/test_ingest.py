"""Ingest: counts add up, rejects are explained, resume rewrites only missing shards, and every
importer layout reads."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest

from common.labels import FINDINGS
from data_service import ingest, synth
from data_service.shards import iter_split, load_manifest
from data_service.sources import discover


def _rejects(out):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.fixture()
def broken_ctrate(tmp_path):
    """8 phantoms, then: one truncated volume, one volume without a report."""
    raw = tmp_path / "raw"
    synth.generate(raw, n=8, seed=11, valid_fraction=0.25)
    vols = sorted(raw.glob("train/*/*/*.nii.gz"))
    data = vols[0].read_bytes()
    vols[0].write_bytes(data[: len(data) // 3])
    rep = raw / "radiology_text_reports/train_reports.csv"
    rows = list(csv.DictReader(open(rep)))
    rows = [r for r in rows if r["VolumeName"] != vols[1].name]
    with open(rep, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return raw, vols


def test_counts_rejects_and_resume(broken_ctrate, tmp_path, debug_cfg):
    raw, vols = broken_ctrate
    out = tmp_path / "shards"
    data = dataclasses.replace(debug_cfg.data, shard_size=2)   # never mutate the session config
    man = ingest.run("ctrate", str(raw), str(out), data, workers=2, progress=False)
    c = man["counts"]
    assert c["in"] == 8 and c["written"] == 6 and c["rejected"] == 2
    assert c["in"] == c["written"] + c["rejected"]
    rej = {r["id"]: r for r in _rejects(out)}
    assert rej[vols[0].name[:-7]]["reason"] == "truncated" and vols[0].name in rej[vols[0].name[:-7]]["detail"]
    assert rej[vols[1].name[:-7]]["reason"] == "missing_report"
    # resume: delete one shard, corrupt another's sidecar match; only those are rewritten
    shards = sorted(out.glob("*.tar"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-512])   # truncated tar from a "crash"
    man2 = ingest.run("ctrate", str(raw), str(out), data, workers=1, progress=False)
    assert man2["counts"] == man["counts"]
    assert [s["sha256"] for s in man2["shards"]] == [s["sha256"] for s in man["shards"]]
    for p in shards[2:]:
        assert p.stat().st_mtime_ns == mtimes[p.name], f"{p.name} was rewritten"
    assert shards[0].is_file() and shards[0].stat().st_mtime_ns != mtimes[shards[0].name]


def test_samples_on_canonical_grid(phantom, debug_cfg):
    man = load_manifest(phantom / "shards")
    assert man["counts"]["in"] == man["counts"]["written"] == 10
    assert set(man["counts"]["written_by_split"]) == {"train", "valid", "test"}
    seen = 0
    for split in ("train", "valid", "test"):
        for s in iter_split(phantom / "shards", split):
            seen += 1
            assert s["ct"].dtype == np.int16 and list(s["ct"].shape) == debug_cfg.data.size
            aff = np.array(s["meta"]["affine"])
            assert np.allclose(aff[:3, :3], np.diag(debug_cfg.data.spacing))
            assert s["mask"].shape == s["ct"].shape and set(np.unique(s["mask"])) <= {0, 1, 2, 3, 4}
            assert set(s["meta"]["labels"]) == set(FINDINGS)
            assert s["report"].startswith("Findings:")
            # lungs are air-filled, heart is soft tissue: the mask and the image agree
            assert np.median(s["ct"][s["mask"] == 1]) < -600
            assert 0 < np.median(s["ct"][s["mask"] == 2]) < 100
    assert seen == 10


def test_ctrate_metadata_rescale_applied(phantom):
    """Some phantoms store HU+1024 with the intercept only in the metadata CSV (as CT-RATE)."""
    raw_ids = set()
    for row in csv.DictReader(open(phantom / "raw/metadata/train_metadata.csv")):
        if row["RescaleIntercept"] == "-1024":
            raw_ids.add(row["VolumeName"][:-7])
    assert raw_ids
    for s in iter_split(phantom / "shards", "train"):
        if s["key"] in raw_ids:
            assert s["meta"]["read"]["rescale"] == [1.0, -1024.0]
        assert s["ct"].min() <= -1000 and np.median(s["ct"][s["mask"] == 1]) < -600


def test_folder_source_real_dicom_and_nifti(realdata, tmp_path, debug_cfg):
    """A hospital-style folder: real NIfTI, the real JPEG 2000 DICOM series, the tilted GE series,
    a non-contiguous series, a missing image; reports are real CT-RATE report texts."""
    root = tmp_path / "hospital"
    root.mkdir()
    shutil.copy(realdata / "totalseg/pulmonary_report_ct_cropped.nii.gz", root / "a.nii.gz")
    shutil.copytree(realdata / "totalseg/example_ct_dicom", root / "b_dicom")
    shutil.copytree(realdata / "dcm_qa_ct/In/GE", root / "c_tilted")
    shutil.copytree(realdata / "monai_ct_dicom", root / "d_tiny")
    reports = list(csv.DictReader(open(realdata / "ctclip_reports/train.csv", encoding="utf-8")))
    with open(root / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "report", "split", *FINDINGS])
        for i, (sid, img) in enumerate([("a", "a.nii.gz"), ("b", "b_dicom"), ("c", "c_tilted"),
                                        ("d", "d_tiny"), ("e", "missing.nii.gz")]):
            r = reports[i]
            w.writerow([sid, img, r["report_text"], "train", *[r[k] for k in FINDINGS]])
    data = debug_cfg.data
    man = ingest.run("folder", str(root), str(tmp_path / "out"), data, workers=1, progress=False)
    c = man["counts"]
    assert (c["in"], c["written"], c["rejected"]) == (5, 2, 3)
    rej = {r["id"]: r["reason"] for r in _rejects(tmp_path / "out")}
    assert rej == {"c": "inconsistent_spacing", "d": "too_few_slices", "e": "missing_image"}
    got = {s["key"]: s for s in iter_split(tmp_path / "out", "train")}
    assert got["b"]["meta"]["geometry"]["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    assert got["a"]["report"] == reports[0]["report_text"]   # embedded quotes survive
    assert got["a"]["meta"]["labels"]["Lung nodule"] == int(reports[0]["Lung nodule"])


def _copy_phantoms(src, n):
    return sorted(src.glob("*/*/*/*.nii.gz"))[:n]


def test_inspect_layout(tmp_path, phantom):
    root = tmp_path / "inspect"
    (root / "CTPA").mkdir(parents=True)
    vols = sorted((phantom / "raw").glob("train/*/*/*.nii.gz"))[:3]
    for i, v in enumerate(vols):
        shutil.copy(v, root / "CTPA" / f"imp{i}.nii.gz")
    (root / "Final_Impressions.csv").write_text(
        "impression_id,impressions\nimp0,No pulmonary embolism.\nimp1,Acute PE in the right lower lobe.\nimp2,\n")
    (root / "splits_20250611.tsv").write_text("impression_id\tsplit\nimp0\ttrain\nimp1\ttest\nimp2\tvalid\n")
    (root / "study_mapping_20250611.tsv").write_text("impression_id\tperson_id\nimp0\tp0\nimp1\tp1\nimp2\tp2\n")
    (root / "labels_20250611.tsv").write_text("impression_id\tpe_positive_nlp\nimp0\tFalse\nimp1\tTrue\n")
    studies, rejects = discover("inspect", root)
    assert [(s.id, s.split, s.patient_id) for s in studies] == [("imp0", "train", "p0"), ("imp1", "test", "p1")]
    assert studies[1].meta["inspect_labels"]["pe_positive_nlp"] == "True"
    assert rejects == [("imp2", "missing_report", rejects[0][2])]


def test_bimcvr_layout(tmp_path, phantom):
    root = tmp_path / "bimcvr"
    vols = sorted((phantom / "raw").glob("train/*/*/*.nii.gz"))[:3]
    paths = []
    for i, v in enumerate(vols):
        d = root / f"CT{i}" / "ct"
        d.mkdir(parents=True)
        shutil.copy(v, d / f"sub-{i}_ct.nii.gz")
        paths.append(f"CT{i}/ct/sub-{i}_ct.nii.gz")
    (root / "meta").mkdir()
    (root / "meta/curated_ct_report_path_En.csv").write_text(
        f"path,report_En\n{paths[0]},Bilateral ground glass opacities.\n{paths[1]},No findings.\n")
    studies, rejects = discover("bimcvr", root)
    assert len(studies) == 2 and studies[0].report == "Bilateral ground glass opacities."
    assert len(rejects) == 1 and rejects[0][1] == "missing_report" and "CT2" in rejects[0][2]
    with pytest.raises(ValueError, match="no report column"):
        (root / "meta/curated_ct_report_path_En.csv").write_text(f"path,texto\n{paths[0]},x\n")
        discover("bimcvr", root)


def test_bad_source_and_input_errors(tmp_path):
    with pytest.raises(ValueError, match="--source 'nope'"):
        discover("nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a CT-RATE layout"):
        discover("ctrate", tmp_path)
    from data_service import ingest

    with pytest.raises(SystemExit, match=f"ingest: --input {tmp_path / 'absent'}: not a folder"):   # the CLI: no traceback
        ingest.main(["--source", "ctrate", "--input", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_engine_same_output(phantom, tmp_path, debug_cfg):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        man = ingest.run("ctrate", str(phantom / "raw"), str(tmp_path / "rs"), debug_cfg.data,
                         engine="ray", progress=False)
    finally:
        ray.shutdown()
    ref = load_manifest(phantom / "shards")
    assert man["counts"] == ref["counts"]
    assert [s["sha256"] for s in man["shards"]] == [s["sha256"] for s in ref["shards"]]
