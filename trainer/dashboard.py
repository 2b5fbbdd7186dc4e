"""The MLflow UI as users see it: the experiment's kind, links into its model-training view, and
run descriptions (the Markdown MLflow shows on a run's page, tag ``mlflow.note.content``).

MLflow marks an experiment's kind with the tag ``mlflow.experimentKind`` (what its UI's kind
selector writes; ``custom_model_development`` is model training). MLflow 3.17's UI opens an
experiment in the view of the browser's workflow type (``?workflowType=`` in the URL, else the
last one chosen, else GenAI), so every link made here carries ``workflowType=machine_learning``.

A training run gets its note when it starts (what was trained on what data, with which preset, at
which commit); the evaluator rewrites it at every checkpoint it scores (``evaluators.run_note``),
adding the checkpoint table, the best checkpoint and its registry version, and links to the plots.
A sweep's parent run holds the trial table and the best configuration (``render_sweep_note``).
"""
from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.metric_names import HEADLINE, mlflow_name

if TYPE_CHECKING:
    from common.config import Config

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
WORKFLOW = "workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"           # MLflow's: a run's description, Markdown
PRESET_TAG = "t3d.preset"
COMMIT_TAG = "mlflow.source.git.commit"     # MLflow's own tag: the run page shows it as the source version
DIRTY_TAG = "t3d.git.dirty"                 # "true": the tree had uncommitted changes
COMMIT_ENV = "T3D_GIT_COMMIT"               # the commit, "-dirty" appended with changes (``git_describe``)
MAX_ROWS = 20                               # checkpoint rows in a note (MLflow caps a tag at 8000 characters)


@dataclass
class RunNote:
    name: str
    preset: str | None = None
    shards: str | None = None
    counts: dict[str, Any] | None = None    # the shards' manifest counts
    commit: str | None = None              # as shown: the commit, and whether the tree had changes
    evaluating: bool = True                 # eval.enabled: the evaluator scores checkpoints
    best_metric: str = "zeroshot/mean_auc"
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {"step", "checkpoint", task key: value}
    columns: dict[str, str] = field(default_factory=lambda: dict(HEADLINE))  # task key -> its column, in order
    best: dict[str, Any] | None = None      # {"checkpoint", "step", "value"[, "model", "version"]}
    label_cis: list[tuple[str, float, float, float]] = field(default_factory=list)  # (label, AUC, lo, hi) at best
    links: list[tuple[str, str]] = field(default_factory=list)                      # (text, href)


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment when missing (an
    existing one without a kind is marked too; a kind set by hand is kept)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={KIND_TAG: KIND})
        except MlflowException as e:
            # a busy server made the client retry a create that had gone through (or another run
            # created it meanwhile): the experiment is there now
            if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := client.get_experiment_by_name(name)) is None:
                raise
    if KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def run_url(uri: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """The run's page in MLflow's model-training view (``tab``: ``model-metrics``, ``artifacts/PATH`` ...)."""
    return f"{uri.rstrip('/')}/{run_path(experiment_id, run_id, tab)}"


def run_path(experiment_id: str, run_id: str, tab: str = "") -> str:
    """``run_url`` relative to the server: what a link in a run description uses."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{'/' + tab if tab else ''}?{WORKFLOW}"


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else "–" if isinstance(v, float) else str(v)


def _table(head: list[str], rows: list[list[str]], right: int = 0) -> list[str]:
    """Markdown table; columns from ``right`` on are right-aligned (numbers)."""
    align = ["---" if i < right else "---:" for i in range(len(head))]
    return [f"| {' | '.join(head)} |", f"| {' | '.join(align)} |"] + [f"| {' | '.join(r)} |" for r in rows]


def _counts(c: dict[str, Any] | None) -> str:
    if not c:
        return "no manifest counts"
    splits = ", ".join(f"{k} {v}" for k, v in (c.get("written_by_split") or {}).items())
    return f"{c.get('written')} studies: {splits}; {c.get('rejected', 0)} of {c.get('in')} rejected at ingest"


def _best_line(note: RunNote) -> str:
    b = note.best
    reg = f"; registered as model `{b['model']}` v{b['version']} (alias `best`)" if b.get("version") else ""
    return (f"**Best checkpoint** `{b['checkpoint']}` (step {b['step']}): `{note.best_metric}` = {_num(b['value'])} "
            f"(chart `{mlflow_name(note.best_metric)}`){reg}.")


def _source_line(note: RunNote) -> str:
    commit = f"commit `{note.commit}`" if note.commit else "an unknown commit (not a git checkout)"
    preset = f"`{note.preset}`" if note.preset else "an unknown preset"
    return f"Run `{note.name}`: {preset} on `{note.shards}` ({_counts(note.counts)}), {commit}."


def render_run_note(note: RunNote) -> str:
    """The run description, in Markdown (a pure function of ``note``): the best checkpoint and what
    was trained on what first (what MLflow shows before "Show more"), then the tables and links."""
    out = ([_best_line(note), ""] if note.best else []) + [_source_line(note), ""]
    if not note.evaluating:
        return "\n".join(out + ["The evaluator does not score this run's checkpoints (`eval.enabled` is off); a "
                                "sweep trial's validation scores are its `eval/valid/` charts."]) + "\n"
    if not note.checkpoints:
        return "\n".join(out + ["No checkpoint scored yet: the evaluator rewrites this description at every "
                                "checkpoint it scores."]) + "\n"
    keys = [k for k in note.columns if any(k in c for c in note.checkpoints)]
    best_step = note.best["step"] if note.best else None
    shown = sorted(note.checkpoints, key=lambda c: c["step"])
    if len(shown) > MAX_ROWS:
        shown = [c for c in shown[:-MAX_ROWS] if c["step"] == best_step] + shown[-MAX_ROWS:]
    rows = [[f"**{c['step']}**" if c["step"] == best_step else str(c["step"]), c["checkpoint"]]
            + [_num(c.get(k, math.nan)) for k in keys] for c in shown]
    out += ["#### Checkpoints", "", *_table(["step", "checkpoint"] + [note.columns[k] for k in keys], rows, 2)]
    if len(shown) < len(note.checkpoints):
        out.append(f"\n{len(note.checkpoints) - len(shown)} earlier checkpoints: `eval_ledger.jsonl` of the run.")
    out.append("")
    if note.label_cis:
        out += [f"#### Zero-shot AUC per label at step {best_step} (95% bootstrap CI)", "",
                *_table(["label", "AUC", "95% CI"], [[lab, _num(a), f"{_num(lo)}–{_num(hi)}"]
                                                     for lab, a, lo, hi in note.label_cis], 1), ""]
    if note.links:
        out += ["#### Plots", "", *[f"- [{text}]({href})" for text, href in note.links]]
    return "\n".join(out).rstrip() + "\n"


def render_sweep_note(name: str, metric: str, knobs: list[str], rows: list[dict[str, Any]],
                      best: dict[str, Any] | None, links: dict[str, str] | None = None,
                      version: str | None = None) -> str:
    """A sweep's parent-run description: the best configuration first, then one row per trial (its
    values and best score; ``links``: trial -> its run page)."""
    key, out = f"best {metric}", []
    if best:
        reg = f", registered as model `{name}` v{version} (alias `best`)" if version else ""
        out += [f"**Best trial** {best['trial']}: `{metric}` = {_num(best[key])} at `{best['checkpoint']}`{reg}. "
                "Its configuration (the run's artifact `best_config.yaml` trains as it is):", "",
                "```yaml", *[f"{k}: {best[k]}" for k in knobs], "```", ""]
    out += [f"Sweep `{name}`: trials ranked by `{metric}` (chart `{mlflow_name(metric)}` on each trial's run, "
            "whose parameters hold the swept keys).", ""]
    if not rows:
        return "\n".join(out + ["No trial has finished yet."]) + "\n"
    body = []
    for r in rows:
        trial = f"[{r['trial']}]({links[str(r['trial'])]})" if links and str(r["trial"]) in links else str(r["trial"])
        status = r["status"] + (f": {r['error'][:80]}" if r.get("error") else "")
        values = [f"{v:.4g}" if isinstance(v := r.get(k), float) else str(v) for k in knobs]
        body.append([trial, *values, _num(r.get(key, math.nan)), str(r.get("best step")), status])
    out += _table(["trial", *[f"`{k}`" for k in knobs], metric, "step", "status"], body, 1)
    return "\n".join(out).rstrip() + "\n"


def git_commit(repo: str | Path | None = None) -> tuple[str, bool] | None:
    """(commit, uncommitted changes?) of the code that runs: its git checkout's, else what the
    submitter put in ``COMMIT_ENV`` (``ray job submit`` ships the code without ``.git``), else None."""
    cwd = str(repo or Path(__file__).resolve().parents[1])
    given = os.environ.get(COMMIT_ENV, "")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return (given.removesuffix("-dirty"), given.endswith("-dirty")) if given else None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip(), bool(dirty)


def git_describe(repo: str | Path | None = None) -> str:
    """``git_commit`` as one string for ``COMMIT_ENV`` ("" when unknown)."""
    git = git_commit(repo)
    return f"{git[0]}{'-dirty' if git[1] else ''}" if git else ""


def manifest_counts(shards: str | None) -> dict[str, Any] | None:
    from data_service.shards import load_manifest

    try:
        return load_manifest(shards)["counts"] if shards else None
    except (OSError, ValueError, KeyError):
        return None


def start_tags(cfg: Config, preset: str | None) -> dict[str, str]:
    """The tags a training run starts with: its preset, commit and first description."""
    git, preset = git_commit(), preset or "defaults (no --config)"
    shown = f"{git[0]}{' (with uncommitted changes)' if git[1] else ''}" if git else None
    note = RunNote(cfg.train.run_name, preset, cfg.data.shards, manifest_counts(cfg.data.shards), shown,
                   cfg.eval.enabled, cfg.eval.best_metric)
    tags = {PRESET_TAG: preset, NOTE_TAG: render_run_note(note)}
    return tags | ({COMMIT_TAG: git[0], DIRTY_TAG: str(git[1]).lower()} if git else {})
