"""The evaluation ledger is idempotent; a crashing evaluator actor is restarted and finishes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluators.actor import Ledger, evaluate_pending, ready_checkpoints
from tests.evaluators.test_tasks import _plain_export
from tests.faults import crash_once


@pytest.fixture()
def run_dir(tmp_path):
    for step in (7, 14):
        _plain_export(tmp_path, step)
    (tmp_path / "step_0000021").mkdir()          # an upload in progress: no export yet
    return tmp_path


def test_ledger_survives_restart(run_dir, phantom):
    assert [Path(p).name for p in ready_checkpoints(run_dir)] == ["step_0000007", "step_0000014"]
    first = evaluate_pending(str(run_dir), str(phantom / "shards"), ["retrieval"], None)
    assert [(n["checkpoint"], n["step"]) for n in first] == [("step_0000007", 7), ("step_0000014", 14)]
    # a new evaluator (restart) finds everything in the ledger: nothing repeated, nothing lost
    assert evaluate_pending(str(run_dir), str(phantom / "shards"), ["retrieval"], None) == []
    lines = [json.loads(x) for x in (run_dir / "eval_ledger.jsonl").read_text().splitlines()]
    assert [(r["checkpoint"], r["task"], r["step"]) for r in lines] == [("step_0000007", "retrieval", 7),
                                                                          ("step_0000014", "retrieval", 14)]
    assert {"retrieval/i2t_R@1", "retrieval/t2i_R@1"} <= set(lines[1]["metrics"])
    with open(run_dir / "eval_ledger.jsonl", "a") as f:
        f.write('{"checkpoint": "step_00')        # torn line from a crash mid-write
    assert Ledger(run_dir / "eval_ledger.jsonl").done() == {("step_0000007", "retrieval"),
                                                            ("step_0000014", "retrieval")}
    _plain_export(run_dir, 21)                  # the upload finished: only it is scored
    assert [n["checkpoint"] for n in evaluate_pending(str(run_dir), str(phantom / "shards"),
                                                      ["retrieval"], None)] == ["step_0000021"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_crashed_actor_is_restarted(run_dir, phantom):
    import ray

    from evaluators.actor import watch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    try:
        scored = watch(str(run_dir), str(phantom / "shards"), ["retrieval"], None, cpus=0.5, before_task=crash_once)
    finally:
        ray.shutdown()
    assert (run_dir / "eval_crashed_once").is_file(), "the evaluator did not crash"
    assert sorted(n["checkpoint"] for n in scored) == ["step_0000007", "step_0000014"]
    assert len((run_dir / "eval_ledger.jsonl").read_text().splitlines()) == 2


def test_rotated_checkpoint_is_recorded_not_retried(run_dir, phantom, monkeypatch):
    """Ray Train deletes old checkpoints (train.keep_checkpoints): one that vanishes before it is
    scored gets a ledger line saying so, and the evaluator carries on with the rest."""
    import shutil

    import evaluators.scoring as scoring

    real = scoring.Scoring

    def rotate_first(ck, *a, **kw):
        if Path(ck).name == "step_0000007":
            shutil.rmtree(ck)
        return real(ck, *a, **kw)

    monkeypatch.setattr(scoring, "Scoring", rotate_first)
    new = evaluate_pending(str(run_dir), str(phantom / "shards"), ["retrieval"], None)
    assert [(n["checkpoint"], bool(n.get("error"))) for n in new] == [("step_0000007", True), ("step_0000014", False)]
    rec = Ledger(run_dir / "eval_ledger.jsonl").records()
    assert rec[0]["error"].startswith("FileNotFoundError") and rec[1]["error"] is None
    assert evaluate_pending(str(run_dir), str(phantom / "shards"), ["retrieval"], None) == []
