"""Zero-shot abnormality classification (CT-RATE protocol).

For each label the prompts "{finding} is present." / "{finding} is not present." are embedded; the
softmax over the two image-text similarities (scaled by the model's temperature) is P(present).
``eval.prompts=ensemble`` averages several rephrasings of each side instead (CLIP's prompt
ensembling): the score must not hinge on one wording.

The protocol (``score_zeroshot``): per label, the max-F1 threshold is chosen on the threshold split
(``eval.split_threshold``, valid) and applied to the test split; AUC with a stratified bootstrap
95% CI over resampled test studies (scikit-learn's ``resample``, both classes in every resample);
ACC, F1 and precision at the threshold.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from common.labels import FINDINGS

PROMPTS = ("{} is present.", "{} is not present.")
ENSEMBLE = (("{} is present.", "There is {}.", "{} is seen.", "Findings consistent with {}.", "{} is noted."),
            ("{} is not present.", "There is no {}.", "No {} is seen.", "No evidence of {}.", "{} is absent."))


@torch.no_grad()
def prompt_embeddings(model, tokenizer, cfg, findings: Sequence[str] = FINDINGS, ensemble: bool = False) -> torch.Tensor:
    """-> (F, 2, E) normalized text embeddings of the positive / negative prompt (or the
    renormalized mean over each side's rephrasings), tokenized as the model's reports are."""
    from trainer.model.text import tokenize_reports

    sides = ENSEMBLE if ensemble else tuple((p,) for p in PROMPTS)
    texts = [t.format(f) for f in findings for side in sides for t in side]
    enc = tokenize_reports(tokenizer, texts, cfg)
    dev = next(model.parameters()).device
    txt, _, _ = model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
    txt = txt.float().view(len(findings), 2, len(sides[0]), -1).mean(2)
    return torch.nn.functional.normalize(txt, dim=-1)


@torch.no_grad()
def zeroshot_probs(img_emb: torch.Tensor, prompts: torch.Tensor, logit_scale: float) -> np.ndarray:
    """img_emb (N,E), prompts (F,2,E) -> P(present) (N,F)."""
    logits = logit_scale * torch.einsum("ne,fpe->nfp", img_emb.float(), prompts.float().to(img_emb.device))
    return logits.softmax(-1)[..., 0].cpu().numpy()


def auc_with_ci(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float, int]:
    """(AUC, CI low, CI high, resamples) with a stratified percentile bootstrap (95%)."""
    auc = float(auc_rows(y, p))
    if n_boot <= 0:
        return auc, float("nan"), float("nan"), 0
    b = bootstrap_indices(y, n_boot, seed)
    lo, hi = np.percentile(auc_rows(y[b], p[b]), [2.5, 97.5])
    return auc, float(lo), float(hi), n_boot


def bootstrap_indices(y: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, N) stratified resamples of the N studies, with replacement: scikit-learn's
    ``resample`` (both classes in every resample, at their counts in ``y``), resample i seeded ``seed + i``."""
    y = np.ascontiguousarray(y)
    return _bootstrap_indices(y.tobytes(), y.dtype.str, len(y), n_boot, seed)


@functools.lru_cache(maxsize=64)        # a table scores several variants on the same labels and seed
def _bootstrap_indices(y: bytes, dtype: str, n: int, n_boot: int, seed: int) -> np.ndarray:
    from sklearn.utils import resample

    labels, idx = np.frombuffer(y, dtype=dtype), np.arange(n)
    out = np.stack([resample(idx, replace=True, stratify=labels, random_state=seed + i) for i in range(n_boot)])
    out.setflags(write=False)
    return out


def auc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of labels ``y`` (..., N) against scores ``p`` (..., N), all rows at once:
    the Mann-Whitney statistic from SciPy's ranks (ties averaged), which is the area scikit-learn's
    ``roc_auc_score`` integrates (equal to it within 1e-15). Each row needs both classes.
    (One ``roc_auc_score`` call per bootstrap resample spent 8 ms on input checks; a whole
    bootstrap here costs less than one of them.)"""
    from scipy.stats import rankdata

    pos = np.asarray(y).astype(bool)
    n1 = pos.sum(-1)
    n0 = pos.shape[-1] - n1
    if np.any(n1 == 0) or np.any(n0 == 0):
        raise ValueError("auc_rows: a row has only one class; its AUC is undefined")
    ranks = rankdata(np.asarray(p, dtype=np.float64), axis=-1)
    return ((ranks * pos).sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def max_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold with the highest F1 (scikit-learn's precision-recall curve)."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.clip(prec[:-1] + rec[:-1], 1e-12, None)
    return float(thr[int(np.argmax(f1))])


def two_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def score_zeroshot(p_thr: np.ndarray, y_thr: np.ndarray, p_test: np.ndarray, y_test: np.ndarray,
                   n_boot: int, seed: int = 0, findings: Sequence[str] = FINDINGS) -> tuple[dict, list, dict]:
    """P(present) and labels on the threshold and test splits -> (metrics, per-label table, ROC curves).
    Labels without both classes in either split are listed as not scored, and not averaged in."""
    from sklearn.metrics import f1_score, precision_score, roc_curve

    out, table, rocs = {}, [], {}
    for k, f in enumerate(findings):
        row = {"label": f, "n_test": len(y_test), "positives_test": int(y_test[:, k].sum()),
               "positives_threshold_split": int(y_thr[:, k].sum()), "scored": False}
        table.append(row)
        if not (two_classes(y_test[:, k]) and two_classes(y_thr[:, k])):
            continue
        thr = max_f1_threshold(y_thr[:, k], p_thr[:, k])
        pred = p_test[:, k] >= thr
        auc, lo, hi, nb = auc_with_ci(y_test[:, k], p_test[:, k], n_boot, seed + 1000 * k)
        fpr, tpr, _ = roc_curve(y_test[:, k], p_test[:, k])
        rocs[f] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc}
        row.update(scored=True, auc=auc, auc_ci_lo=lo, auc_ci_hi=hi, bootstrap=nb, threshold=thr,
                   acc=float((pred == y_test[:, k]).mean()), f1=float(f1_score(y_test[:, k], pred, zero_division=0)),
                   precision=float(precision_score(y_test[:, k], pred, zero_division=0)))
        out[f"zeroshot/auc/{f}"] = auc
        if nb:
            out[f"zeroshot/auc_ci_lo/{f}"], out[f"zeroshot/auc_ci_hi/{f}"] = lo, hi
    scored = [r for r in table if r["scored"]]
    if not scored:
        raise ValueError("no label has both classes in the threshold and the test split")
    for m in ("auc", "acc", "f1", "precision"):
        out[f"zeroshot/mean_{m}"] = float(np.mean([r[m] for r in scored]))
    out["zeroshot/n_labels"] = float(len(scored))
    return out, table, rocs
