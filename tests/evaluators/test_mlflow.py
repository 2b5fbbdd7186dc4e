"""Every task through the one-shot CLI; metrics by step, artifacts and the model registry in a real
MLflow server on loopback."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from common.labels import FINDINGS
from common.metric_names import mlflow_name
from tests.evaluators.test_tasks import _plain_export


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR (pycocoevalcap) needs a Java runtime")
def test_score_cli_all_tasks(phantom24, tmp_path, capsys):
    from evaluators import score

    shards, texts = phantom24
    ck = _plain_export(tmp_path, 7, texts=texts)
    out = tmp_path / "scores.json"
    assert score.main(["--checkpoint", str(ck), "--data", str(shards), "--tasks", "all", "--bootstrap", "30",
                       "--set", "eval.seg_steps=3", "--set", "eval.reportgen_steps=20", "--out", str(out)]) == 0
    r = json.loads(out.read_text())[0]
    m = r["metrics"]
    for k in ("zeroshot/mean_auc", "zeroshot/mean_f1", "retrieval/i2t_R@1", "retrieval/t2i_R@5", "probe/mean_auc",
              "reportgen/bleu1", "reportgen/bleu4", "reportgen/meteor", "reportgen/rouge_l",
              "segmentation/mean_dice", "segmentation/random_init/mean_dice", "segmentation/dice/lung"):
        assert k in m and np.isfinite(m[k]), k
    assert m["segmentation/steps"] == 3.0                      # the --set override reached the task
    art = ck / "eval"
    table = (art / "zeroshot_auc_table.csv").read_text().splitlines()
    assert table[0].startswith("label,") and len(table) == 1 + 18    # every label, scored or why not
    assert (art / "zeroshot_roc.png").read_bytes()[:4] == b"\x89PNG"
    samples = json.loads((art / "reportgen_samples.json").read_text())
    assert len(samples) == int(json.loads((shards / "manifest.json").read_text())["counts"]["written_by_split"]["test"])
    assert "reportgen/bleu4" in capsys.readouterr().out             # the printed table


def test_unknown_task_is_named(phantom24, tmp_path):
    from evaluators.scoring import score_checkpoint

    with pytest.raises(ValueError, match=r"unknown task\(s\) \['segmentaton'\]"):
        score_checkpoint(_plain_export(tmp_path), str(phantom24[0]), ["segmentaton"])


def test_mlflow_metrics_artifacts_and_registry(phantom24, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from evaluators.actor import Ledger, evaluate_pending
    from trainer.export import load_export

    shards, texts = phantom24
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("eval-test")
    run_id = client.create_run(exp).info.run_id
    for step, seed in ((7, 1), (14, 2)):
        _plain_export(tmp_path, step, seed=seed, info={"mlflow_run_id": run_id}, texts=texts)
    new = evaluate_pending(str(tmp_path), str(shards), ["zeroshot", "retrieval"], mlflow_uri,
                           best_metric="zeroshot/mean_auc", registry_name="t3d-eval-test")
    assert len(new) == 4 and not any(n.get("error") for n in new)
    recs = Ledger(tmp_path / "eval_ledger.jsonl").records()
    by_step = {r["step"]: r["metrics"]["zeroshot/mean_auc"] for r in recs if r["task"] == "zeroshot"}
    hist = client.get_metric_history(run_id, mlflow_name("zeroshot/mean_auc"))      # eval/zeroshot_mean_auc
    assert {h.step: h.value for h in hist} == pytest.approx(by_step)
    assert [h.step for h in client.get_metric_history(run_id, mlflow_name("retrieval/i2t_R@1"))] == [7, 14]
    files = {f.path for f in client.list_artifacts(run_id, "eval/step_0000007")}
    assert {"eval/step_0000007/zeroshot_roc.png", "eval/step_0000007/zeroshot_auc_table.csv",
            "eval/step_0000007/zeroshot_table.json"} <= files
    (tmp_path / "tables").mkdir()
    t = json.loads(open(client.download_artifacts(run_id, "eval/step_0000007/zeroshot_table.json",
                                                  str(tmp_path / "tables"))).read())
    assert len(t["data"]) == 18 and {row[t["columns"].index("label")] for row in t["data"]} == set(FINDINGS)
    assert "eval/step_0000007/zeroshot_table.json" in client.get_run(run_id).data.tags["mlflow.loggedArtifacts"]
    assert "eval/metrics_over_checkpoints.png" in {f.path for f in client.list_artifacts(run_id, "eval")}
    # the best checkpoint is a registered model version, with its weights, under the alias 'best'
    best_step = max(by_step, key=lambda s: (by_step[s], -s))
    mv = client.get_model_version_by_alias("t3d-eval-test", "best")
    assert mv.tags["step"] == str(best_step) and mv.run_id == run_id
    note = client.get_run(run_id).data.tags["mlflow.note.content"]     # the run's description, rewritten
    assert f"| **{best_step}** | step_{best_step:07d} |" in note and f"model `t3d-eval-test` v{mv.version}" in note
    assert "metrics over checkpoints](#/experiments/" in note and "95% bootstrap CI" in note
    (tmp_path / "dl").mkdir()           # (no mlflow.set_tracking_uri: it leaks into later tests' env)
    local = client.download_artifacts(run_id, f"checkpoints/step_{best_step:07d}", str(tmp_path / "dl"))
    model, tok, cfg, info = load_export(local)
    assert info["step"] == best_step
    # nothing new: nothing scored twice, no new version
    assert evaluate_pending(str(tmp_path), str(shards), ["zeroshot", "retrieval"], mlflow_uri,
                            best_metric="zeroshot/mean_auc", registry_name="t3d-eval-test") == []
    assert len(client.search_model_versions("name='t3d-eval-test'")) == 1


def test_external_dataset_in_mlflow(phantom24, tmp_path, mlflow_uri):
    """An external dataset's metrics reach the run under ``external/<name>/`` (MLflow names through
    ``mlflow_name``), its tables under ``eval/step_X/external/<name>/``; the best checkpoint may be
    chosen on an external key, and the run note's table has the external column."""
    from mlflow.tracking import MlflowClient

    from evaluators.actor import evaluate_pending

    shards, texts = phantom24
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("eval-external")).info.run_id
    for step, seed in ((7, 1), (14, 2)):
        _plain_export(tmp_path, step, seed=seed, info={"mlflow_run_id": run_id}, texts=texts)
    metric = "external/ext/retrieval/i2t_R@5"
    new = evaluate_pending(str(tmp_path), {"ct": str(shards), "ext": str(shards)}, ["retrieval"], mlflow_uri,
                           best_metric=metric, registry_name="t3d-eval-external")
    assert [n["task"] for n in new] == ["retrieval", "external/ext/retrieval"] * 2
    hist = client.get_metric_history(run_id, "external/ext/retrieval_i2t_R_at_5")
    assert hist == client.get_metric_history(run_id, mlflow_name(metric)) and sorted(h.step for h in hist) == [7, 14]
    assert [h.value for h in sorted(hist, key=lambda h: h.step)] == pytest.approx(
        [h.value for h in sorted(client.get_metric_history(run_id, mlflow_name("retrieval/i2t_R@5")),
                                 key=lambda h: h.step)])
    assert client.get_metric_history(run_id, "task/external/ext/retrieval/i2t_R_at_1")
    mv = client.get_model_version_by_alias("t3d-eval-external", "best")
    assert mv.tags["metric"] == metric
    note = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert f"`{metric}`" in note and "| ext I→T R@5 |" in note
