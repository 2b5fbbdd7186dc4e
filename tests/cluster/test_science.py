"""`make science`'s table: one variant (``--only clip``, or a score-only rerun) or both with the
paired delta (a one-variant run used to end in an IndexError after training)."""
from __future__ import annotations

import numpy as np

from cluster import science
from common.labels import FINDINGS


def _fake(rng, y, signal):
    k = [FINDINGS.index(f) for f in science.PLANTED]
    probs = rng.random(y.shape)
    probs[:, k] += signal * y[:, k]                 # planted labels carry signal
    return {"labels": y.tolist(), "probs_single": probs.tolist(), "probs_ensemble": probs.tolist(),
            "report_probs_single": probs.tolist(), "report_probs_ensemble": probs.tolist(),
            "metrics": {"probe/mean_auc": 0.8, "probe/auc/Lung nodule": 0.6}}


def test_table_one_variant_and_both():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 18)) < 0.4).astype(float)
    res = {"clip": _fake(rng, y, 0.0)}
    text, summary = science.table(res, n_boot=20, seed=0)
    assert "CLIP+TMA" not in text and "delta" not in text
    assert set(summary["single"]["mean"]) == {"clip"} and abs(summary["single"]["mean"]["clip"] - 0.5) < 0.15
    assert "probe/auc/Lung nodule" in text
    res["tma"] = _fake(rng, y, 1.0)
    text, summary = science.table(res, n_boot=20, seed=0)
    assert "CLIP+TMA" in text and "delta" in text
    assert summary["single"]["mean"]["tma"] > 0.9 > summary["single"]["mean"]["clip"]
    d, lo, hi = summary["single"]["per_label"]["Lung nodule"]["delta"]
    assert lo <= d <= hi and d > 0.2
