"""`make science`'s table: one variant (``--only clip``, or a score-only rerun) or both with the
paired delta (a one-variant run used to end in an IndexError after training)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster import science
from common.labels import FINDINGS


def _fake(rng, y, signal):
    k = [FINDINGS.index(f) for f in science.PLANTED]
    probs = rng.random(y.shape)
    probs[:, k] += signal * y[:, k]                 # planted labels carry signal
    return {"labels": y.tolist(), "probs_single": probs.tolist(), "probs_ensemble": probs.tolist(),
            "report_probs_single": probs.tolist(), "report_probs_ensemble": probs.tolist(),
            "metrics": {"probe/mean_auc": 0.8, "probe/auc/Lung nodule": 0.6}}


def test_table_one_variant_and_both():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 18)) < 0.4).astype(float)
    res = {"clip": _fake(rng, y, 0.0)}
    text, summary = science.table(res, n_boot=20, seed=0)
    assert "CLIP+TMA" not in text and "delta" not in text
    assert set(summary["single"]["mean"]) == {"clip"} and abs(summary["single"]["mean"]["clip"] - 0.5) < 0.15
    assert "probe/auc/Lung nodule" in text
    res["tma"] = _fake(rng, y, 1.0)
    text, summary = science.table(res, n_boot=20, seed=0)
    assert "CLIP+TMA" in text and "delta" in text
    assert summary["single"]["mean"]["tma"] > 0.9 > summary["single"]["mean"]["clip"]
    d, lo, hi = summary["single"]["per_label"]["Lung nodule"]["delta"]
    assert lo <= d <= hi and d > 0.2


def _fake_text_mlm_command(calls):
    def fake_sh(cmd):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "text_mlm.json").write_text("{}")
    return fake_sh


def test_text_mlm_stage_is_made_once_and_keyed_by_its_inputs(tmp_path, monkeypatch):
    """The MLM stage is the real ``trainer.text_mlm`` command (tested in tests/trainer), made once
    (a stand-in for a downloaded pretrained encoder, shared by every seed): the same inputs reuse
    the folder; other steps, overrides or corpus contents make another; a missing corpus stops
    with its path."""
    calls = []
    monkeypatch.setattr(science, "sh", _fake_text_mlm_command(calls))
    c = tmp_path / "c.txt"
    c.write_text("No effusion.\n")
    sh_, runs = tmp_path / "shards", tmp_path / "runs"
    a = science.text_mlm(sh_, runs, 50, [str(c)], ["model.text_unit=sentence"])
    assert science.text_mlm(sh_, runs, 50, [str(c)], ["model.text_unit=sentence"]) == a and len(calls) == 1
    others = {science.text_mlm(sh_, runs, 60, [str(c)], ["model.text_unit=sentence"]),
              science.text_mlm(sh_, runs, 50, [str(c)], [])}
    # an override that does not shape the text tower (passed on when the tower is made) reuses it
    assert science.text_mlm(sh_, runs, 50, [str(c)], ["model.text_unit=sentence", "model.image_pool=gem"]) == a
    assert len(calls) == 3
    c.write_text("No effusion. Heart is normal.\n")
    others.add(science.text_mlm(sh_, runs, 50, [str(c)], ["model.text_unit=sentence"]))
    assert len(others | {a}) == 4 and all(f.parent == runs for f in others) and len(calls) == 4
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "trainer.text_mlm"] and cmd[cmd.index("--steps") + 1] == "50"
    assert cmd[cmd.index("--corpus") + 1] == str(c.resolve()) and "model.text_unit=sentence" in cmd
    assert f"data.shards={sh_}" in cmd
    with pytest.raises(SystemExit, match="missing.csv"):
        science.text_mlm(sh_, runs, 50, [str(tmp_path / "missing.csv")], [])


@pytest.mark.parametrize("extra, made, encoder", [
    ([], True, "tower"),                                              # default: the MLM tower, both runs
    (["--set", "model.text_encoder=/models/MedCPT"], False, "/models/MedCPT"),   # the user's encoder wins
    (["--text-mlm-steps", "0"], False, None),                          # a from-scratch text tower
])
def test_both_runs_get_the_text_tower(tmp_path, monkeypatch, extra, made, encoder):
    calls, trained = [], []
    monkeypatch.setattr(science, "sh", _fake_text_mlm_command(calls))
    monkeypatch.setattr(science, "prepare_data", lambda root, n, seed: tmp_path / "shards")
    monkeypatch.setattr(science, "TEXT_CORPUS", tmp_path / "corpus.csv")
    (tmp_path / "corpus.csv").write_text("report_text\nNo effusion.\n")
    monkeypatch.setattr(science, "train", lambda v, shards, out, seed, o: trained.append((v, o)) or tmp_path / v)
    with pytest.raises(SystemExit, match="no exported checkpoint"):     # nothing trained: scoring stops
        science.main(["--out", str(tmp_path / "runs"), "--set", "train.steps=5", *extra])
    assert len(calls) == int(made) and [v for v, _ in trained] == ["clip", "tma"]
    for _, o in trained:
        enc = [x.split("=", 1)[1] for x in o if x.startswith("model.text_encoder=")]
        assert "train.steps=5" in o
        if encoder == "tower":
            assert enc == [calls[0][calls[0].index("--out") + 1]] and "train.steps=5" in calls[0]
            assert calls[0][calls[0].index("--corpus") + 1] == str(tmp_path / "corpus.csv")
        else:
            assert enc == ([encoder] if encoder else [])
