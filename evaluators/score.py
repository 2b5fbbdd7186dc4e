"""Score checkpoints on downstream tasks and log them to the training run in MLflow.

    python -m evaluators.score --checkpoint PATH --data SHARDS [--tasks zeroshot,retrieval] [--out r.json]
    python -m evaluators.score --run-dir RUN --data SHARDS --mlflow-uri URI   # every checkpoint

Zero-shot thresholds (max F1 per label) are chosen on the ``valid`` split and applied to
``test``; AUC gets a bootstrap 95% CI over resampled test studies.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from trainer.config import FINDINGS

TASKS = ("zeroshot", "retrieval", "probe")


def score_zeroshot(model, tok, cfg, shards, n_boot: int, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import f1_score, precision_score, roc_auc_score

    from evaluators.tasks.embed import embed_split
    from evaluators.tasks.zeroshot import prompt_embeddings, zeroshot_probs

    prompts = prompt_embeddings(model, tok)
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    res, out = {}, {}
    for split in ("valid", "test"):
        e = embed_split(model, tok, cfg, shards, split)
        if np.isnan(e["labels"]).any():
            raise ValueError(f"{shards}: split {split!r} has studies without the 18 labels")
        res[split] = (zeroshot_probs(e["img"], prompts, scale), e["labels"])
    (pv, yv), (pt, yt) = res["valid"], res["test"]
    rng = np.random.default_rng(seed)
    aucs, accs, f1s, precs = [], [], [], []
    for k, f in enumerate(FINDINGS):
        if not (0 < yt[:, k].sum() < len(yt)) or not (0 < yv[:, k].sum() < len(yv)):
            continue
        cands = np.unique(pv[:, k])
        thr = max(cands, key=lambda t: f1_score(yv[:, k], pv[:, k] >= t, zero_division=0))
        pred = pt[:, k] >= thr
        auc = roc_auc_score(yt[:, k], pt[:, k])
        boots = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(yt), len(yt))
            if 0 < yt[idx, k].sum() < len(idx):
                boots.append(roc_auc_score(yt[idx, k], pt[idx, k]))
        out[f"zeroshot/auc/{f}"] = auc
        if boots:
            out[f"zeroshot/auc_ci_lo/{f}"], out[f"zeroshot/auc_ci_hi/{f}"] = np.percentile(boots, [2.5, 97.5])
        aucs.append(auc)
        accs.append(float((pred == yt[:, k]).mean()))
        f1s.append(f1_score(yt[:, k], pred, zero_division=0))
        precs.append(precision_score(yt[:, k], pred, zero_division=0))
    if not aucs:
        raise ValueError(f"{shards}: no label has both classes in valid and test")
    out.update({"zeroshot/mean_auc": float(np.mean(aucs)), "zeroshot/mean_acc": float(np.mean(accs)),
                "zeroshot/mean_f1": float(np.mean(f1s)), "zeroshot/mean_precision": float(np.mean(precs)),
                "zeroshot/n_labels": float(len(aucs))})
    return out


def score_retrieval(model, tok, cfg, shards) -> dict[str, float]:
    from evaluators.tasks.embed import embed_split
    from evaluators.tasks.retrieval import recall_at_k

    e = embed_split(model, tok, cfg, shards, "test")
    return {f"retrieval/{k}": v for k, v in recall_at_k(e["img"], e["txt"]).items()}


def score_probe(model, tok, cfg, shards) -> dict[str, float]:
    from evaluators.tasks.embed import embed_split
    from evaluators.tasks.probe import linear_probe_auc

    tr, te = embed_split(model, tok, cfg, shards, "train"), embed_split(model, tok, cfg, shards, "test")
    if np.isnan(tr["labels"]).any() or np.isnan(te["labels"]).any():
        raise ValueError(f"{shards}: the linear probe needs the 18 labels on train and test studies")
    aucs = linear_probe_auc(tr["img"].numpy(), tr["labels"], te["img"].numpy(), te["labels"])
    if not aucs:
        raise ValueError(f"{shards}: no label has both classes in train and test")
    out = {f"probe/auc/{k}": v for k, v in aucs.items()}
    out["probe/mean_auc"] = float(np.mean(list(aucs.values())))
    return out


def score_checkpoint(path: str | Path, shards: str, tasks: list[str], n_boot: int = 200) -> dict:
    from trainer.engine import load_export

    model, tok, cfg, info = load_export(path)
    metrics: dict[str, float] = {}
    for t in tasks:
        if t == "zeroshot":
            metrics.update(score_zeroshot(model, tok, cfg, shards, n_boot))
        elif t == "retrieval":
            metrics.update(score_retrieval(model, tok, cfg, shards))
        elif t == "probe":
            metrics.update(score_probe(model, tok, cfg, shards))
        else:
            raise ValueError(f"--tasks: unknown task {t!r}; available: {list(TASKS)}")
    return {"checkpoint": str(path), "step": info.get("step"), "mlflow_run_id": info.get("mlflow_run_id"),
            "metrics": {k: float(v) for k, v in metrics.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluators.score", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a checkpoint folder (with export/) or an export folder")
    g.add_argument("--run-dir", help="score every step_* checkpoint of a training run")
    p.add_argument("--data", required=True, help="ingested shards (valid and test splits)")
    p.add_argument("--tasks", default="zeroshot,retrieval", help=f"comma list or 'all' ({','.join(TASKS)})")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--mlflow-uri", default=None, help="log to the checkpoint's training run")
    p.add_argument("--out", default=None, help="JSON output (default: beside the checkpoint)")
    a = p.parse_args(argv)
    tasks = list(TASKS) if a.tasks == "all" else [t.strip() for t in a.tasks.split(",") if t.strip()]
    ckpts = [Path(a.checkpoint)] if a.checkpoint else sorted(Path(a.run_dir).glob("step_*"))
    if not ckpts:
        raise SystemExit(f"{a.run_dir}: no step_* checkpoints")
    results = []
    for c in ckpts:
        r = score_checkpoint(c, a.data, tasks, a.bootstrap)
        results.append(r)
        m = r["metrics"]
        print(f"step {r['step']}: " + "  ".join(f"{k}={v:.3f}" for k, v in m.items()
                                                 if "/auc/" not in k and "_ci_" not in k), flush=True)
        if a.mlflow_uri and r["mlflow_run_id"]:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            import time
            ts = int(time.time() * 1000)
            MlflowClient(a.mlflow_uri).log_batch(r["mlflow_run_id"], metrics=[
                Metric(k.replace("@", "_at_"), v, ts, int(r["step"])) for k, v in m.items() if math.isfinite(v)])
    out = Path(a.out) if a.out else ckpts[-1].parent / "scores.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"scores -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
