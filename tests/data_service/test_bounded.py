"""Bad input at scale: lying headers and bombs are rejected unread, memory is capped per worker,
a worker that dies costs one study (not the run), and non-UTF-8 report text is decoded, declared."""
from __future__ import annotations

import dataclasses
import gzip
import json
import resource
import shutil
import time

import nibabel as nib
import numpy as np
import pytest

from data_service import ingest
from data_service.io import Reject, read_nifti
from data_service.shards import iter_split


def _rejects(out):
    return {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def _lying_nifti(path, shape, payload: bytes):
    """A NIfTI header claiming ``shape`` (int16) followed by ``payload`` bytes of data, gzipped."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.eye(4), 1)
    raw = hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)) + payload
    path.write_bytes(gzip.compress(raw, compresslevel=1))
    return path


def test_header_bombs_are_rejected_unread(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for shape in ((4000, 4000, 4000), (1200, 1200, 1000)):       # 64 G voxels over 1 KB; 1.4 G voxels
        with pytest.raises(Reject) as e:
            read_nifti(_lying_nifti(tmp_path / f"{shape[0]}.nii.gz", shape, b"\1" * 1024))
        assert e.value.reason == "too_large" and f"{shape[0]}, {shape[1]}, {shape[2]}" in e.value.detail
        assert "data.max_voxels" in e.value.detail
    # a header smaller than the limit but larger than the data: the gzip size gives it away, unread
    with pytest.raises(Reject) as e:
        read_nifti(_lying_nifti(tmp_path / "short.nii.gz", (300, 300, 200), b"\1" * 4096))
    assert e.value.reason == "truncated" and "lying header" in e.value.detail
    # and the decoded size against the worker's memory
    with pytest.raises(Reject) as e:
        read_nifti(_lying_nifti(tmp_path / "big.nii.gz", (512, 512, 900), b""), max_bytes=1024 * 2**20)
    assert e.value.reason == "too_large" and "data.worker_memory_mb=1024" in e.value.detail
    assert time.perf_counter() - t < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024    # KiB: nothing allocated


def test_worker_memory_cap_fails_the_study_not_the_run(tmp_path, debug_cfg):
    """What slips past the header check (here the byte estimate is off: worker_memory_mb=0) meets
    the worker's RLIMIT_DATA: that study is rejected too_large, in its own worker."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from data_service.sources import Study

    vol = np.full((512, 512, 600), -1000, np.int16)
    vol[100:400, 100:400, 100:500] = 40
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 0.5, 1.0])), str(tmp_path / "big.nii"))
    study = dataclasses.asdict(Study("big", "p", "train", str(tmp_path / "big.nii"), "Findings: none."))
    data = dataclasses.replace(debug_cfg.data, worker_memory_mb=0)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=ingest.limit_memory,
                             initargs=(1200,)) as pool:
        sample, reject = pool.submit(ingest.encode_one, study, data).result()
    assert sample is None and reject["reason"] == "too_large" and "big.nii" in reject["detail"]
    # the same study with room to spare is fine
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=ingest.limit_memory,
                             initargs=(6000,)) as pool:
        sample, reject = pool.submit(ingest.encode_one, study, data).result()
    assert reject is None and sample["__key__"] == "big"


def test_a_dying_worker_costs_one_study(tmp_path, phantom, debug_cfg):
    """A study whose worker process dies (twice) is rejected worker_crashed; its shard's other
    studies are written and the run finishes with in = written + rejected."""
    from tests.faults import encode_or_die

    root = tmp_path / "folder"
    root.mkdir()
    vols = sorted((phantom / "raw").glob("train/*/*/*.nii.gz"))[:3]
    rows = ["id,image,report,split"] + [f"{sid},{v},Findings: no acute abnormality.,train"
                                        for sid, v in zip(("a", "b_crash", "c"), vols)]
    (root / "reports.csv").write_text("\n".join(rows) + "\n")
    data = dataclasses.replace(debug_cfg.data, shard_size=8)
    man = ingest.run("folder", str(root), str(tmp_path / "out"), data, workers=2, progress=False, encode=encode_or_die)
    assert man["counts"]["in"] == 3 and man["counts"]["written"] == 2 and man["counts"]["rejected"] == 1
    rej = _rejects(tmp_path / "out")
    assert rej["b_crash"]["reason"] == "worker_crashed" and "died" in rej["b_crash"]["detail"]
    assert sorted(s["key"] for s in iter_split(tmp_path / "out", "train")) == ["a", "c"]


def test_latin1_report_is_decoded_and_declared(tmp_path, phantom, debug_cfg):
    root = tmp_path / "folder"
    root.mkdir()
    vols = sorted((phantom / "raw").glob("train/*/*/*.nii.gz"))[0:3:2]     # HU on disk (no CT-RATE intercept)
    head = "id,image,report,split\n".encode()
    good = f"a,{vols[0]},Derrame pleural bilateral.,train\n".encode("utf-8")
    latin = f"b,{vols[1]},Pequeño nódulo en el lóbulo superior.,train\n".encode("latin-1")
    (root / "reports.csv").write_bytes(head + good + latin)
    man = ingest.run("folder", str(root), str(tmp_path / "out"), debug_cfg.data, workers=1, progress=False)
    assert man["counts"]["written"] == 2 and man["counts"]["rejected"] == 0, (tmp_path / "out" / "rejects.jsonl").read_text()
    got = {s["key"]: s for s in iter_split(tmp_path / "out", "train")}
    assert got["b"]["report"] == "Pequeño nódulo en el lóbulo superior."
    assert got["b"]["meta"]["study"]["report_encoding"].startswith("cp1252")
    assert "report_encoding" not in got["a"]["meta"]["study"]


def test_malformed_index_csv_names_file_and_line(tmp_path):
    from data_service.sources import discover

    (tmp_path / "reports.csv").write_bytes(b"id,image,report\na,x.nii.gz,ok\nb,y.nii.gz," + b"x" * 200_000 + b"\n")
    with pytest.raises(ValueError, match=r"reports.csv: line 3: malformed CSV: field larger than field limit"):
        discover("folder", tmp_path)


def test_bounded_ingest_of_a_folder_with_a_bomb(tmp_path, phantom, debug_cfg):
    """The user's case: one decompression bomb among good studies; the run finishes, the bomb is a
    reject with its reason, the others are written."""
    root = tmp_path / "folder"
    root.mkdir()
    good = sorted((phantom / "raw").glob("train/*/*/*.nii.gz"))[0]
    shutil.copy(good, root / "good.nii.gz")
    _lying_nifti(root / "bomb.nii.gz", (1200, 1200, 1000), b"\0" * 4096)
    (root / "reports.csv").write_text("id,image,report,split\ng,good.nii.gz,Findings: normal.,train\n"
                                      "bomb,bomb.nii.gz,Findings: normal.,train\n")
    man = ingest.run("folder", str(root), str(tmp_path / "out"), debug_cfg.data, workers=2, progress=False)
    assert (man["counts"]["in"], man["counts"]["written"], man["counts"]["rejected"]) == (2, 1, 1)
    assert _rejects(tmp_path / "out")["bomb"]["reason"] == "too_large"
