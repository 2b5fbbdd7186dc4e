"""The external phantom generator (data_service.synth_ext): its CT-RATE layout ingests, what the
labels say is in the voxels, HU are plausible, cases are deterministic, and its reports share no
sentence with data_service.synth's wording banks."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.labels import FINDINGS
from common.text import split_sentences
from data_service import ingest, synth
from data_service import synth_ext as ext
from data_service.shards import iter_split, load_manifest

REPO = Path(__file__).resolve().parents[2]
SEED, N, SCALE = 7, 8, 1.5          # 8 cases at 1.5x coarser voxels: ~0.4 s each on one core


@pytest.fixture(scope="module")
def ext_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_ext")
    counts = ext.generate(root / "raw", n=N, seed=SEED, valid_fraction=0.25, voxel_scale=SCALE)
    assert counts == {"train": 6, "valid": 2}
    return root


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _volume(raw: Path, name: str):
    """(HU, mask) of one written case in RAS voxel order, read the way ingest reads it."""
    split = name.split("_")[0]
    pid = "_".join(name.split("_")[:2])
    meta = {r["VolumeName"]: r for r in _csv(raw / "metadata" / f"{'train' if split == 'train' else 'validation'}_metadata.csv")}
    img = nib.load(str(raw / split / pid / f"{pid}_a" / name))
    seg = nib.load(str(raw / "segmentations" / split / pid / f"{pid}_a" / name))
    ornt = nib.orientations.io_orientation(img.affine)          # -> RAS voxel order
    hu = np.asarray(img.dataobj.get_unscaled(), np.float32) + float(meta[name]["RescaleIntercept"])
    return (nib.orientations.apply_orientation(hu, ornt),
            nib.orientations.apply_orientation(np.asarray(seg.dataobj, np.uint8), ornt))


def test_layout_ingests(ext_raw):
    raw, out = ext_raw / "raw", ext_raw / "shards"
    rc = ingest.main(["--source", "ctrate", "--input", str(raw), "--out", str(out),
                      "--config", str(REPO / "configs" / "debug.yaml"), "--workers", "1", "--no-progress"])
    assert rc == 0
    man = load_manifest(out)
    assert man["counts"]["in"] == man["counts"]["written"] == N and man["counts"]["rejected"] == 0
    assert set(man["counts"]["written_by_split"]) <= {"train", "valid", "test"}
    assert man["counts"]["written_by_split"]["train"] == 6
    labels = {}
    for lab in ("train_predicted_labels.csv", "valid_predicted_labels.csv"):
        labels.update({r["VolumeName"][: -len(".nii.gz")]: {k: int(r[k]) for k in FINDINGS}
                       for r in _csv(raw / "multi_abnormality_labels" / lab)})
    seen = 0
    for split in man["counts"]["written_by_split"]:
        for s in iter_split(out, split):
            seen += 1
            assert s["meta"]["labels"] == labels[s["meta"]["id"]]
            assert s["report"].startswith("Findings:") and "\nImpression:" in s["report"]
            assert set(np.unique(s["mask"])) == {0, 1, 2, 3, 4}
            ct, m = s["ct"], s["mask"]
            # every storage mode (plain HU, raw + intercept, header-scaled) reads back as HU
            assert -950 < np.median(ct[m == 1]) < -600
            assert -40 < np.median(ct[m == 2]) < 80
            assert np.median(ct[m == 4]) > 150
    assert seen == N
    # the metadata exercises both intercepts, and more than one orientation is written
    meta = _csv(raw / "metadata" / "train_metadata.csv") + _csv(raw / "metadata" / "validation_metadata.csv")
    assert {r["RescaleIntercept"] for r in meta} == {"0", "-1024"}
    axcodes = {"".join(nib.aff2axcodes(nib.load(str(p)).affine)) for p in raw.glob("*/*/*/*.nii.gz")}
    assert len(axcodes) > 1


def test_labels_csv_is_what_was_planted(ext_raw):
    raw = ext_raw / "raw"
    rows = _csv(raw / "multi_abnormality_labels" / "train_predicted_labels.csv") + \
        _csv(raw / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    assert len(rows) == N
    for r in rows:
        idx = int(r["VolumeName"].split("_")[1]) - 1
        planted = ext._case_findings(SEED, idx, 0.35)
        assert {k: int(r[k]) for k in FINDINGS} == {k: planted.get(k, 0) for k in FINDINGS}
        # a planted calcification puts voxels above 200 HU inside the aorta's mask, and only then
        hu, m = _volume(raw, r["VolumeName"])
        bright = int((hu[m == 3] > 200).sum())
        assert (bright > 0) == bool(planted["Arterial wall calcification"]), (r["VolumeName"], bright)


@pytest.fixture(scope="module")
def toggles():
    """One patient rendered with no finding, then with each finding alone: each finding draws from
    its own generator, so the differences are that finding's."""
    idx = 3
    none = {f: 0 for f in ext.PLANTED}
    base = ext.make_case(SEED, idx, none, SCALE, tissue=True)
    return base, {f: ext.make_case(SEED, idx, dict(none, **{f: 1}), SCALE, tissue=True) for f in ext.PLANTED}


def _ml(n, det):
    return n * float(np.prod(det["spacing"])) / 1000.0


def _ctr(mask, spacing):
    """Cardiothoracic ratio from the mask: widest heart / widest lung-to-lung span."""
    def width(sel):
        cols = np.flatnonzero(sel.any(axis=(1, 2)))
        return (cols.max() - cols.min() + 1) * spacing[0]
    lung_w = max(width((mask == 1)[:, :, k:k + 1]) for k in range(mask.shape[2]) if (mask[:, :, k] == 1).any())
    return width(mask == 2) / lung_w


def test_each_finding_is_in_the_voxels(toggles):
    (hu0, m0, d0, t0), cases = toggles
    sp = d0["spacing"]
    lung0 = m0 == 1
    # nodule: a dense focus inside the aerated lung
    hu, m, d, t = cases["Lung nodule"]
    assert 5 <= d["nodule"]["d"] <= 15 and d["nodule"]["lobe"] in ext._LOBE_IDS
    assert ((hu - hu0 > 150) & lung0).sum() >= 1        # partial volume: 5 mm on 3-4 mm voxels
    # calcification: > 200 HU inside the aorta mask, none without it
    hu, m, d, t = cases["Arterial wall calcification"]
    assert (hu0[m0 == 3] > 200).sum() == 0 and (hu[m == 3] > 200).sum() > 0
    assert (t == ext.CALC).any() and np.median(hu[t == ext.CALC]) > 130
    # consolidation: lung turned to soft-tissue density (several ml)
    hu, m, d, t = cases["Consolidation"]
    assert _ml(((hu - hu0 > 300) & lung0).sum(), d) > 2.0
    assert d["consolidation"]["pattern"] in ("lobar", "patchy", "multifocal")
    # hiatal hernia: a sac behind the heart near the midline, above the left dome
    hu, m, d, t = cases["Hiatal hernia"]
    diff = np.argwhere(np.abs(hu - hu0) > 80)
    assert _ml(len(diff), d) > 3.0
    G = ext._Grid(sp, hu.shape)
    cen = np.array([G.ax[a][diff[:, a]].mean() for a in range(3)])
    heart = np.argwhere(m0 == 2)
    h_cen = np.array([G.ax[a][heart[:, a]].mean() for a in range(3)])
    assert cen[1] < h_cen[1] and abs(cen[0] - h_cen[0]) < 60
    # pericardial effusion: fluid in a 20 mm shell round the heart
    hu, m, d, t = cases["Pericardial effusion"]
    shell = ndimage.binary_dilation(m == 2, iterations=max(1, int(20 / sp[0]))) & (m != 2)
    shell0 = ndimage.binary_dilation(m0 == 2, iterations=max(1, int(20 / sp[0]))) & (m0 != 2)
    fl, fl0 = ((hu > -15) & (hu < 35) & shell).sum(), ((hu0 > -15) & (hu0 < 35) & shell0).sum()
    assert _ml(fl - fl0, d) > 5.0
    # cardiomegaly: cardiothoracic ratio above 0.5 (the generator's own and one measured here)
    hu, m, d, t = cases["Cardiomegaly"]
    assert d["ctr"] > 0.5 and d0["ctr"] < 0.5
    assert _ctr(m, sp) > 0.5 and _ctr(m0, sp) < 0.5
    # pleural effusion: aerated lung replaced by fluid, and the lung mask shrinks
    hu, m, d, t = cases["Pleural effusion"]
    assert _ml(((hu0 < -500) & (hu > -40) & (hu < 60) & lung0).sum(), d) > 20
    assert (m == 1).sum() < lung0.sum()
    assert d["pleural"]["sides"] in ("left", "right", "bilateral")
    # emphysema: more lung below -950 HU
    hu, m, d, t = cases["Emphysema"]
    laa, laa0 = (hu[m == 1] < -950).mean(), (hu0[lung0] < -950).mean()
    assert laa - laa0 > 0.04, (laa, laa0)


def test_cardiomegaly_rule_holds_across_patients():
    for idx in range(6):
        for flag in (0, 1):
            f = dict({k: 0 for k in ext.PLANTED}, Cardiomegaly=flag)
            _, m, d = ext.make_case(11, idx, f, 2.0)
            assert (d["ctr"] > 0.5) == bool(flag), (idx, d["ctr"])
            assert (_ctr(m, d["spacing"]) > 0.5) == bool(flag), (idx, _ctr(m, d["spacing"]))


def test_hu_ranges_are_plausible():
    for idx in (0, 1):
        hu, m, d, t = ext.make_case(SEED, idx, {f: 0 for f in ext.PLANTED}, SCALE, tissue=True)
        med = {c: float(np.median(hu[t == c])) for c in (ext.AIR, ext.FAT, ext.SOFT, ext.LUNG, ext.BONE)}
        assert -1045 < med[ext.AIR] < -955
        assert -930 < med[ext.LUNG] < -770
        assert -135 < med[ext.FAT] < -60
        assert 15 < med[ext.SOFT] < 70
        assert med[ext.BONE] > 250 and np.percentile(hu[t == ext.BONE], 90) > 350
        assert -950 < np.median(hu[m == 1]) < -750 and 10 < np.median(hu[m == 3]) < 70


def test_deterministic_and_independent_of_workers(tmp_path):
    f = ext._case_findings(1, 4, 0.35)
    a, b = ext.make_case(1, 4, f, 3.0), ext.make_case(1, 4, f, 3.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    other = ext.make_case(2, 4, f, 3.0)[0]                      # another seed: another patient
    assert other.shape != a[0].shape or not np.array_equal(other, a[0])
    assert ext.main(["--out", str(tmp_path / "a"), "--n", "3", "--seed", "5", "--voxel-scale", "3"]) == 0
    ext.generate(tmp_path / "b", n=3, seed=5, voxel_scale=3.0, workers=2)
    for sub in ("radiology_text_reports", "multi_abnormality_labels", "metadata"):
        for p in sorted((tmp_path / "a" / sub).glob("*.csv")):
            assert p.read_bytes() == (tmp_path / "b" / sub / p.name).read_bytes(), p.name
    vols = sorted((tmp_path / "a").rglob("*.nii.gz"))
    assert len(vols) == 6       # 3 volumes + 3 masks
    for p in vols:
        q = tmp_path / "b" / p.relative_to(tmp_path / "a")
        assert np.array_equal(np.asarray(nib.load(str(p)).dataobj), np.asarray(nib.load(str(q)).dataobj))


def test_prevalence_and_independence():
    F = np.array([[ext._case_findings(0, i, 0.35)[f] for f in ext.PLANTED] for i in range(600)], float)
    assert np.all(np.abs(F.mean(0) - 0.35) < 0.06)
    c = np.corrcoef(F.T) - np.eye(len(ext.PLANTED))
    assert np.abs(c).max() < 0.12


# ------------------------------------------------------------------------------------ wording
def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9%]+", " ", s.lower()).strip()


def _bank_patterns(templates) -> list[re.Pattern]:
    """A template -> a regex over normalised sentences (each {field} any words)."""
    out = []
    for t in templates:
        parts = re.split(r"\{[^}]*\}", t)
        out.append(re.compile(r"\s*(\S.*?)\s*".join(re.escape(_norm(p)) for p in parts) + r"$"))
    return out


def _synth_patterns():
    texts = []
    for pos, neg, filler, names, normal in synth.BANKS.values():
        texts += [s for v in pos.values() for s in v] + [s for v in neg.values() for s in v]
        texts += list(filler) + list(names.values()) + [normal]
    return [p for t in texts for p in _bank_patterns([t])]


def _ext_templates(bank: str) -> list[str]:
    B = ext._BANK[bank]
    out = [s for v in B["pos"].values() for s in v] + [s for v in B["neg"].values() for s in v]
    out += list(B["imp"].values()) + list(B["normal"]) + [s for v in B["fill"].values() for s in v]
    return out


def _sentences(rep_csv: Path) -> list[str]:
    out = []
    for r in _csv(rep_csv):
        out += split_sentences(f"Findings: {r['Findings_EN']}\nImpression: {r['Impressions_EN']}")
    return out


def _many_reports(bank: str, n: int = 300) -> list[str]:
    """Reports over many random finding sets and details (no voxels), to reach every template."""
    r = np.random.default_rng(0)
    out = []
    for i in range(n):
        f = {k: int(r.random() < 0.5) for k in ext.PLANTED}
        det = {"ctr": r.uniform(0.38, 0.68), "aorta_mm": 31, "steatosis": bool(i % 5 == 0),
               "nodule": {"d": 9, "kind": str(r.choice(["solid", "part-solid"])), "lobe": str(r.choice(ext._LOBE_IDS))},
               "calcification": {"extent": str(r.choice(["a few", "scattered", "extensive"])), "sites": ["arch", "descending"]},
               "consolidation": {"pattern": str(r.choice(["lobar", "patchy", "multifocal"])), "lobes": ["lingula"],
                                 "air_bronchograms": bool(i % 2)},
               "hernia": {"size": "large", "d": 55, "air_fluid": bool(i % 3)}, "pericardial": {"thickness": 12},
               "pleural": {"sides": str(r.choice(["left", "right", "bilateral"])), "depth": 33},
               "emphysema": {"kind": "paraseptal", "severity": "severe", "laa": 30, "distribution": "subpleural"}}
        ftxt, imp = ext.make_report(np.random.default_rng(i), f, det, bank)
        out += split_sentences(f"Findings: {ftxt}\nImpression: {imp}")
    return out


def test_reports_share_no_sentence_with_synth(ext_raw):
    pats = _synth_patterns()
    raw = ext_raw / "raw"
    sents = _sentences(raw / "radiology_text_reports" / "train_reports.csv") + \
        _sentences(raw / "radiology_text_reports" / "validation_reports.csv")
    sents += _many_reports("first") + _many_reports("second")
    sents += [s for b in ext._BANK for t in _ext_templates(b) for s in split_sentences(t)]
    assert len(sents) > 1000
    for s in set(sents):
        hit = [p.pattern for p in pats if p.match(_norm(s))]
        assert not hit, f"{s!r} is a synth sentence ({hit[0]})"


def test_heldout_reports_use_the_second_bank(ext_raw):
    # the two banks never write the same sentence (same findings and details for both)
    assert not set(_many_reports("first")) & set(_many_reports("second"))
    # train reports are written in the first bank, held-out ones in the second (regenerated here)
    raw = ext_raw / "raw"
    for csv_name, bank in (("train_reports.csv", "first"), ("validation_reports.csv", "second")):
        for r in _csv(raw / "radiology_text_reports" / csv_name)[:2]:
            idx = int(r["VolumeName"].split("_")[1]) - 1
            f = ext._case_findings(SEED, idx, 0.35)
            det = ext.make_case(SEED, idx, f, SCALE)[2]
            assert (r["Findings_EN"], r["Impressions_EN"]) == \
                ext.make_report(np.random.default_rng([SEED, idx, 4]), f, det, bank)


def test_reports_name_what_was_measured(ext_raw):
    raw = ext_raw / "raw"
    rows = _csv(raw / "radiology_text_reports" / "train_reports.csv")
    labels = {r["VolumeName"]: r for r in _csv(raw / "multi_abnormality_labels" / "train_predicted_labels.csv")}
    for r in rows:
        text = (r["Findings_EN"] + " " + r["Impressions_EN"]).lower()
        lab = labels[r["VolumeName"]]
        assert ("cardiomegaly" in r["Impressions_EN"].lower()) == (lab["Cardiomegaly"] == "1")
        assert ("emphysema" in r["Impressions_EN"].lower()) == (lab["Emphysema"] == "1")
        if lab["Lung nodule"] == "1":
            assert re.search(r"\b\d+ mm\b", text)
        assert r["Technique_EN"].startswith("Non-contrast CT of the thorax")
    json.dumps(rows)   # plain strings only
