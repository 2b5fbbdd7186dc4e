"""Importers: turn a dataset folder in a known layout into ``Study`` records (no voxels read).

Each importer returns (studies, rejects): studies that can be read, and ``(study_id, reason,
detail)`` for the ones that already fail here (missing report, missing image). Layouts are
documented in README.md ("Data layout") and in each function's docstring.
"""
from __future__ import annotations

import ast
import contextvars
import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.labels import FINDINGS


@dataclass
class Study:
    id: str
    patient_id: str
    split: str                               # train | valid | test
    image: str | list[str]                   # NIfTI path, DICOM folder, or list of DICOM files
    report: str
    labels: dict[str, int] | None = None     # the 18 CT-RATE labels when known
    mask: str | None = None                  # optional segmentation (NIfTI) on the image's grid
    read_kw: dict[str, Any] = field(default_factory=dict)   # extra reader args (rescale, spacing)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""


Rejected = tuple[str, str, str]


TEXT_FALLBACK: contextvars.ContextVar[str] = contextvars.ContextVar("text_fallback", default="cp1252")
"""The codec for CSV fields that are not UTF-8 (``data.text_fallback_encoding``; ``discover`` sets it)."""
ENCODING_KEY = "_text_encoding"
"""Set on a row some field of which was decoded with the fallback; importers copy it to the study's meta."""


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file. Fields that are not valid UTF-8 (Latin-1 exports are common) are
    decoded with ``TEXT_FALLBACK`` and their row marked (``ENCODING_KEY``); a malformed file
    raises ValueError naming it and the line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: required file is missing")
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    fallback = TEXT_FALLBACK.get()
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    rows = []
    try:
        for row in reader:
            bad = [k for k, v in row.items() if isinstance(v, str) and _escaped(v)]
            if bad or any(_escaped(k) for k in row if isinstance(k, str)):
                row = {_redecode(k, fallback): _redecode(v, fallback) if isinstance(v, str) else v
                       for k, v in row.items()}
                row[ENCODING_KEY] = f"{fallback} (fields not UTF-8: {', '.join(_redecode(k, fallback) for k in bad)})"
            rows.append(row)
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num + 1}: malformed CSV: {e}") from e  # the line being read
    return rows


def _escaped(v: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in v)


def _redecode(v: str, fallback: str) -> str:
    if not _escaped(v):
        return v
    return v.encode("utf-8", "surrogateescape").decode(fallback, errors="replace")


def text_meta(row: dict) -> dict[str, str]:
    """What a study's meta records of its row's text encoding (nothing when it was UTF-8)."""
    return {"report_encoding": row[ENCODING_KEY]} if row.get(ENCODING_KEY) else {}


def pick_column(rows: list[dict[str, str]], candidates: tuple[str, ...], path: Path, what: str) -> str:
    cols = list(rows[0].keys()) if rows else []
    lower = {c.lower(): c for c in cols}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    raise ValueError(f"{path}: no {what} column (tried {list(candidates)}; columns are {cols})")


def labels_from_row(row: dict[str, str], path: Path) -> dict[str, int]:
    out = {}
    for name in FINDINGS:
        if name not in row:
            raise ValueError(f"{path}: label column {name!r} missing (need the 18 CT-RATE labels)")
        v = str(row[name]).strip()
        if v not in ("0", "1", "0.0", "1.0"):
            raise ValueError(f"{path}: label {name!r} = {v!r} for {row.get('VolumeName', '?')}; expected 0/1")
        out[name] = int(float(v))
    return out


def hash_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


# ------------------------------------------------------------------------------------- CT-RATE
# CT-RATE's tables: folder, then the file of each split (reports, labels, metadata), and the report columns
CTRATE_DIRS = ("radiology_text_reports", "multi_abnormality_labels", "metadata")
CTRATE_TABLES = {"train": ("train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv"),
                 "valid": ("validation_reports.csv", "valid_predicted_labels.csv", "validation_metadata.csv")}
CTRATE_REPORT_COLUMNS = ("ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")


def ctrate(root: Path) -> tuple[list[Study], list[Rejected]]:
    """CT-RATE (``dataset/`` as downloaded from Hugging Face)::

        {train,valid}/{split}_{patient}/{split}_{patient}_{scan}/{split}_{patient}_{scan}_{recon}.nii.gz
        radiology_text_reports/{train_reports,validation_reports}.csv   VolumeName, Findings_EN, Impressions_EN, ...
        multi_abnormality_labels/{train,valid}_predicted_labels.csv     VolumeName + 18 labels   (optional)
        metadata/{train,validation}_metadata.csv   XYSpacing "[x, y]", ZSpacing, RescaleSlope/Intercept (optional)
        segmentations/{split}/.../{VolumeName}     organ masks (our extension; the phantom writes them)

    The metadata spacing replaces the header's (CT-RATE headers are unreliable); slope/intercept
    from metadata are applied to the stored values when the NIfTI header carries no scaling.
    """
    studies, rejects = [], []
    found_any = False
    for split, (rep_name, lab_name, meta_name) in CTRATE_TABLES.items():
        vol_dir = root / split
        if not vol_dir.is_dir():
            continue
        found_any = True
        rep_path = root / "radiology_text_reports" / rep_name
        reports = {r["VolumeName"]: r for r in read_csv(rep_path)}
        lab_path = root / "multi_abnormality_labels" / lab_name
        labels = {r["VolumeName"]: labels_from_row(r, lab_path) for r in read_csv(lab_path)} \
            if lab_path.is_file() else {}
        meta_path = root / "metadata" / meta_name
        metas = {r["VolumeName"]: r for r in read_csv(meta_path)} if meta_path.is_file() else {}
        for nii in sorted(vol_dir.glob("*/*/*.nii.gz")):
            name = nii.name
            sid = name[: -len(".nii.gz")]
            parts = sid.split("_")
            patient = "_".join(parts[:2])
            rep = reports.get(name)
            text = _ctrate_text(rep) if rep else ""
            if not text:
                rejects.append((sid, "missing_report", f"{nii}: no report for {name} in {rep_path}"))
                continue
            read_kw: dict[str, Any] = {}
            m = metas.get(name)
            if m:
                try:
                    xy = ast.literal_eval(m["XYSpacing"]) if m.get("XYSpacing") else None
                    if xy is not None:
                        read_kw["spacing_override"] = [float(xy[0]), float(xy[1]), float(m["ZSpacing"])]
                    if m.get("RescaleSlope") not in (None, "") and _header_unscaled(nii):
                        read_kw["rescale"] = (float(m["RescaleSlope"]), float(m["RescaleIntercept"]))
                except (ValueError, SyntaxError, KeyError) as e:
                    rejects.append((sid, "bad_geometry", f"{meta_path}: bad metadata for {name}: {e}"))
                    continue
            seg = root / "segmentations" / split / nii.parent.parent.name / nii.parent.name / name
            studies.append(Study(sid, patient, split, str(nii), text, labels.get(name),
                                 str(seg) if seg.is_file() else None, read_kw,
                                 {"volume_name": name, **text_meta(rep)}, "ctrate"))
    if not found_any:
        raise FileNotFoundError(f"{root}: not a CT-RATE layout (no train/ or valid/ folder)")
    return studies, rejects


def _header_unscaled(nii: Path) -> bool:
    import math

    import nibabel as nib

    try:
        hdr = nib.load(str(nii)).header
        slope, inter = hdr.get_slope_inter()
    except Exception:
        return True  # unreadable files are rejected later by the reader, with the real error
    return slope is None or (isinstance(slope, float) and math.isnan(slope)) or \
        (slope == 1.0 and (inter in (None, 0.0)))


def _ctrate_text(row: dict[str, str]) -> str:
    parts = []
    for col, title in (("Findings_EN", "Findings"), ("Impressions_EN", "Impression")):
        v = (row.get(col) or "").strip()
        if v and v.lower() != "nan":
            parts.append(f"{title}: {v}")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- INSPECT
def inspect(root: Path) -> tuple[list[Study], list[Rejected]]:
    """INSPECT (Stanford, CTPA)::

        CTPA/{impression_id}.nii.gz
        Final_Impressions.csv            impression_id, impressions
        splits_*.tsv                     impression_id, split (train|valid|test)   (optional: else hashed)
        study_mapping_*.tsv              impression_id, person_id                  (optional)
        labels_*.tsv                     impression_id, pe_positive_nlp, ...       (kept in meta)
    """
    imp_path = root / "Final_Impressions.csv"
    rows = read_csv(imp_path)
    idc = pick_column(rows, ("impression_id",), imp_path, "impression_id")
    txc = pick_column(rows, ("impressions", "impression"), imp_path, "impressions")
    texts = {r[idc]: (r[txc] or "").strip() for r in rows}
    encodings = {r[idc]: text_meta(r) for r in rows}
    splits = _tsv_map(root, "splits_*.tsv", ("split",))
    persons = _tsv_map(root, "study_mapping_*.tsv", ("person_id", "patient_id"))
    extra = _tsv_rows(root, "labels_*.tsv")
    studies, rejects = [], []
    ids = sorted(set(texts) | {p.name[: -len(".nii.gz")] for p in (root / "CTPA").glob("*.nii.gz")})
    for iid in ids:
        nii = root / "CTPA" / f"{iid}.nii.gz"
        if not nii.is_file():
            rejects.append((iid, "missing_image", f"{nii}: listed in {imp_path} but missing"))
            continue
        text = texts.get(iid, "")
        if not text or text.lower() == "nan":
            rejects.append((iid, "missing_report", f"{nii}: no impression in {imp_path}"))
            continue
        patient = persons.get(iid, iid)
        split = _norm_split(splits.get(iid) or _hash_split(patient))
        studies.append(Study(iid, patient, split, str(nii), f"Impression: {text}", None, None, {},
                             {"inspect_labels": extra.get(iid, {}), **encodings.get(iid, {})}, "inspect"))
    return studies, rejects


def _tsv_rows(root: Path, pattern: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for p in sorted(root.glob(pattern)):
        for r in read_csv(p):
            if "impression_id" not in r:
                raise ValueError(f"{p}: no impression_id column (columns are {list(r)})")
            out[r["impression_id"]] = {k: v for k, v in r.items() if k != "impression_id"}
    return out


def _tsv_map(root: Path, pattern: str, cols: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for iid, r in _tsv_rows(root, pattern).items():
        for c in cols:
            if r.get(c):
                out[iid] = r[c]
                break
    return out


def _norm_split(s: str) -> str:
    s = s.strip().lower()
    return {"training": "train", "val": "valid", "validation": "valid", "testing": "test"}.get(s, s)


def _hash_split(patient: str, valid: float = 0.1, test: float = 0.1) -> str:
    h = hash_fraction(patient)
    return "test" if h < test else "valid" if h < test + valid else "train"


# ------------------------------------------------------------------------------------ BIMCV-R
def bimcvr(root: Path) -> tuple[list[Study], list[Rejected]]:
    """BIMCV-R::

        CT*/ct/*.nii.gz                         volumes
        meta/curated_ct_report_path_En.csv      a path column (path|ct_path|volume_path|image_path)
                                                and a report column (report|report_en|text|findings);
                                                patient column optional (patient_id|subject), else the
                                                first path component; split by patient hash
    """
    meta_path = root / "meta" / "curated_ct_report_path_En.csv"
    rows = read_csv(meta_path)
    if not rows:
        raise ValueError(f"{meta_path}: no rows")
    pc = pick_column(rows, ("path", "ct_path", "volume_path", "image_path", "nii_path"), meta_path, "path")
    rc = pick_column(rows, ("report", "report_en", "text", "findings", "En"), meta_path, "report")
    try:
        sc = pick_column(rows, ("patient_id", "subject", "patient"), meta_path, "patient")
    except ValueError:
        sc = None
    studies, rejects = [], []
    seen = set()
    for r in rows:
        rel = r[pc].strip().lstrip("/")
        nii = root / rel
        sid = rel.replace("/", "__").removesuffix(".nii.gz")
        if sid in seen:
            rejects.append((sid, "duplicate_id", f"{meta_path}: {rel} listed twice"))
            continue
        seen.add(sid)
        if not nii.is_file():
            rejects.append((sid, "missing_image", f"{nii}: listed in {meta_path} but missing"))
            continue
        text = (r[rc] or "").strip()
        if not text:
            rejects.append((sid, "missing_report", f"{meta_path}: empty report for {rel}"))
            continue
        patient = r[sc] if sc else rel.split("/")[0]
        studies.append(Study(sid, patient, _hash_split(patient), str(nii), text, None, None, {},
                             {"path": rel, **text_meta(r)}, "bimcvr"))
    listed = {root / r[pc].strip().lstrip("/") for r in rows}
    for nii in sorted(root.glob("CT*/ct/*.nii.gz")):
        if nii not in listed:
            sid = str(nii.relative_to(root)).replace("/", "__").removesuffix(".nii.gz")
            rejects.append((sid, "missing_report", f"{nii}: not listed in {meta_path}"))
    return studies, rejects


# -------------------------------------------------------------------------------------- folder
def folder(root: Path) -> tuple[list[Study], list[Rejected]]:
    """A plain folder: ``reports.csv`` with columns ``id, image, report`` and optional
    ``patient_id, split, mask`` and the 18 CT-RATE label columns. ``image`` is relative to the
    folder: a NIfTI file or a folder of DICOM files. Images not listed are rejected."""
    path = root / "reports.csv"
    rows = read_csv(path)
    for col in ("id", "image", "report"):
        if rows and col not in rows[0]:
            raise ValueError(f"{path}: missing column {col!r} (columns are {list(rows[0])})")
    has_labels = bool(rows) and all(n in rows[0] for n in FINDINGS)
    studies, rejects = [], []
    seen = set()
    for r in rows:
        sid = r["id"].strip()
        if sid in seen:
            rejects.append((sid, "duplicate_id", f"{path}: id {sid!r} appears twice"))
            continue
        seen.add(sid)
        rel = r["image"].strip()
        img = root / rel
        if not Path(rel).is_absolute() and not _inside(img, root):
            rejects.append((sid, "bad_path", f"{path}: image {rel!r} of id {sid!r} leaves the input folder "
                                             "(give an absolute path to mean a file elsewhere)"))
            continue
        if not img.exists():
            rejects.append((sid, "missing_image", f"{img}: listed in {path} but missing"))
            continue
        text = (r.get("report") or "").strip()
        if not text:
            rejects.append((sid, "missing_report", f"{path}: empty report for id {sid!r}"))
            continue
        patient = (r.get("patient_id") or sid).strip()
        split = _norm_split(r.get("split") or _hash_split(patient))
        mask = str(root / r["mask"]) if r.get("mask") else None
        if mask and not Path(r["mask"]).is_absolute() and not _inside(Path(mask), root):
            rejects.append((sid, "bad_path", f"{path}: mask {r['mask']!r} of id {sid!r} leaves the input folder"))
            continue
        studies.append(Study(sid, patient, split, str(img), text,
                             labels_from_row(r, path) if has_labels else None, mask, {}, text_meta(r), "folder"))
    return studies, rejects


def _inside(p: Path, root: Path) -> bool:
    """Lexically under ``root`` (``..`` resolved, symlinks not followed: a link is the user's choice)."""
    import os

    return os.path.normpath(p).startswith(os.path.normpath(root) + os.sep)


IMPORTERS: dict[str, Callable[[Path], tuple[list[Study], list[Rejected]]]] = {
    "ctrate": ctrate, "inspect": inspect, "bimcvr": bimcvr, "folder": folder}


def discover(source: str, root: str | Path, test_fraction_of_valid: float = 0.0, text_fallback: str = "cp1252"):
    """Run an importer; then move a patient-hashed fraction of ``valid`` into ``test`` (so that
    zero-shot thresholds are chosen on valid and scored on test, never on the same studies)."""
    if source not in IMPORTERS:
        raise ValueError(f"--source {source!r}: expected one of {sorted(IMPORTERS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--input {root}: not a folder")
    token = TEXT_FALLBACK.set(text_fallback)
    try:
        studies, rejects = IMPORTERS[source](root)
    finally:
        TEXT_FALLBACK.reset(token)
    if test_fraction_of_valid > 0 and not any(s.split == "test" for s in studies):
        for s in studies:
            if s.split == "valid" and hash_fraction("test:" + s.patient_id) < test_fraction_of_valid:
                s.split = "test"
    return studies, rejects
