"""Score checkpoints on downstream tasks and log them to the training run in MLflow.

    python -m evaluators.score --checkpoint PATH --data SHARDS [--tasks all|zeroshot,retrieval,...] [--out r.json]
    python -m evaluators.score --run-dir RUN --data SHARDS --mlflow-uri URI   # every checkpoint

Zero-shot thresholds (max F1 per label) are chosen on the ``valid`` split and applied to
``test``; AUC gets a bootstrap 95% CI over resampled test studies.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from trainer.config import EVAL_TASKS, FINDINGS

TASKS = EVAL_TASKS


def score_zeroshot(sc: "Scoring", extras: dict, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import f1_score, precision_score, roc_auc_score, roc_curve

    from evaluators.tasks.zeroshot import prompt_embeddings, zeroshot_probs

    model, cfg, shards, n_boot = sc.model, sc.cfg, sc.shards, sc.cfg.eval.bootstrap
    prompts = prompt_embeddings(model, sc.tok)
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    res, out = {}, {}
    for split in (cfg.eval.split_threshold, cfg.eval.split_test):
        e = sc.embed(split)
        if np.isnan(e["labels"]).any():
            raise ValueError(f"{shards}: split {split!r} has studies without the 18 labels")
        res[split] = (zeroshot_probs(e["img"], prompts, scale), e["labels"])
    (pv, yv), (pt, yt) = res[cfg.eval.split_threshold], res[cfg.eval.split_test]
    rng = np.random.default_rng(seed)
    aucs, accs, f1s, precs, table, rocs = [], [], [], [], [], {}
    for k, f in enumerate(FINDINGS):
        if not (0 < yt[:, k].sum() < len(yt)) or not (0 < yv[:, k].sum() < len(yv)):
            table.append({"label": f, "n_test": len(yt), "positives_test": int(yt[:, k].sum()),
                          "positives_threshold_split": int(yv[:, k].sum()), "scored": False})
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
        lo = hi = float("nan")
        if boots:
            lo, hi = np.percentile(boots, [2.5, 97.5])
            out[f"zeroshot/auc_ci_lo/{f}"], out[f"zeroshot/auc_ci_hi/{f}"] = lo, hi
        aucs.append(auc)
        accs.append(float((pred == yt[:, k]).mean()))
        f1s.append(f1_score(yt[:, k], pred, zero_division=0))
        precs.append(precision_score(yt[:, k], pred, zero_division=0))
        fpr, tpr, _ = roc_curve(yt[:, k], pt[:, k])
        rocs[f] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(auc)}
        table.append({"label": f, "n_test": len(yt), "positives_test": int(yt[:, k].sum()),
                      "positives_threshold_split": int(yv[:, k].sum()), "scored": True, "auc": float(auc),
                      "auc_ci_lo": float(lo), "auc_ci_hi": float(hi), "bootstrap": len(boots),
                      "threshold": float(thr), "acc": accs[-1], "f1": float(f1s[-1]), "precision": float(precs[-1])})
    if not aucs:
        raise ValueError(f"{shards}: no label has both classes in {cfg.eval.split_threshold} and {cfg.eval.split_test}")
    extras["zeroshot_table"], extras["zeroshot_roc"] = table, rocs
    out.update({"zeroshot/mean_auc": float(np.mean(aucs)), "zeroshot/mean_acc": float(np.mean(accs)),
                "zeroshot/mean_f1": float(np.mean(f1s)), "zeroshot/mean_precision": float(np.mean(precs)),
                "zeroshot/n_labels": float(len(aucs))})
    return out


def score_retrieval(sc: "Scoring", extras: dict) -> dict[str, float]:
    from evaluators.tasks.retrieval import recall_at_k

    e = sc.embed(sc.cfg.eval.split_test)
    return {f"retrieval/{k}": v for k, v in recall_at_k(e["img"], e["txt"]).items()}


def score_probe(sc: "Scoring", extras: dict) -> dict[str, float]:
    from evaluators.tasks.probe import linear_probe_auc

    shards = sc.shards
    tr, te = sc.embed("train"), sc.embed(sc.cfg.eval.split_test)
    if np.isnan(tr["labels"]).any() or np.isnan(te["labels"]).any():
        raise ValueError(f"{shards}: the linear probe needs the 18 labels on train and test studies")
    aucs = linear_probe_auc(tr["img"].numpy(), tr["labels"], te["img"].numpy(), te["labels"])
    if not aucs:
        raise ValueError(f"{shards}: no label has both classes in train and test")
    extras["probe_table"] = [{"label": k, "auc": v} for k, v in aucs.items()]
    out = {f"probe/auc/{k}": v for k, v in aucs.items()}
    out["probe/mean_auc"] = float(np.mean(list(aucs.values())))
    return out


def score_reportgen(sc: "Scoring", extras: dict) -> dict[str, float]:
    from evaluators.tasks.embed import image_features, model_device
    from evaluators.tasks.reportgen import caption_metrics, train_and_generate

    model, tok, cfg, shards = sc.model, sc.tok, sc.cfg, sc.shards
    tr, te = image_features(model, cfg, shards, "train"), image_features(model, cfg, shards, cfg.eval.split_test)
    hyps, loss = train_and_generate(tr["memory"], tr["reports"], te["memory"], tok, cfg.data.max_text_tokens,
                                    cfg.eval.reportgen_steps, cfg.train.seed, cfg.eval.reportgen_lr,
                                    device=model_device(model))
    m = caption_metrics(te["reports"], hyps)
    extras["reportgen_samples"] = [{"key": k, "reference": r, "generated": h}
                                   for k, r, h in zip(te["keys"], te["reports"], hyps)]
    out = {f"reportgen/{k}": v for k, v in m.items()}
    out["reportgen/train_loss"] = loss
    return out


def score_segmentation(sc: "Scoring", extras: dict) -> dict[str, float]:
    import copy

    import torch

    from evaluators.tasks.embed import load_volumes, model_device, to_input
    from evaluators.tasks.segmentation import check_masks, finetune
    from trainer.model.image import ImageEncoder

    model, cfg, shards = sc.model, sc.cfg, sc.shards
    classes = list(cfg.eval.seg_classes)
    tr = load_volumes(shards, "train", masks=True)
    te = load_volumes(shards, cfg.eval.split_test, masks=True)
    for d in (tr, te):
        check_masks(d["y"], d["keys"], len(classes))
    e, dev = cfg.eval, model_device(model)
    kw = dict(n_classes=len(classes), steps=e.seg_steps, seed=cfg.train.seed, lr=e.seg_lr, roi=list(e.seg_roi),
              prep=lambda hu: to_input(hu, cfg), device=dev)
    dice, loss = finetune(copy.deepcopy(model.image), tr["hu"], tr["y"], te["hu"], te["y"], **kw)
    torch.manual_seed(cfg.train.seed + 1)
    dice0, loss0 = finetune(ImageEncoder(cfg.model), tr["hu"], tr["y"], te["hu"], te["y"], **kw)
    out, table = {}, []
    for c, d, d0 in zip(classes, dice, dice0):
        table.append({"class": c, "dice_pretrained": float(d), "dice_random_init": float(d0)})
        if np.isfinite(d):
            out[f"segmentation/dice/{c}"], out[f"segmentation/random_init/dice/{c}"] = float(d), float(d0)
    if not out:
        raise ValueError(f"{shards}: no class of eval.seg_classes {classes} occurs in the test masks")
    extras["segmentation_table"] = table
    mean, mean0 = float(np.nanmean(dice)), float(np.nanmean(dice0))
    out.update({"segmentation/mean_dice": mean, "segmentation/random_init/mean_dice": mean0,
                "segmentation/gain_vs_random": mean - mean0, "segmentation/train_loss": loss,
                "segmentation/random_init/train_loss": loss0, "segmentation/steps": float(e.seg_steps)})
    return out


SCORERS = {"zeroshot": score_zeroshot, "retrieval": score_retrieval, "probe": score_probe,
           "reportgen": score_reportgen, "segmentation": score_segmentation}


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in SCORERS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; available: {list(TASKS)}")
    return tasks


def parse_tasks(text: str) -> list[str]:
    """``all`` or a comma list -> checked task names (the CLIs' ``--tasks``)."""
    return check_tasks(list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()])


class Scoring:
    """One loaded checkpoint to score task by task: the export is loaded once, and each split's
    embeddings are computed once however many tasks use them. ``overrides`` (``eval.seg_steps=100``
    ...) change the checkpoint's own config; ``n_boot`` replaces ``eval.bootstrap``; ``device``:
    default a GPU when one is visible."""

    def __init__(self, path: str | Path, shards: str, n_boot: int | None = None,
                 overrides: list[str] | None = None, device: str | None = None):
        import dataclasses

        import torch

        from trainer.config import load_config
        from trainer.engine import load_export

        self.path, self.shards = path, shards
        self.model, self.tok, cfg, self.info = load_export(path)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if overrides:
            cfg = load_config(None, overrides, extra=cfg.to_dict())
        if n_boot is not None:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, bootstrap=n_boot))
        self.cfg = cfg
        self._embeddings: dict[str, dict] = {}

    def embed(self, split: str) -> dict:
        from evaluators.tasks.embed import embed_split

        if split not in self._embeddings:
            self._embeddings[split] = embed_split(self.model, self.tok, self.cfg, self.shards, split)
        return self._embeddings[split]

    def score(self, tasks: list[str]) -> dict:
        """-> {checkpoint, step, mlflow_run_id, metrics, extras} for ``tasks``."""
        metrics: dict[str, float] = {}
        extras: dict = {}
        for t in check_tasks(tasks):
            metrics.update(SCORERS[t](self, extras))
        return {"checkpoint": str(self.path), "step": self.info.get("step"),
                "mlflow_run_id": self.info.get("mlflow_run_id"),
                "metrics": {k: float(v) for k, v in metrics.items()}, "extras": extras}


def score_checkpoint(path: str | Path, shards: str, tasks: list[str], n_boot: int | None = None,
                     overrides: list[str] | None = None, device: str | None = None) -> dict:
    """Load an export and score it on ``tasks`` (see ``Scoring``)."""
    return Scoring(path, shards, n_boot, overrides, device).score(tasks)


def _headline(key: str) -> bool:
    """Summary metrics only: not the per-label AUCs and CIs, not the per-class Dice."""
    return "/auc/" not in key and "_ci_" not in key and "/dice/" not in key


def _summary(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if _headline(k))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluators.score", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a checkpoint folder (with export/) or an export folder")
    g.add_argument("--run-dir", help="score every step_* checkpoint of a training run")
    p.add_argument("--data", required=True, help="ingested shards (train, valid and test splits)")
    p.add_argument("--tasks", default="all", help=f"comma list or 'all' ({','.join(TASKS)})")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: eval.bootstrap)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. eval.seg_steps=100 (repeatable)")
    p.add_argument("--mlflow-uri", default=None, help="log metrics and artifacts to the checkpoint's training run")
    p.add_argument("--out", default=None, help="JSON output (default: scores.json beside the checkpoints)")
    a = p.parse_args(argv)
    try:
        tasks = parse_tasks(a.tasks)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    ckpts = [Path(a.checkpoint)] if a.checkpoint else sorted(Path(a.run_dir).glob("step_*"))
    if not ckpts:
        raise SystemExit(f"{a.run_dir}: no step_* checkpoints")
    from evaluators.artifacts import log_result, write_artifacts

    results = []
    for c in ckpts:
        r = score_checkpoint(c, a.data, tasks, a.bootstrap, a.overrides)
        art = write_artifacts(r, Path(c) / "eval")
        if a.mlflow_uri and r["mlflow_run_id"]:
            log_result(a.mlflow_uri, r, art)
        results.append({k: v for k, v in r.items() if k != "extras"} | {"artifacts": str(art)})
        print(f"step {r['step']}: {_summary(r['metrics'])}", flush=True)
    _print_table(results)
    out = Path(a.out) if a.out else ckpts[-1].parent / "scores.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"scores -> {out}")
    return 0


def _print_table(results: list[dict]) -> None:
    keys = sorted({k for r in results for k in r["metrics"] if _headline(k)})
    w = max(len(k) for k in keys) if keys else 10
    print("\n" + "metric".ljust(w) + "".join(f"  step {r['step']!s:>6}" for r in results))
    for k in keys:
        print(k.ljust(w) + "".join(f"  {r['metrics'].get(k, float('nan')):>11.4f}" for r in results))


if __name__ == "__main__":
    sys.exit(main())
