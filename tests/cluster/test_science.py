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


def test_text_mlm_stage_is_made_once_and_keyed_by_its_inputs(tmp_path, monkeypatch):
    """The MLM stage is the real ``trainer.text_mlm`` command (tested in tests/trainer), made once
    (a stand-in for a downloaded pretrained encoder, shared by every seed): the same inputs reuse
    the folder, other steps make another, and a missing corpus stops with its path."""
    calls = []

    def fake_sh(cmd):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "text_mlm.json").write_text("{}")

    monkeypatch.setattr(science, "sh", fake_sh)
    (tmp_path / "c.txt").write_text("No effusion.\n")
    corpus = [str(tmp_path / "c.txt")]
    a = science.text_mlm(tmp_path / "shards", tmp_path / "runs", 50, corpus)
    assert science.text_mlm(tmp_path / "shards", tmp_path / "runs", 50, corpus) == a and len(calls) == 1
    b = science.text_mlm(tmp_path / "shards", tmp_path / "runs", 60, corpus)
    assert b != a and b.parent == a.parent == tmp_path / "runs" and len(calls) == 2
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "trainer.text_mlm"] and cmd[cmd.index("--steps") + 1] == "50"
    assert cmd[cmd.index("--corpus") + 1] == str((tmp_path / "c.txt").resolve())
    assert f"data.shards={tmp_path / 'shards'}" in cmd
    with pytest.raises(SystemExit, match="missing.csv"):
        science.text_mlm(tmp_path / "shards", tmp_path / "runs", 50, [str(tmp_path / "missing.csv")])
