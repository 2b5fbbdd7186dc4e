"""Run descriptions (Markdown), the experiment's kind and links into MLflow's model-training view."""
from __future__ import annotations

from types import SimpleNamespace

from trainer.dashboard import (
    COMMIT_ENV,
    KIND,
    KIND_TAG,
    MAX_ROWS,
    RunNote,
    experiment_id,
    git_commit,
    render_run_note,
    render_sweep_note,
    run_url,
)

COUNTS = {"in": 26, "written": 24, "rejected": 2, "written_by_split": {"train": 12, "valid": 6, "test": 6}}


def note(**kw) -> RunNote:
    return RunNote("debug", "configs/debug.yaml", "data/shards", COUNTS, "0123abc", **kw)


def test_a_new_run_says_what_it_trains_on_what():
    md = render_run_note(note())
    assert md.startswith("Run `debug`: `configs/debug.yaml` on `data/shards` (24 studies: train 12, valid 6, "
                         "test 6; 2 of 26 rejected at ingest), commit `0123abc`.")
    assert "No checkpoint scored yet" in md
    assert "does not score this run's checkpoints" in render_run_note(note(evaluating=False))
    assert "an unknown commit (not a git checkout)" in render_run_note(RunNote("r"))


def test_checkpoint_table_best_cis_and_links():
    cks = [{"checkpoint": "step_0000010", "step": 10, "zeroshot/mean_auc": 0.61, "probe/mean_auc": 0.7},
           {"checkpoint": "step_0000020", "step": 20, "zeroshot/mean_auc": 0.78, "segmentation/mean_dice": 0.5}]
    md = render_run_note(note(checkpoints=cks, best={"checkpoint": "step_0000020", "step": 20, "value": 0.78,
                                                     "model": "debug", "version": "3"},
                              label_cis=[("Emphysema", 0.8, 0.7, 0.9)],
                              links=[("metrics over checkpoints", "#/x/artifacts/eval/m.png")]))
    assert "| step | checkpoint | zero-shot AUC | probe AUC | Dice |" in md
    assert "| 10 | step_0000010 | 0.610 | 0.700 | – |" in md and "| **20** | step_0000020 | 0.780 | – | 0.500 |" in md
    assert md.startswith("**Best checkpoint** `step_0000020` (step 20): `zeroshot/mean_auc` = 0.780 (chart "
                         "`eval/zeroshot_mean_auc`); registered as model `debug` v3 (alias `best`).")
    assert "| Emphysema | 0.800 | 0.700–0.900 |" in md
    assert "- [metrics over checkpoints](#/x/artifacts/eval/m.png)" in md


def test_a_long_run_keeps_the_best_and_the_latest_rows_within_mlflows_limit():
    cks = [{"checkpoint": f"step_{s:07d}", "step": s, "zeroshot/mean_auc": s / 1000} for s in range(1, 301)]
    md = render_run_note(note(checkpoints=cks, best={"checkpoint": "step_0000005", "step": 5, "value": 0.9}))
    assert "| **5** | step_0000005 |" in md and "| 300 | step_0000300 |" in md and "| 200 |" not in md
    assert f"{300 - MAX_ROWS - 1} earlier checkpoints" in md and len(md) < 8000


def test_sweep_note_has_the_trials_and_the_best_configuration():
    rows = [{"trial": "a1", "tma.w_local": 0.5, "train.lr": 1e-4, "status": "TERMINATED", "error": "",
             "best valid/zeroshot/mean_auc": 0.6, "best step": 2},
            {"trial": "b2", "tma.w_local": 1.0, "train.lr": 3e-4, "status": "ERROR", "error": "OOM",
             "best valid/zeroshot/mean_auc": float("nan"), "best step": -1}]
    best = {**rows[0], "checkpoint": "trials/trial-a1/step_0000002"}
    md = render_sweep_note("tiny", "valid/zeroshot/mean_auc", ["tma.w_local", "train.lr"], rows, best,
                           {"a1": "#/run-a1"}, "4")
    assert md.startswith("**Best trial** a1: `valid/zeroshot/mean_auc` = 0.600 at `trials/trial-a1/step_0000002`, "
                         "registered as model `tiny` v4")
    assert "```yaml\ntma.w_local: 0.5\ntrain.lr: 0.0001\n```" in md
    assert "| trial | `tma.w_local` | `train.lr` | valid/zeroshot/mean_auc | step | status |" in md
    assert "| [a1](#/run-a1) | 0.5 | 0.0001 | 0.600 | 2 | TERMINATED |" in md
    assert "| b2 | 1 | 0.0003 | – | -1 | ERROR: OOM |" in md
    assert "No trial has finished yet" in render_sweep_note("tiny", "m", [], [], None)


class Client:
    def __init__(self, tags=None):
        self.exp = None if tags is None else SimpleNamespace(experiment_id="7", tags=tags)
        self.created, self.tagged = [], []

    def get_experiment_by_name(self, name):
        return self.exp

    def create_experiment(self, name, tags=None):
        self.created.append((name, tags))
        return "1"

    def set_experiment_tag(self, exp_id, key, value):
        self.tagged.append((exp_id, key, value))


def test_experiments_are_model_training_ones():
    c = Client()
    assert experiment_id(c, "t3d") == "1" and c.created == [("t3d", {KIND_TAG: KIND})]
    c = Client(tags={})                                     # made before: marked now
    assert experiment_id(c, "t3d") == "7" and c.tagged == [("7", KIND_TAG, KIND)]
    c = Client(tags={KIND_TAG: "genai_development"})        # a kind chosen by hand is kept
    assert experiment_id(c, "t3d") == "7" and c.tagged == []
    assert run_url("http://h:5000/", "7", "r1", "model-metrics") == \
        "http://h:5000/#/experiments/7/runs/r1/model-metrics?workflowType=machine_learning"


def test_git_commit_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    assert git_commit(tmp_path) is None
    monkeypatch.setenv(COMMIT_ENV, "0123abc-dirty")                  # what `make demo` hands its Ray job
    assert git_commit(tmp_path) == ("0123abc", True)
