"""Linear probe: logistic regression on frozen embeddings (image or report), per-label AUC."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common.labels import FINDINGS


def linear_probe_auc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     findings: Sequence[str] = FINDINGS, c: float = 1.0) -> dict[str, float]:
    """One L2-regularised logistic regression per label (sklearn); labels without both classes
    in train and test are skipped (not scored)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    out = {}
    for k, f in enumerate(findings):
        ytr, yte = y_train[:, k], y_test[:, k]
        if not (0 < ytr.sum() < len(ytr)) or not (0 < yte.sum() < len(yte)):
            continue
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, ytr)
        out[f] = float(roc_auc_score(yte, clf.predict_proba(x_test)[:, 1]))
    return out
