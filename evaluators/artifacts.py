"""Evaluation artifacts and MLflow: tables, ROC curves, metric-over-checkpoints plot, model registry.

Per checkpoint (``step_X/eval/``): ``metrics.json``, ``zeroshot_auc_table.csv``, ``zeroshot_roc.png``,
``probe_auc_table.csv``, ``reportgen_samples.json``, ``segmentation_dice_table.csv`` (an external
dataset's in ``external/<name>/`` below it; ``metrics.json`` holds every dataset's keys), and for a
``restore.enabled`` checkpoint ``restore.png`` (``evaluators.scoring.restore_picture``); logged to the
training run under ``eval/step_X/``, the tables also as MLflow tables (``*_table.json``). Per run:
``metrics_over_checkpoints.png`` from the ledger (``eval/`` in MLflow), and the checkpoint best on ``eval.best_metric`` registered as a model version
with the alias ``best`` (its export folder is logged under ``checkpoints/step_X/`` first, so the
version outlives Ray's checkpoint rotation).
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from common import storage
from common.metric_names import EXTERNAL, external_key, mlflow_name, split_external
from trainer.checkpoint import export_of, step_name

# what the over-checkpoints plot shows (the per-label curves are in MLflow itself)
SUMMARY = ("zeroshot/mean_auc", "zeroshot/mean_f1", "retrieval/i2t_R@5", "retrieval/t2i_R@5", "probe/mean_auc",
           "reportgen/bleu4", "reportgen/meteor", "reportgen/rouge_l", "segmentation/mean_dice",
           "segmentation/random_init/mean_dice", "restore/error")


mlflow_key = mlflow_name          # a task key's name in MLflow (common.metric_names)


def _csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(rocs: dict[str, dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for label, r in sorted(rocs.items(), key=lambda kv: -kv[1]["auc"]):
        ax.plot(r["fpr"], r["tpr"], lw=1.2, label=f"{label} ({r['auc']:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_artifacts(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write one checkpoint's results (``score_checkpoint``'s dict) into ``out_dir``; merges metrics
    with what earlier tasks wrote there. An external dataset's tables go to ``external/<name>/``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.json"
    earlier = json.loads(mpath.read_text()) if mpath.is_file() else {}
    mpath.write_text(json.dumps({"step": result["step"], **earlier, **result["metrics"]}, indent=1))
    ex, ds = result.get("extras", {}), result.get("dataset")
    tables = out / _tables_dir(ds)
    if any(ex.get(k) for k in ("zeroshot_table", "zeroshot_roc", "probe_table", "reportgen_samples",
                               "segmentation_table")):
        tables.mkdir(parents=True, exist_ok=True)
    if ex.get("zeroshot_table"):
        _csv(tables / "zeroshot_auc_table.csv", ex["zeroshot_table"])
    if ex.get("zeroshot_roc"):
        plot_roc(ex["zeroshot_roc"], tables / "zeroshot_roc.png",
                 f"zero-shot ROC, step {result['step']}" + (f", external dataset {ds}" if ds else ""))
    if ex.get("probe_table"):
        _csv(tables / "probe_auc_table.csv", ex["probe_table"])
    if ex.get("reportgen_samples"):
        (tables / "reportgen_samples.json").write_text(json.dumps(ex["reportgen_samples"], indent=1))
    if ex.get("segmentation_table"):
        _csv(tables / "segmentation_dice_table.csv", ex["segmentation_table"])
    return out


def _tables_dir(dataset: str | None) -> str:
    """Where a dataset's tables sit in a checkpoint's ``eval/`` folder ("." for the internal one)."""
    return f"{EXTERNAL}/{dataset}" if dataset else "."


def log_result(uri: str, result: dict[str, Any], art_dir: str | Path | None) -> None:
    """Metrics at ``step`` = the checkpoint's training step, and the artifact folder, to its run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, run_id, step = MlflowClient(uri), result["mlflow_run_id"], int(result["step"])
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(mlflow_key(k), v, ts, step) for k, v in result["metrics"].items()
                                      if math.isfinite(v)])
    if art_dir is not None and any(Path(art_dir).iterdir()):
        client.log_artifacts(run_id, str(art_dir), f"eval/{step_name(step)}")
    # the tables again as MLflow tables: the UI shows them sortable and compares them across runs
    for name in ("zeroshot_table", "probe_table", "segmentation_table"):
        rows = result.get("extras", {}).get(name)
        if rows:
            import pandas as pd

            sub = _tables_dir(result.get("dataset"))
            client.log_table(run_id, pd.DataFrame(rows),
                             f"eval/{step_name(step)}/{'' if sub == '.' else sub + '/'}{name}.json")


def ledger_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] sorted by step, from ledger records without errors."""
    series: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("error"):
            continue
        for k, v in r["metrics"].items():
            series.setdefault(k, {})[int(r["step"])] = float(v)
    return {k: sorted(v.items()) for k, v in series.items()}


def external_datasets(keys) -> list[str]:
    """The external dataset names among metric ``keys``, in order of first appearance."""
    return list(dict.fromkeys(d for d in (split_external(k)[0] for k in keys) if d))


def plot_over_checkpoints(records: list[dict], path: str | Path) -> Path | None:
    """One panel per summary metric, value against training step, one line per dataset (internal
    and each ``external/<name>/``); None when nothing is scored."""
    series = ledger_series(records)
    names = external_datasets(series)
    keys = [k for k in SUMMARY if k in series or any(external_key(d, k) in series for d in names)]
    if not keys:
        return None
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        lines = [("internal", k)] + [(f"external {d}", external_key(d, k)) for d in names]
        for label, key in lines:
            if key in series:
                s, v = zip(*series[key])
                ax.plot(s, v, "o-" if key == k else "s--", label=label)
        ax.set(title=k, xlabel="training step")
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def best_checkpoint(records: list[dict], metric: str) -> tuple[str, int, float] | None:
    """(checkpoint, step, value) with the highest ``metric`` (earliest step on ties)."""
    best = None
    for r in records:
        v = r.get("metrics", {}).get(metric)
        if r.get("error") or v is None or not math.isfinite(v):
            continue
        if best is None or v > best[2] or (v == best[2] and r["step"] < best[1]):
            best = (r["checkpoint"], int(r["step"]), float(v))
    return best


def register_best(uri: str, run_id: str, run_dir: str | Path, records: list[dict], metric: str,
                  name: str) -> dict[str, Any] | None:
    """Register the best checkpoint on ``metric`` as a new version of model ``name`` (alias ``best``)
    unless the alias already points at that step. Returns what was registered, or None."""
    from trainer.tracking import register_checkpoint

    best = best_checkpoint(records, metric)
    if best is None:
        return None
    ck, step, value = best
    export = export_of(storage.join(run_dir, ck))
    if not storage.isdir(export):
        return None                           # rotated away before it could be uploaded
    export = storage.local_dir(export)        # MLflow uploads from a local folder
    version = register_checkpoint(uri, run_id, export, name, {"step": str(step), "metric": metric,
                                                               "value": f"{value:.6g}", "checkpoint": ck},
                                  f"checkpoints/{ck}")
    if version is None:
        return None
    return {"name": name, "version": version, "checkpoint": ck, "step": step, metric: value}
