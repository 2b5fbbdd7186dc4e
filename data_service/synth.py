"""Deterministic phantom chest-CT dataset in the CT-RATE layout.

    python -m data_service.synth --out DIR --n N [--seed S] [--valid-fraction 0.3]

Anatomy is drawn analytically in world millimetres (RAS, origin at the chest centre): body
(fat rim + soft tissue), two lungs, heart, aorta, spine, ribs. Eight of the 18 CT-RATE findings
are planted in the voxels, independently with ~35% prevalence, and named in a free-text report
with varied phrasing and explicit negations:
  local & small : Lung nodule (6-10 mm sphere), Arterial wall calcification (bright aortic spots)
  medium        : Consolidation (dense lung region), Hiatal hernia (air-fluid sac by the spine),
                  Pericardial effusion (fluid rim round the heart)
  large & global: Cardiomegaly (heart x1.35), Pleural effusion (dependent fluid), Emphysema
Held-out (valid) reports use a second wording bank by default, never seen in training reports.
Each volume gets its own spacing, size and orientation (RAS, LPS, LAS, PIR, ...), stored as
int16 (some with raw values + RescaleIntercept in the metadata, as CT-RATE does).
Organ masks (1 lung, 2 heart, 3 aorta, 4 bone) go to ``segmentations/`` beside the volumes.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from common.labels import FINDINGS
from data_service.sources import CTRATE_DIRS, CTRATE_REPORT_COLUMNS, CTRATE_TABLES

PLANTED = ("Lung nodule", "Arterial wall calcification", "Consolidation", "Hiatal hernia",
           "Pericardial effusion", "Cardiomegaly", "Pleural effusion", "Emphysema")
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPS", "LPI", "PIR")

_POS = {
    "Lung nodule": ["A {d} mm solid nodule is seen in the {side} {lobe} lobe.",
                    "There is a {d} mm pulmonary nodule in the {side} {lobe} lobe.",
                    "Nodular density measuring {d} mm in the {side} lung {lobe} lobe."],
    "Arterial wall calcification": ["Calcified atherosclerotic plaques are present in the aortic wall.",
                                    "Arterial wall calcifications are noted in the thoracic aorta."],
    "Consolidation": ["Consolidation is seen in the {side} lower lobe.",
                      "There is an area of consolidation in the {side} lung."],
    "Hiatal hernia": ["A hiatal hernia is present.", "Sliding type hiatal hernia is observed."],
    "Pericardial effusion": ["Pericardial effusion is present.",
                             "There is fluid in the pericardial space, consistent with pericardial effusion."],
    "Cardiomegaly": ["The heart is enlarged (cardiomegaly).", "Cardiomegaly is observed.",
                     "Heart size is increased."],
    "Pleural effusion": ["{Side} pleural effusion is present.", "Bilateral pleural effusion is seen.",
                         "Pleural effusion is noted, more prominent on the {side}."],
    "Emphysema": ["Emphysematous changes are seen in both lungs.",
                  "Centrilobular emphysema is present in both lungs.", "Diffuse emphysema."],
}
_NEG = {
    "Lung nodule": ["No pulmonary nodule was detected.", "No nodule is seen in either lung.",
                    "There is no lung nodule.", "A pulmonary nodule is not seen."],
    "Arterial wall calcification": ["No calcification in the aortic wall.",
                                    "The aortic wall is free of calcified plaque.",
                                    "Arterial wall calcification is not observed."],
    "Consolidation": ["No consolidation.", "No consolidation is seen in either lung.", "Consolidation is not present."],
    "Hiatal hernia": ["No hiatal hernia.", "There is no hiatal hernia.", "Hiatal hernia is not seen."],
    "Pericardial effusion": ["No pericardial effusion.", "The pericardium is unremarkable without effusion.",
                             "Pericardial effusion is not present."],
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly.", "The heart is not enlarged."],
    "Pleural effusion": ["No pleural effusion.", "There is no pleural effusion on either side.",
                         "Pleural spaces are clear without effusion."],
    "Emphysema": ["No emphysema.", "Lung parenchyma shows no emphysematous change.", "Emphysema is not seen."],
}
_FILLER = ["Trachea and main bronchi are patent.", "Thoracic esophagus is of normal calibre.",
           "No lytic or destructive bone lesion.", "Mediastinal structures are evaluated as normal.",
           "The visualized upper abdominal organs are unremarkable.", "Thyroid gland is normal."]
_IMPRESSION = {f: f.lower() for f in PLANTED}

# The second wording bank: held-out studies only (``heldout_wording="second"``), so that report-side
# scores are measured on phrasing the training reports never used (no sentence, and few words,
# in common with the bank above).
_POS2 = {
    "Lung nodule": ["A solid pulmonary lesion of {d} mm is identified in the {lobe} zone of the {side} lung.",
                    "{Side} {lobe} zone: {d} mm parenchymal nodular opacity."],
    "Arterial wall calcification": ["Atheromatous calcific deposits line the aorta.",
                                    "Mural calcifications of the thoracic aorta."],
    "Consolidation": ["Airspace opacification with air bronchograms at the {side} base.",
                      "Dense parenchymal airspace disease on the {side}."],
    "Hiatal hernia": ["Herniation of the stomach through the oesophageal hiatus.",
                      "Part of the stomach lies above the diaphragm."],
    "Pericardial effusion": ["Fluid collection surrounding the heart within the pericardium.",
                             "Pericardial fluid is increased."],
    "Cardiomegaly": ["Enlarged cardiac silhouette.", "The cardiac chambers are dilated with increased dimensions."],
    "Pleural effusion": ["Fluid layering in the {side} pleural space.", "Pleural fluid collection, larger on the {side}."],
    "Emphysema": ["Hyperlucent lungs with destroyed alveolar walls.",
                  "Low-attenuation areas throughout both lungs consistent with alveolar destruction."],
}
_NEG2 = {
    "Lung nodule": ["Lung fields are free of focal lesions.", "No focal pulmonary mass or nodular opacity identified."],
    "Arterial wall calcification": ["Aortic wall without calcific plaque.", "No atheromatous deposits in the aorta."],
    "Consolidation": ["Lungs are without airspace opacification.", "No airspace disease identified."],
    "Hiatal hernia": ["Gastro-oesophageal junction in normal position.", "No herniation through the oesophageal hiatus."],
    "Pericardial effusion": ["No fluid collection around the heart.", "Pericardial space is normal."],
    "Cardiomegaly": ["Cardiac dimensions within normal limits.", "Cardiac silhouette is of normal size."],
    "Pleural effusion": ["Costophrenic angles are clear.", "No fluid in the pleural spaces."],
    "Emphysema": ["Normal lung attenuation without hyperlucency.", "Lung parenchymal attenuation is preserved."],
}
_FILLER2 = ["Airways are patent to the segmental level.", "Osseous structures are intact.",
            "No mediastinal lymph node enlargement.", "Thyroid lobes are symmetric."]
_IMPRESSION2 = {"Lung nodule": "pulmonary nodular lesion", "Arterial wall calcification": "aortic atherosclerosis",
                "Consolidation": "airspace disease", "Hiatal hernia": "hiatus herniation of the stomach",
                "Pericardial effusion": "pericardial fluid", "Cardiomegaly": "enlarged heart",
                "Pleural effusion": "pleural fluid", "Emphysema": "emphysematous lungs"}
BANKS = {"first": (_POS, _NEG, _FILLER, _IMPRESSION, "No acute thoracic abnormality."),
         "second": (_POS2, _NEG2, _FILLER2, _IMPRESSION2, "Unremarkable chest CT.")}


def _ellipsoid(X, Y, Z, c, r):
    return ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1.0


def make_case(rng: np.random.Generator, findings: dict[str, int], spacing, shape):
    """Return (hu float32 (i,j,k) in RAS voxel order, mask uint8, details dict)."""
    sx, sy, sz = spacing
    nx, ny, nz = shape
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    mask = np.zeros(shape, np.uint8)
    scale = rng.uniform(0.9, 1.1)
    body = _ellipsoid(X, Y, Z * 0.25, (0, 0, 0), (165 * scale, 115 * scale, 200))
    inner = _ellipsoid(X, Y, Z * 0.25, (0, 0, 0), (150 * scale, 100 * scale, 200))
    hu[body] = -100.0
    hu[inner] = 40.0
    lung_hu = -850.0 + rng.normal(0, 15)
    lungs = []
    for side in (-1, 1):
        L = _ellipsoid(X, Y, Z, (side * 68 * scale, 0, 10), (52 * scale, 78 * scale, 115))
        lungs.append(L)
        hu[L] = lung_hu
        mask[L] = 1
    lung_any = lungs[0] | lungs[1]
    details = {}
    if findings["Emphysema"]:
        hu[lung_any] = -935.0
        holes = (rng.random(shape) < 0.04) & lung_any
        hu[holes] = -1000.0
    heart_r = np.array([55.0, 45.0, 50.0]) * scale * (1.35 if findings["Cardiomegaly"] else 1.0)
    heart_c = (15.0, 25.0, -35.0)
    heart = _ellipsoid(X, Y, Z, heart_c, heart_r)
    if findings["Pericardial effusion"]:
        rim = _ellipsoid(X, Y, Z, heart_c, heart_r + 7.0) & ~heart
        hu[rim] = 8.0
    hu[heart] = 45.0
    mask[heart] = 2
    for L in lungs:  # lungs must not overlap the heart
        mask[L & heart] = 2
    aorta = ((X - 20) ** 2 + (Y + 10) ** 2 <= 14.0 ** 2) & (Z > -90) & (Z < 80)
    hu[aorta] = 170.0
    mask[aorta] = 3
    if findings["Arterial wall calcification"]:
        ang = rng.uniform(0, 2 * np.pi, 6)
        for a, zc in zip(ang, rng.uniform(-80, 70, 6)):
            spot = _ellipsoid(X, Y, Z, (20 + 14 * np.cos(a), -10 + 14 * np.sin(a), zc), (4, 4, 6))
            hu[spot] = 900.0
    spine = ((X) ** 2 + (Y + 85 * scale) ** 2 <= 18.0 ** 2) & (np.abs(Z) < 170)
    hu[spine] = 650.0
    mask[spine] = 4
    rib_r = np.sqrt((X / (157 * scale)) ** 2 + (Y / (107 * scale)) ** 2)
    ribs = (np.abs(rib_r - 1.0) < 0.035) & (np.mod(Z + 400, 30) < 9) & (np.abs(Z) < 130)
    hu[ribs] = 700.0
    mask[ribs] = 4
    side = int(rng.choice([-1, 1]))
    details["side"] = "right" if side < 0 else "left"  # RAS: negative x is the patient's right
    if findings["Pleural effusion"]:
        for s, L in zip((-1, 1), lungs):
            depth = rng.uniform(25, 40) if s == side else rng.uniform(0, 25)
            hu[L & (Y < -78 * scale + depth)] = 12.0
    if findings["Consolidation"]:
        c = (side * 68 * scale, rng.uniform(-20, 20), rng.uniform(-60, -20))
        blob = _ellipsoid(X, Y, Z, c, (25, 25, 30)) & lungs[0 if side < 0 else 1]
        hu[blob] = rng.uniform(-40, 30)
    if findings["Hiatal hernia"]:
        c = (0.0, -45.0, -95.0)
        sac = _ellipsoid(X, Y, Z, c, (28, 22, 26))
        hu[sac] = 15.0
        hu[sac & (Y > -45)] = -1000.0  # air cap
    if findings["Lung nodule"]:
        d = float(rng.uniform(6, 10))
        L = lungs[0 if side < 0 else 1]
        zc = rng.uniform(-10, 70)
        details["lobe"] = "upper" if zc > 30 else "middle" if side < 0 else "lower"
        details["d"] = int(round(d * 1.5))  # reported diameter in mm (radius d)
        for _ in range(50):
            c = (side * 68 * scale + rng.uniform(-25, 25), rng.uniform(-40, 40), zc)
            ball = _ellipsoid(X, Y, Z, c, (d, d, d))
            if ball.any() and (ball <= L).all():
                hu[ball] = rng.uniform(20, 60)
                break
    hu += rng.normal(0, 12, shape).astype(np.float32)
    return hu, mask, details


def make_report(rng: np.random.Generator, findings: dict[str, int], details: dict,
                bank: str = "first") -> tuple[str, str]:
    """(findings text, impression) in one of the ``BANKS`` of wording."""
    pos_bank, neg_bank, filler, names, normal = BANKS[bank]
    fill = {"side": details.get("side", "right"), "Side": details.get("side", "right").capitalize(),
            "lobe": details.get("lobe", "upper"), "d": details.get("d", 8)}
    sentences = [str(rng.choice(pos_bank[f] if findings[f] else neg_bank[f])).format(**fill) for f in PLANTED]
    sentences += list(rng.choice(filler, size=2, replace=False))
    order = rng.permutation(len(sentences))
    findings_txt = " ".join(sentences[i] for i in order)
    pos = [names[f] for f in PLANTED if findings[f]]
    impression = ("; ".join(pos).capitalize() + ".") if pos else normal
    return findings_txt, impression


def _reorient(hu, mask, spacing, axcodes):
    """RAS-ordered voxels -> the given axis codes, with the matching affine."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(np.array(hu.shape) - 1) / 2 * np.array(spacing)
    tr = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes)))
    new_aff = aff @ inv_ornt_aff(tr, hu.shape)
    out = apply_orientation(hu, tr), apply_orientation(mask, tr), new_aff
    assert "".join(nib.aff2axcodes(new_aff)) == axcodes
    return out


def generate(out: str | Path, n: int, seed: int = 0, valid_fraction: float = 0.3,
             prevalence: float = 0.35, heldout_wording: str = "second", workers: int = 1) -> dict[str, int]:
    """``n`` phantoms, the last ``valid_fraction`` of them in ``valid`` (held out; ingest moves a
    patient-hashed part of it to ``test``). ``heldout_wording``: the wording bank of the held-out
    reports, ``second`` (never used in training) or ``first`` (the training bank). ``workers``:
    processes (the output does not depend on it)."""
    if heldout_wording not in BANKS:
        raise ValueError(f"heldout_wording: {heldout_wording!r} is not one of {sorted(BANKS)}")

    out = Path(out)
    n_valid = max(1, int(round(n * valid_fraction))) if n > 1 else 0
    jobs = [(out, seed, idx, "valid" if idx >= n - n_valid else "train", prevalence, heldout_wording)
            for idx in range(n)]
    rows = run_cases(_write_case, jobs, workers, chunksize=8)
    write_ctrate_tables(out, {split: [_table_row(i, r) for i, r in enumerate(rs)] for split, rs in rows.items()})
    return {k: len(v) for k, v in rows.items()}


def run_cases(write_case, jobs: list, workers: int, chunksize: int) -> dict[str, list[dict]]:
    """``write_case(job) -> (split, row)`` over ``jobs`` (in ``workers`` spawned processes when > 1);
    the rows by split, in job order (the output does not depend on ``workers``)."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(write_case, jobs, chunksize=chunksize))
    else:
        done = [write_case(j) for j in jobs]
    return {s: [r for sp, r in done if sp == s] for s in CTRATE_TABLES}


def write_ctrate_tables(out: Path, rows: dict[str, list[dict]]) -> None:
    """CT-RATE's report, label and metadata tables (``data_service.sources`` reads them) for ``rows``
    by split, each ``{"name", "report": {column: text}, "labels": {finding: 0/1}, "metadata": {column:
    value}}`` (the metadata columns: the first row's, in its order)."""
    for d in CTRATE_DIRS:
        (out / d).mkdir(parents=True, exist_ok=True)
    for split, (rep, lab, meta) in CTRATE_TABLES.items():
        tables = ((CTRATE_DIRS[0], rep, CTRATE_REPORT_COLUMNS, "report"), (CTRATE_DIRS[1], lab, FINDINGS, "labels"))
        for folder, name, cols, key in tables:
            with open(out / folder / name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["VolumeName", *cols])
                w.writerows([r["name"], *[r[key][c] for c in cols]] for r in rows[split])
        cols = list(rows[split][0]["metadata"]) if rows[split] else []
        with open(out / CTRATE_DIRS[2] / meta, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["VolumeName", *cols])
            w.writerows([r["name"], *[r["metadata"][c] for c in cols]] for r in rows[split])


def _write_case(job) -> tuple[str, dict]:
    """One phantom (image, mask, report row), from its own generator seeded by (seed, index)."""
    import nibabel as nib

    out, seed, idx, split, prevalence, heldout_wording = job
    r = np.random.default_rng([seed, idx])
    findings = {f: int(r.random() < prevalence) for f in PLANTED}
    spacing = (float(r.choice([2.0, 2.5, 3.0])),) * 2 + (float(r.choice([3.0, 4.0, 5.0])),)
    fov = r.uniform(360, 400, 2)
    shape = (int(fov[0] / spacing[0]), int(fov[1] / spacing[1]), int(r.uniform(300, 340) / spacing[2]))
    hu, mask, details = make_case(r, findings, spacing, shape)
    axcodes = ORIENTATIONS[idx % len(ORIENTATIONS)]
    hu_o, mask_o, affine = _reorient(hu, mask, spacing, axcodes)
    raw_storage = bool(idx % 3 == 1)  # CT-RATE style: stored value = HU + 1024, intercept in CSV
    stored = np.clip(np.rint(hu_o + (1024 if raw_storage else 0)), -32768, 32767).astype(np.int16)
    pid = f"{split}_{idx + 1}"
    name = f"{pid}_a_1.nii.gz"
    vdir = out / split / pid / f"{pid}_a"
    vdir.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(stored, affine)
    img.header.set_slope_inter(1.0, 0.0) if not raw_storage else None
    nib.save(img, str(vdir / name))
    sdir = out / "segmentations" / split / pid / f"{pid}_a"
    sdir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask_o.astype(np.uint8), affine), str(sdir / name))
    ftxt, imp = make_report(r, findings, details, heldout_wording if split == "valid" else "first")
    labels = {f: findings.get(f, 0) for f in FINDINGS}
    return split, {"name": name, "findings": ftxt, "impression": imp, "labels": labels,
                   "spacing": spacing, "shape": shape, "raw": raw_storage}


def ctrate_row(r: dict, clinical: str, technique: str, vendor: str, intercept: int, sex: str, age: int,
               thickness: float | None = None) -> dict:
    """One case's rows of the CT-RATE tables (``write_ctrate_tables``): ``r`` holds its ``name``,
    ``labels``, ``findings``, ``impression``, ``spacing`` (x, y, z mm) and ``shape`` (x, y, z)."""
    sp, sh = r["spacing"], r["shape"]
    meta = {"Manufacturer": vendor, "XYSpacing": f"[{sp[0]}, {sp[1]}]", "ZSpacing": sp[2],
            "RescaleIntercept": intercept, "RescaleSlope": 1, "Rows": sh[1], "Columns": sh[0], "NumberofSlices": sh[2]}
    if thickness is not None:
        meta["SliceThickness"] = thickness
    return {"name": r["name"], "labels": r["labels"],
            "report": dict(zip(CTRATE_REPORT_COLUMNS, (clinical, technique, r["findings"], r["impression"]))),
            "metadata": {**meta, "PatientSex": sex, "PatientAge": f"{age:03d}Y"}}


def _table_row(i: int, r: dict) -> dict:
    """A case's rows of the CT-RATE tables (``i``: its place in its split)."""
    return ctrate_row(r, "Phantom study.", "Non-contrast chest CT.", "PhantomCT", -1024 if r["raw"] else 0,
                      "MF"[i % 2], 40 + i % 40)


def generator_parser(prog: str, doc: str, banks) -> argparse.ArgumentParser:
    """The command line every phantom generator shares (``experiments.science`` calls them alike):
    --out --n --seed --valid-fraction --heldout-wording (one of ``banks``) --workers."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="number of volumes (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-fraction", type=float, default=0.3)
    p.add_argument("--heldout-wording", choices=sorted(banks), default="second",
                   help="wording bank of the held-out (valid/test) reports")
    p.add_argument("--workers", type=int, default=1, help="processes")
    return p


def parse_generator_args(p: argparse.ArgumentParser, argv: list[str] | None):
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    return a


def main(argv: list[str] | None = None) -> int:
    p = generator_parser("python -m data_service.synth", __doc__, BANKS)
    a = parse_generator_args(p, argv)
    counts = generate(a.out, a.n, a.seed, a.valid_fraction, heldout_wording=a.heldout_wording, workers=a.workers)
    print(f"synth: wrote {sum(counts.values())} phantom volumes {counts} in CT-RATE layout -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
