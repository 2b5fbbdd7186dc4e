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


RESTORE_ON = ["restore.enabled=true", "restore.block_size=[8,8,4]", "restore.width=32"]


def test_restoration_picture_at_each_restore_checkpoint(tmp_path, phantom, monkeypatch):
    """A checkpoint trained with ``restore.enabled`` gets ``restore.png`` and ``restore/error`` in
    its eval folder and the ledger (job ``restore``), once: a restarted evaluator redoes nothing. The
    same study and corruption seed at every checkpoint; one without restoration gets nothing; a
    failing picture is a ledger error and the tasks are still scored."""
    import evaluators.scoring as scoring

    for step in (7, 14):
        _plain_export(tmp_path, step, seed=step, overrides=RESTORE_ON)
    _plain_export(tmp_path, 21)                                            # restore disabled
    shards = str(phantom / "shards")
    new = evaluate_pending(str(tmp_path), shards, ["retrieval"], None)
    assert [(n["checkpoint"], n["task"]) for n in new] == [
        ("step_0000007", "retrieval"), ("step_0000007", "restore"),
        ("step_0000014", "retrieval"), ("step_0000014", "restore"), ("step_0000021", "retrieval")]
    recs = {(r["checkpoint"], r["task"]): r for r in Ledger(tmp_path / "eval_ledger.jsonl").results()}
    for ck in ("step_0000007", "step_0000014"):
        png = tmp_path / ck / "eval" / "restore.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        m = recs[(ck, "restore")]["metrics"]
        assert m["restore/error"] > 0 and 0.5 < m["restore/corrupted_fraction"] < 0.7
        assert recs[(ck, "restore")]["error"] is None and recs[(ck, "restore")]["step"] == int(ck[-2:])
        saved = json.loads((tmp_path / ck / "eval" / "metrics.json").read_text())
        assert saved["restore/error"] == m["restore/error"] and "retrieval/i2t_R@1" in saved
    same = recs[("step_0000007", "restore")]["metrics"]["restore/corrupted_fraction"]
    assert recs[("step_0000014", "restore")]["metrics"]["restore/corrupted_fraction"] == same   # same corruption
    assert not (tmp_path / "step_0000021" / "eval" / "restore.png").exists()
    assert ("step_0000021", "restore") not in recs
    assert evaluate_pending(str(tmp_path), shards, ["retrieval"], None) == []             # restart: nothing redone

    def broken(*a, **kw):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr("trainer.model.restore.restoration_figure", broken)
    _plain_export(tmp_path, 28, overrides=RESTORE_ON)
    new = evaluate_pending(str(tmp_path), shards, ["retrieval"], None)
    assert [(n["task"], bool(n.get("error"))) for n in new] == [("retrieval", False), ("restore", True)]
    last = Ledger(tmp_path / "eval_ledger.jsonl").results()[-1]
    assert last["task"] == "restore" and last["error"].startswith("RuntimeError") and "exploded" in last["error"]
    assert evaluate_pending(str(tmp_path), shards, ["retrieval"], None) == []             # recorded, not retried
    assert scoring.PICTURE_PNG == "restore.png"
