"""The training run's description, rewritten by the evaluator at every checkpoint it scores: what
the run started with (its tags and params: preset, shards, commit), the checkpoint table from the
ledger (with each external dataset's zero-shot AUC beside the internal headline), the best checkpoint
with its registry version, and links to the plots in the run's artifacts.
"""
from __future__ import annotations

from typing import Any

from common.metric_names import HEADLINE, external_key, split_external
from evaluators.artifacts import best_checkpoint, external_datasets
from trainer import dashboard as dash
from trainer.checkpoint import step_name

EXTERNAL_HEADLINE = ("zeroshot/mean_auc",)   # an external dataset's columns in the checkpoint table


def columns(records: list[dict[str, Any]], best_metric: str | None = None) -> dict[str, str]:
    """The checkpoint table's columns (task key -> heading): the internal headline, then per external
    dataset its zero-shot AUC ("ext zero-shot AUC"), and ``best_metric`` when it is another external key."""
    cols = dict(HEADLINE)
    names = external_datasets(k for r in records if not r.get("error") for k in r["metrics"])
    ds, task = split_external(best_metric or "")
    for d in names:
        for k in EXTERNAL_HEADLINE + ((task,) if ds == d and task not in EXTERNAL_HEADLINE else ()):
            cols[external_key(d, k)] = f"{d} {HEADLINE.get(k, k)}"
    return cols


def checkpoint_rows(records: list[dict[str, Any]], keys=None) -> list[dict[str, Any]]:
    """One row per scored checkpoint: its step and headline metrics (all tasks and datasets merged;
    ``keys``: which, default ``columns(records)``)."""
    keys = set(columns(records) if keys is None else keys)
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        if not r.get("error"):
            row = rows.setdefault(r["checkpoint"], {"checkpoint": r["checkpoint"], "step": int(r["step"])})
            row.update({k: v for k, v in r["metrics"].items() if k in keys})
    return list(rows.values())


def label_cis(records: list[dict[str, Any]], checkpoint: str) -> list[tuple[str, float, float, float]]:
    """(label, AUC, CI low, CI high) of the zero-shot labels of ``checkpoint`` that have a bootstrap CI."""
    m: dict[str, float] = {}
    for r in records:
        if r["checkpoint"] == checkpoint and not r.get("error"):
            m.update(r["metrics"])
    out = []
    for k, v in m.items():
        label = k.removeprefix("zeroshot/auc/")
        lo, hi = m.get(f"zeroshot/auc_ci_lo/{label}"), m.get(f"zeroshot/auc_ci_hi/{label}")
        if k.startswith("zeroshot/auc/") and lo is not None and hi is not None:
            out.append((label, v, lo, hi))
    return out


def best_info(client, run_id: str, records: list[dict[str, Any]], metric: str,
              registry_name: str | None) -> dict[str, Any] | None:
    """The best checkpoint on ``metric``, with the registry version that alias ``best`` names when
    it is that checkpoint of this run."""
    from mlflow.exceptions import MlflowException

    best = best_checkpoint(records, metric)
    if best is None:
        return None
    info = {"checkpoint": best[0], "step": best[1], "value": best[2]}
    if registry_name:
        try:
            mv = client.get_model_version_by_alias(registry_name, "best")
        except MlflowException:
            return info
        if mv.run_id == run_id and mv.tags.get("step") == str(best[1]):
            info |= {"model": registry_name, "version": mv.version}
    return info


def plot_links(client, exp_id: str, run_id: str, step: int | None) -> list[tuple[str, str]]:
    """Links to the plots in the run's artifacts: over checkpoints, and the best checkpoint's."""
    have = {f.path for f in client.list_artifacts(run_id, "eval")}
    if step is not None:
        have |= {f.path for f in client.list_artifacts(run_id, f"eval/{step_name(step)}")}
    want = [("metrics over checkpoints", "eval/metrics_over_checkpoints.png")]
    if step is not None:
        want += [(f"zero-shot ROC curves, step {step}", f"eval/{step_name(step)}/zeroshot_roc.png"),
                 (f"all evaluation artifacts of step {step}", f"eval/{step_name(step)}")]
    return [(text, dash.run_path(exp_id, run_id, f"artifacts/{path}")) for text, path in want if path in have]


def refresh_run_note(client, run_id: str, records: list[dict[str, Any]], best_metric: str,
                     registry_name: str | None) -> str:
    """Render the run's description from its tags, params and the ledger ``records``; set it; return it."""
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    shards = params.get("data.shards")
    commit = tags.get(dash.COMMIT_TAG)
    if commit and tags.get(dash.DIRTY_TAG) == "true":
        commit += " (with uncommitted changes)"
    best = best_info(client, run_id, records, best_metric, registry_name)
    step = best["step"] if best else None
    cols = columns(records, best_metric)
    note = dash.RunNote(run.info.run_name, tags.get(dash.PRESET_TAG), shards, dash.manifest_counts(shards), commit,
                        best_metric=best_metric, checkpoints=checkpoint_rows(records, cols), columns=cols, best=best,
                        label_cis=label_cis(records, best["checkpoint"]) if best else [],
                        links=plot_links(client, run.info.experiment_id, run_id, step))
    text = dash.render_run_note(note)
    client.set_tag(run_id, dash.NOTE_TAG, text)
    return text
