"""`make science-targets`: issue #9's targets judged over the seeds' `science-s*.json` reports, made here by
`experiments.science.table` from planted-signal scores so that the report format is the real one."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from common.labels import FINDINGS
from experiments import science, science_targets


def _variant(rng, y, signal: dict[str, float]):
    probs = rng.random(y.shape)
    for f, s in signal.items():
        k = FINDINGS.index(f)
        probs[:, k] += s * y[:, k]
    return {"labels": y.tolist(), "probs_single": probs.tolist(), "probs_ensemble": probs.tolist(),
            "report_probs_single": probs.tolist(), "report_probs_ensemble": probs.tolist(), "metrics": {}}


@functools.lru_cache(maxsize=None)
def _summary(seed: int, small_tma: float) -> dict:
    rng = np.random.default_rng(seed)
    y = (rng.random((80, 18)) < 0.5).astype(float)
    large = {f: 3.0 for f in science.PLANTED if f not in science_targets.SMALL}
    clip = _variant(rng, y, {**large, **{f: 0.3 for f in science_targets.SMALL}})
    tma = _variant(rng, y, {**large, **{f: small_tma for f in science_targets.SMALL}})
    return science.table({"clip": clip, "tma": tma}, n_boot=40, seed=seed)[1]


def _write(tmp_path, seeds, small_tma: float, data_seed=0):
    for s in seeds:
        summary = _summary(s, small_tma)
        (tmp_path / f"science-s{s}.json").write_text(json.dumps({"seed": s, "data_seed": data_seed, "n": 80,
                                                                  "overrides": [], "summary": summary}))


def test_targets_met_when_tma_wins_the_small_findings(tmp_path, capsys):
    _write(tmp_path, [0, 1, 2], small_tma=3.0)
    assert science_targets.main(["--out", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "NOT met" not in out and out.count("[met]") == 6


def test_targets_not_met_name_the_target_and_numbers(tmp_path, capsys):
    _write(tmp_path, [0, 1, 2], small_tma=0.0)              # TMA worse than CLIP on the small findings
    assert science_targets.main(["--out", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "[NOT met] CLIP+TMA beats CLIP-only on Lung nodule beyond the CI at every seed: CI lower bounds -" in out
    assert "[NOT met] CLIP+TMA mean >= 0.88" in out and "[NOT met] CLIP+TMA every planted finding >= 0.75" in out
    assert science_targets.main(["--out", str(tmp_path)]) == 0    # a report, not a check


def test_too_few_seeds_is_not_met(tmp_path, capsys):
    _write(tmp_path, [0, 1], small_tma=3.0)
    assert science_targets.main(["--out", str(tmp_path), "--check"]) == 1
    assert "[NOT met] at least 3 seeds: 2 found" in capsys.readouterr().out


def test_bad_reports_are_named(tmp_path, capsys):
    assert science_targets.main(["--out", str(tmp_path)]) == 2
    assert "no science-s*.json" in capsys.readouterr().err
    (tmp_path / "science-s0.json").write_text('{"seed": 0, "summary": {"single": {"per_label": {}}}}')
    assert science_targets.main(["--out", str(tmp_path)]) == 2
    assert "science-s0.json: needs both variants scored" in capsys.readouterr().err
    (tmp_path / "science-s0.json").write_text("{not json")
    with pytest.raises(ValueError, match="science-s0.json: not a experiments.science report"):
        science_targets.load(tmp_path)
    _write(tmp_path, [0], small_tma=3.0)
    _write(tmp_path, [1], small_tma=3.0, data_seed=7)
    with pytest.raises(ValueError, match="different phantom sets"):
        science_targets.load(tmp_path)
