"""External validation: ``eval.datasets`` (the first the internal set, every other scored as
``external/<name>/<key>``), its checks, and the evaluators scoring one export on two datasets."""
from __future__ import annotations

import json
import math

import pytest

from common.config import ConfigError, load_config
from common.labels import FINDINGS
from common.metric_names import external_key, mlflow_name, split_external
from evaluators.config import INTERNAL, eval_datasets, parse_datasets
from tests.conftest import REPO
from tests.evaluators.test_tasks import _plain_export


# ------------------------------------------------------------------------------- config and names
def _cfg(*overrides):
    return load_config(REPO / "configs" / "debug.yaml", list(overrides))


def test_default_is_the_runs_shards_alone():
    cfg = _cfg()
    assert cfg.eval.datasets == {} and eval_datasets(cfg) == {INTERNAL: cfg.data.shards}
    cfg = _cfg("eval.datasets={ct: data/shards, ext: s3://t3d/ext/shards}", "eval.best_metric=external/ext/zeroshot/mean_auc")
    assert list(eval_datasets(cfg).items()) == [("ct", "data/shards"), ("ext", "s3://t3d/ext/shards")]   # in order


@pytest.mark.parametrize("overrides, match", [
    (["eval.datasets={Ext: data/x}"], r"eval.datasets: dataset name 'Ext' must be lower-case"),
    (["eval.datasets={ct: data/s, ext/a: data/x}"], r"dataset name 'ext/a'"),
    (["eval.datasets={ct: data/s, ext: ''}"], r"eval.datasets.ext: expected a shard folder or URI"),
    (["eval.datasets={ct: data/s, ext: 3}"], r"config key 'eval.datasets': expected dict"),
    (["eval.datasets=[data/s]"], r"config key 'eval.datasets': expected dict"),
    (["eval.best_metric=external/ext/zeroshot/mean_auc"], r"eval.best_metric: 'external/ext/zeroshot/mean_auc'"),
    (["eval.datasets={ct: data/s, ext: data/x}", "eval.best_metric=external/ct/zeroshot/mean_auc"],
     r"eval.best_metric: .*external datasets: \['ext'\]"),     # the first dataset is the internal one
    (["eval.datasets={ct: data/s, ext: data/x}", "eval.best_metric=external/ext"], r"eval.best_metric"),
])
def test_bad_datasets_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*overrides)


def test_parse_data_arguments():
    assert parse_datasets(["data/shards"]) == {INTERNAL: "data/shards"}                 # as before
    assert list(parse_datasets(["data/shards", "ext=s3://b/ext"]).items()) == [(INTERNAL, "data/shards"),
                                                                              ("ext", "s3://b/ext")]
    assert list(parse_datasets(["ct=data/s", "ext=/x/y=z"])) == ["ct", "ext"]
    assert parse_datasets(["s3://b/k=v"]) == {INTERNAL: "s3://b/k=v"}                 # a URI with '=' is a URI
    with pytest.raises(ValueError, match="name every dataset but the first"):
        parse_datasets(["data/a", "data/b"])
    with pytest.raises(ValueError, match="dataset 'ext' given twice"):
        parse_datasets(["data/a", "ext=x", "ext=y"])
    with pytest.raises(ValueError, match="dataset name 'Ext'"):
        parse_datasets(["data/a", "Ext=x"])


def test_external_names():
    k = external_key("ext", "zeroshot/mean_auc")
    assert k == "external/ext/zeroshot/mean_auc" and split_external(k) == ("ext", "zeroshot/mean_auc")
    assert split_external("zeroshot/mean_auc") == (None, "zeroshot/mean_auc")
    assert mlflow_name(k) == "external/ext/zeroshot_mean_auc"                     # the headline, grouped
    assert mlflow_name("external/ext/zeroshot/auc_ci_lo/Emphysema") == "task/external/ext/zeroshot/auc_ci_lo/Emphysema"
    assert mlflow_name("external/ext/retrieval/i2t_R@5") == "external/ext/retrieval_i2t_R_at_5"


# --------------------------------------------------------------------------- scoring on two datasets
def test_one_export_scored_on_two_datasets(phantom24, tmp_path):
    """The same shards under two names give the same figures under two sets of keys; a dataset that
    is gone at checkpoint time is a ledger error naming it, and the others are scored."""
    from common.metric_names import HEADLINE
    from evaluators.actor import Ledger, evaluate_pending
    from evaluators.artifacts import best_checkpoint, plot_over_checkpoints
    from evaluators.run_note import checkpoint_rows, columns
    from trainer.dashboard import RunNote, render_run_note

    shards, texts = phantom24
    _plain_export(tmp_path, 7, texts=texts)
    gone = tmp_path / "gone" / "shards"
    datasets = {"ct": str(shards), "gone": str(gone), "ext": str(shards)}
    new = evaluate_pending(str(tmp_path), datasets, ["zeroshot", "retrieval"], None)
    assert [(n["task"], bool(n.get("error"))) for n in new] == [
        ("zeroshot", False), ("retrieval", False), ("external/gone/zeroshot", True), ("external/gone/retrieval", True),
        ("external/ext/zeroshot", False), ("external/ext/retrieval", False)]
    assert "external dataset 'gone'" in new[2]["error"] and str(gone) in new[2]["error"]
    recs = Ledger(tmp_path / "eval_ledger.jsonl").results()
    by = {r["task"]: r for r in recs}
    assert "dataset" not in by["zeroshot"]                       # an internal line is as before
    assert by["external/ext/zeroshot"]["dataset"] == "ext" and by["external/ext/zeroshot"]["shards"] == str(shards)
    assert by["external/gone/zeroshot"]["error"].startswith("FileNotFoundError: external dataset 'gone'")
    internal, ext = by["zeroshot"]["metrics"], by["external/ext/zeroshot"]["metrics"]
    assert all(not k.startswith("external/") for k in internal)
    assert {external_key("ext", k) for k in internal} == set(ext)         # every key, per-label and CIs too
    assert ext == pytest.approx({external_key("ext", k): v for k, v in internal.items()})
    cis = [f for f in FINDINGS if f"external/ext/zeroshot/auc_ci_lo/{f}" in ext]
    assert cis and all(ext[f"external/ext/zeroshot/auc_ci_lo/{f}"] <= ext[f"external/ext/zeroshot/auc/{f}"]
                       <= ext[f"external/ext/zeroshot/auc_ci_hi/{f}"] for f in cis)
    assert {mlflow_name(k) for k in ext} >= {"external/ext/zeroshot_mean_auc", "external/ext/zeroshot_mean_f1",
                                             f"task/external/ext/zeroshot/auc_ci_hi/{cis[0]}"}
    assert "external/ext/retrieval/i2t_R@1" in by["external/ext/retrieval"]["metrics"]
    # artifacts: one metrics.json with every dataset's keys; the external tables in their own folder
    art = tmp_path / "step_0000007" / "eval"
    m = json.loads((art / "metrics.json").read_text())
    assert "zeroshot/mean_auc" in m and "external/ext/zeroshot/mean_auc" in m
    assert (art / "zeroshot_auc_table.csv").is_file() and (art / "external" / "ext" / "zeroshot_auc_table.csv").is_file()
    assert (art / "external" / "ext" / "zeroshot_roc.png").read_bytes()[:4] == b"\x89PNG"
    # best checkpoint on an external key; the plot and the run note's table carry the external set
    assert best_checkpoint(recs, "external/ext/zeroshot/mean_auc")[:2] == ("step_0000007", 7)
    assert plot_over_checkpoints(recs, tmp_path / "over.png").read_bytes()[:4] == b"\x89PNG"
    cols = columns(recs, "external/ext/retrieval/i2t_R@5")
    assert cols["external/ext/zeroshot/mean_auc"] == "ext zero-shot AUC" and cols["external/ext/retrieval/i2t_R@5"] == "ext " + HEADLINE["retrieval/i2t_R@5"]
    assert not any(k.startswith("external/gone/") for k in cols)
    rows = checkpoint_rows(recs, cols)
    note = render_run_note(RunNote("r", checkpoints=rows, columns=cols))
    head = next(line for line in note.splitlines() if line.startswith("| step"))
    assert head.index("zero-shot AUC") < head.index("ext zero-shot AUC") < head.index("ext I→T R@5")
    assert math.isclose(rows[0]["external/ext/zeroshot/mean_auc"], internal["zeroshot/mean_auc"])
    # idempotent: nothing scored twice, the error not retried; a new dataset is scored alone
    assert evaluate_pending(str(tmp_path), datasets, ["zeroshot", "retrieval"], None) == []
    more = evaluate_pending(str(tmp_path), {**datasets, "ext2": str(shards)}, ["retrieval"], None)
    assert [n["task"] for n in more] == ["external/ext2/retrieval"]


def test_score_cli_on_two_datasets(phantom24, tmp_path, capsys):
    from evaluators import score

    shards, texts = phantom24
    ck = _plain_export(tmp_path, 7, texts=texts)
    out = tmp_path / "scores.json"
    assert score.main(["--checkpoint", str(ck), "--data", str(shards), "--data", f"ext={shards}",
                       "--tasks", "retrieval", "--out", str(out)]) == 0
    r = json.loads(out.read_text())[0]
    assert r["datasets"] == {INTERNAL: str(shards), "ext": str(shards)} and r["errors"] == {}
    assert r["metrics"]["external/ext/retrieval/i2t_R@1"] == r["metrics"]["retrieval/i2t_R@1"]
    printed = capsys.readouterr().out
    assert printed.index("\nretrieval/i2t_R@1") < printed.index("\nexternal/ext/retrieval/i2t_R@1")  # internal first


def test_a_missing_dataset_stops_before_scoring(phantom24, tmp_path, monkeypatch):
    """The CLIs and the training job's watcher name the dataset and its location, before any scoring."""
    import evaluators.scoring as scoring
    from evaluators import actor, score
    from evaluators.actor import EvalThread

    shards, _ = phantom24
    missing = tmp_path / "nowhere" / "shards"
    ck = _plain_export(tmp_path, 7)

    def no_scoring(*a, **kw):
        raise AssertionError("scoring started")

    monkeypatch.setattr(scoring, "Scoring", no_scoring)
    monkeypatch.setattr(score, "score_datasets", no_scoring)
    with pytest.raises(SystemExit, match=rf"external dataset 'ext' at {missing}: cannot read its shards"):
        score.main(["--checkpoint", str(ck), "--data", str(shards), "--data", f"ext={missing}"])
    with pytest.raises(SystemExit, match=rf"internal dataset 'internal' at {missing}"):
        score.main(["--checkpoint", str(ck), "--data", str(missing)])
    with pytest.raises(SystemExit, match=rf"external dataset 'ext' at {missing}"):
        actor.main(["--run-dir", str(tmp_path), "--data", str(shards), "--data", f"ext={missing}"])
    with pytest.raises(SystemExit, match=r"--best-metric: 'external/other/zeroshot/mean_auc'"):
        actor.main(["--run-dir", str(tmp_path), "--data", str(shards), "--data", f"ext={shards}",
                    "--best-metric", "external/other/zeroshot/mean_auc"])
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "manifest.json").write_text("{not json")
    cfg = _cfg(f"data.shards={shards}", f"eval.datasets={{ct: {shards}, ext: {tmp_path / 'torn'}}}")
    with pytest.raises(ValueError, match=r"external dataset 'ext' at .*torn: cannot read its shards \(JSONDecodeError"):
        EvalThread(str(tmp_path), cfg, None)
    assert EvalThread(str(tmp_path), _cfg(f"data.shards={shards}"), None).args[1] == {INTERNAL: str(shards)}
