"""Validation scores of one checkpoint for a sweep (``sweep.scorer``): the evaluators' own
``Scoring`` and protocols, on the validation split only (a sweep never looks at ``test``).

    valid/zeroshot/mean_auc        zero-shot AUC (CT-RATE prompts, or the ensemble per eval.prompts)
    valid/probe/mean_auc           logistic regression on the image embeddings, train -> valid
    valid/probe/report/mean_auc    the same on the report embeddings
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def sweep_scores(checkpoint: str | Path, shards: str, split: str = "valid") -> dict[str, float]:
    from evaluators.scoring import Scoring
    from evaluators.tasks.probe import linear_probe_auc
    from evaluators.tasks.zeroshot import prompt_embeddings, score_zeroshot, zeroshot_probs

    sc = Scoring(checkpoint, shards, n_boot=0, tasks=["zeroshot", "probe"])
    val, train = sc.labelled(split), sc.labelled("train")
    prompts = prompt_embeddings(sc.model, sc.tok, sc.cfg, ensemble=sc.cfg.eval.prompts == "ensemble")
    p = zeroshot_probs(val["img"], prompts, float(sc.model.logit_scale.detach().exp().clamp(max=100)))
    zs, _, _ = score_zeroshot(p, val["labels"], p, val["labels"], n_boot=0)
    out = {f"{split}/zeroshot/mean_auc": zs["zeroshot/mean_auc"]}
    for key, name in (("img", "probe"), ("txt", "probe/report")):
        aucs = linear_probe_auc(train[key].numpy(), train["labels"], val[key].numpy(), val["labels"])
        out[f"{split}/{name}/mean_auc"] = float(np.mean(list(aucs.values()))) if aucs else float("nan")
    return out


sweep_scores.metric_names = tuple(f"valid/{k}" for k in ("zeroshot/mean_auc", "probe/mean_auc", "probe/report/mean_auc"))
