"""Ray Tune sweeps: bad search spaces are refused up front; a tiny sweep runs full pretraining trials,
reports validation scores, writes a best config that trains, and a resumed sweep reruns nothing."""
from __future__ import annotations

import csv
import json

import pytest

from common.config import ConfigError, load_config
from tests.conftest import REPO


@pytest.mark.parametrize("space, msg", [
    ("{tma.w_locl: {uniform: [0, 1]}}", r"sweep.space\['tma.w_locl'\]: unknown config key"),
    ("{tma.w_local: {uniform: [1, 0.5]}}", r"sweep.space\['tma.w_local'\]: empty range"),
    ("{tma.w_local: {loguniform: [0, 1]}}", r"sweep.space\['tma.w_local'\]: loguniform needs low > 0"),
    ("{train.lr: {choice: []}}", r"sweep.space\['train.lr'\]: choice needs a non-empty list"),
    ("{train.lr: {normal: [0, 1]}}", r"sweep.space\['train.lr'\] kind: 'normal' is not one of"),
    ("{tma: {choice: [1]}}", r"sweep.space\['tma'\]: 'tma' is a section"),
])
def test_bad_search_space_is_rejected_with_its_key(space, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(REPO / "configs/sweep_phantom.yaml", [f"sweep.space={space}"])


def test_values_of_the_wrong_type_are_rejected_before_anything_runs():
    from trainer.sweep import check_space_types

    cfg = load_config(REPO / "configs/sweep_phantom.yaml", ["sweep.space={train.steps: {uniform: [10, 20]}}"])
    with pytest.raises(ConfigError, match=r"sweep.space\['train.steps'\]: uniform value 10.0 does not fit.*expected int"):
        check_space_types(cfg)
    cfg = load_config(REPO / "configs/sweep_phantom.yaml", ["sweep.space={tma.token_pool: {choice: [mean, max]}}"])
    with pytest.raises(ConfigError, match=r"sweep.space\['tma.token_pool'\]: choice value 'max' does not fit"):
        check_space_types(cfg)
    with pytest.raises(ConfigError, match="grid is not supported with sweep.search=optuna"):
        load_config(REPO / "configs/sweep_phantom.yaml", ["sweep.search=optuna",
                                                          "sweep.space={tma.w_local: {grid: [0.5, 1.0]}}"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_tiny_sweep_best_config_and_resume(phantom24, tmp_path, mlflow_uri):
    import ray

    from trainer import sweep
    from trainer.pretrain import fit

    shards, _ = phantom24
    sets = [f"data.shards={shards}", f"train.output_dir={tmp_path}", "train.steps=2", "train.checkpoint_every=1",
            "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "train.health_batch=4",
            "sweep.name=tiny", "sweep.space={tma.w_local: {grid: [0.5, 1.0]}}", "sweep.num_samples=1",
            "sweep.max_concurrent_trials=2", "sweep.grace_checkpoints=1", "ray.num_cpus=6",
            f"tracking.mlflow_uri={mlflow_uri}", "tracking.experiment=sweep-test"]
    cfg = load_config(REPO / "configs/sweep_phantom.yaml", sets)
    try:
        out = sweep.run(cfg)
        rows = out["rows"]
        assert sorted(r["tma.w_local"] for r in rows) == [0.5, 1.0]
        assert all(r["status"] == "TERMINATED" and r["error"] == "" for r in rows), rows
        key = "best valid/zeroshot/mean_auc"
        assert all(0.0 <= r[key] <= 1.0 for r in rows) and {r["best step"] for r in rows} <= {1, 2}
        root = tmp_path / "sweeps" / "tiny"
        with open(root / "results.csv") as f:
            assert len(list(csv.DictReader(f))) == 2
        assert (root / "score_vs_knobs.png").read_bytes()[:4] == b"\x89PNG"
        # each trial is a pretraining run with its checkpoints, scored by the evaluators
        ckpts = {p for r in rows for p in (root / "trials" / f"trial-{r['trial']}").glob("step_*")}
        assert len(ckpts) == 4
        state = json.loads((sorted(ckpts)[-1] / "state.json").read_text())
        assert state["step"] in (1, 2)
        # MLflow: one parent run with the table, the plot and the best config; a nested child run
        # per trial with its swept value and its loss curve; the best checkpoint registered
        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_uri)
        parent = client.get_run(out["mlflow_run_id"])
        assert parent.info.status == "FINISHED"
        assert {"results.csv", "score_vs_knobs.png", "best_config.yaml", "results_table.json"} <= {
            f.path for f in client.list_artifacts(parent.info.run_id)}
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(float(c.data.params["tma.w_local"]) for c in children) == [0.5, 1.0]
        for c in children:
            assert [h.step for h in client.get_metric_history(c.info.run_id, "loss/loss")] == [1, 2]
            assert "eval/valid/zeroshot_mean_auc" in c.data.metrics          # the headline, first on its page
        note = parent.data.tags["mlflow.note.content"]                        # the sweep's description
        assert note.startswith(f"**Best trial** {out['best']['trial']}: ") and "| trial | `tma.w_local` |" in note
        mv = client.get_model_version_by_alias("tiny", "best")
        assert mv.tags["trial"] == str(out["best"]["trial"]) and mv.run_id in {c.info.run_id for c in children}
        # a resumed sweep has nothing left to run: no trial reruns, no new checkpoint
        again = sweep.run(cfg, resume=True)
        assert sorted((r["trial"], r["best step"]) for r in again["rows"]) == sorted((r["trial"], r["best step"]) for r in rows)
        assert {p for r in rows for p in (root / "trials" / f"trial-{r['trial']}").glob("step_*")} == ckpts
        # the best config is a pretraining config that trains as it is
        best = load_config(root / "best_config.yaml")
        assert best.tma.w_local == out["best"]["tma.w_local"] and best.sweep.space == {}
        result, run_dir, _, _ = fit(best)
        assert result.error is None and (run_dir / "step_0000002" / "export").is_dir()
        assert run_dir.name == "tiny-best"
    finally:
        ray.shutdown()
