"""`make science`'s table: one variant (``--only clip``, or a score-only rerun) or several, each with
its paired delta against CLIP-only (a one-variant run used to end in an IndexError after training);
the variants (``--variants``) and the segmentation scores (``--segmentation``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.labels import FINDINGS
from experiments import science


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
    monkeypatch.setattr(science, "prepare_data", lambda root, n, seed, gen="synth": tmp_path / "shards")
    monkeypatch.setattr(science, "TEXT_CORPUS", tmp_path / "corpus.csv")
    (tmp_path / "corpus.csv").write_text("report_text\nNo effusion.\n")
    monkeypatch.setattr(science, "train", lambda v, shards, out, seed, o, stem="phantom": trained.append((v, o))
                        or tmp_path / v)
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


def test_generator_command_and_a_missing_generator(tmp_path, monkeypatch):
    """``--generator`` / ``--external`` name the module ``data_service.<generator>``, one CLI for all."""
    calls = []
    monkeypatch.setattr(science, "sh", calls.append)
    science.prepare_data(tmp_path / "ext", 12, 4, "synth_ext")
    gen, ingest = calls
    assert gen[1:3] == ["-m", "data_service.synth_ext"] and gen[gen.index("--seed") + 1] == "4"
    assert {"--out", "--n", "--seed", "--valid-fraction", "--workers"} <= set(gen)
    assert ingest[2] == "data_service.ingest" and ingest[ingest.index("--input") + 1] == str(tmp_path / "ext" / "raw")
    with pytest.raises(SystemExit, match="data_service.no_such_generator not found"):
        science.check_generator("no_such_generator")


@pytest.mark.parametrize("gen, ext, ext_seed, sets, report", [
    ("synth", "synth", None, [("synth", 0), ("synth", 1)], "science-s0.json"),          # synth both sides
    ("synth_ext", "synth", None, [("synth_ext", 0), ("synth", 0)], "science-synth_ext-s0.json"),   # the other way
    ("synth", "synth", 7, [("synth", 0), ("synth", 7)], "science-s0.json"),
])
def test_train_on_one_generator_score_on_both(tmp_path, monkeypatch, capsys, gen, ext, ext_seed, sets, report):
    rng = np.random.default_rng(0)
    y = (rng.random((60, 18)) < 0.4).astype(float)
    prepared, scored, trained = [], [], []
    monkeypatch.setattr(science, "check_generator", lambda g: None)     # synth_ext: another engineer's module
    monkeypatch.setattr(science, "prepare_data",
                        lambda root, n, seed, g="synth": prepared.append((g, seed, root.name)) or root / "shards")
    monkeypatch.setattr(science, "train", lambda v, shards, out, seed, o, stem="phantom":
                        trained.append((v, shards, stem)) or out / f"{stem}-{v}" / f"s{seed}")
    monkeypatch.setattr(science, "last_export", lambda d: d / "step_0000010")

    def fake_score(ck, shards, **kw):
        scored.append((ck.parent.parent.name, shards.parent.name))
        signal = 1.0 if shards == prepared[0][2] or shards.parent.name == prepared[0][2] else 0.3
        return {**_fake(rng, y, signal), "checkpoint": str(ck), "metrics_ensemble": {}}

    monkeypatch.setattr(science, "score", fake_score)
    extra = ["--external-data-seed", str(ext_seed)] if ext_seed is not None else []
    assert science.main(["--out", str(tmp_path / "runs"), "--text-mlm-steps", "0", "--bootstrap", "10",
                         "--generator", gen, "--external", ext, *extra]) == 0
    assert [(g, s) for g, s, _ in prepared] == sets
    stem = "phantom" if gen == "synth" else gen
    assert [t[0] for t in trained] == ["clip", "tma"] and {t[2] for t in trained} == {stem}
    assert {t[1].parent.name for t in trained} == {prepared[0][2]}          # trained on the first set only
    assert sorted(scored) == sorted((f"{stem}-{v}", d[2]) for v in ("clip", "tma") for d in prepared)
    r = json.loads((tmp_path / "runs" / report).read_text())
    assert r["generator"] == gen and r["external"]["generator"] == ext and r["external"]["data_seed"] == sets[1][1]
    assert set(r["external"]["metrics"]) == {"clip", "tma"} and "per_label" in r["external"]["summary"]["single"]
    both = r["external"]["side_by_side"]["zero-shot mean AUC, 8 planted (single)"]["tma"]
    assert both["internal"] > 0.9 > both["external"]                   # in-distribution beside external
    assert both["internal"] == r["summary"]["single"]["mean"]["tma"]
    out = capsys.readouterr().out
    assert f"zero-shot AUC on external {ext} phantoms (seed {sets[1][1]})" in out
    assert f"in-distribution ({gen}) and external ({ext})" in out and "CLIP+TMA external" in out


def test_no_external_set_keeps_the_report(tmp_path, monkeypatch):
    """Without ``--external`` nothing more is made or scored, and the report's keys stay as they were."""
    prepared = []
    monkeypatch.setattr(science, "prepare_data", lambda root, n, seed, g="synth": prepared.append(root.name) or root)
    monkeypatch.setattr(science, "train", lambda v, shards, out, seed, o, stem="phantom": out / f"{stem}-{v}")
    monkeypatch.setattr(science, "last_export", lambda d: d)
    y = (np.random.default_rng(1).random((40, 18)) < 0.4).astype(float)
    monkeypatch.setattr(science, "score", lambda ck, shards, **kw: {**_fake(np.random.default_rng(2), y, 1.0),
                                                              "checkpoint": str(ck), "metrics_ensemble": {}})
    assert science.main(["--out", str(tmp_path / "runs"), "--text-mlm-steps", "0", "--bootstrap", "10"]) == 0
    assert prepared == ["phantom-d0-n1200"]
    r = json.loads((tmp_path / "runs" / "science-s0.json").read_text())
    assert r["external"] is None and r["generator"] == "synth" and set(r["summary"]) == {"single", "ensemble"}
    with pytest.raises(SystemExit, match="the external set is the training set"):
        science.main(["--out", str(tmp_path / "runs"), "--external", "synth", "--external-data-seed", "0"])


def test_table_compares_every_variant_against_clip():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 18)) < 0.4).astype(float)
    res = {v: _fake(rng, y, s) for v, s in (("tma_restore", 0.8), ("clip", 0.0), ("clip_restore", 0.5), ("tma", 0.2))}
    text, summary = science.table(res, n_boot=20, seed=0)
    per = summary["single"]["per_label"]["Lung nodule"]
    assert set(per) == {"clip", "tma", "clip_restore", "tma_restore", "delta", "delta_clip_restore",
                        "delta_tma_restore"}                               # "delta" stays TMA - CLIP
    assert per["delta_tma_restore"][0] > per["delta_clip_restore"][0] > per["delta"][0] > 0
    for v in ("tma", "clip_restore", "tma_restore"):
        d, lo, hi = per[science.delta_key(v)]
        assert lo <= d <= hi and abs(d - (per[v][0] - per["clip"][0])) < 1e-9
    assert list(summary["single"]["mean"]) == list(science.VARIANTS)      # the variants' order, not res'
    assert "CLIP+TMA+restore" in text and "delta tma_restore = TMA+restore - CLIP" in text
    assert "delta = TMA - CLIP" in text
    # without CLIP-only nothing is compared
    text, summary = science.table({"tma_restore": res["tma_restore"]}, n_boot=20, seed=0)
    assert "delta" not in text and set(summary["single"]["per_label"]["Lung nodule"]) == {"tma_restore"}


def test_variant_overrides_are_valid_at_the_preset():
    from common.config import load_config

    for v, sets in science.VARIANTS.items():
        cfg = load_config(science.CONFIG, list(sets))
        assert cfg.tma.enabled == ("tma" in v) and cfg.restore.enabled == v.endswith("_restore")
        if cfg.restore.enabled:                      # 16 mm blocks on the 4 x 4 x 8 mm grid, weight 1
            assert [b * s for b, s in zip(cfg.restore.block_size, cfg.data.spacing)] == [16.0, 16.0, 16.0]
            assert cfg.restore.width == 32 and cfg.restore.weight == 1.0
    assert science.parse_variants("tma_restore, clip") == ["clip", "tma_restore"]
    with pytest.raises(SystemExit, match="unknown variant"):
        science.parse_variants("clip,restore")


def test_train_puts_the_variant_before_the_users_overrides(tmp_path, monkeypatch):
    calls = []

    def fake_sh(cmd):
        calls.append(cmd)
        (tmp_path / "runs" / "phantom-clip_restore" / "s3").mkdir(parents=True)

    monkeypatch.setattr(science, "sh", fake_sh)
    run = science.train("clip_restore", tmp_path / "shards", tmp_path / "runs", 3, ["restore.width=64"])
    assert run == tmp_path / "runs" / "phantom-clip_restore" / "s3" and (run / "science_train_seconds").is_file()
    sets = [calls[0][i + 1] for i, x in enumerate(calls[0]) if x == "--set"]
    assert f"train.output_dir={tmp_path / 'runs' / 'phantom-clip_restore'}" in sets
    tail = sets[-6:]
    assert tail == ["tma.enabled=false", *science.RESTORE, "restore.width=64"]      # --set wins


def test_variants_are_trained_scored_and_reported(tmp_path, monkeypatch, capsys):
    """``--variants`` trains each into its own folder; the default report's name and keys stay;
    ``--segmentation`` adds the segmentation task to every variant's scoring and its Dice to the report."""
    rng = np.random.default_rng(0)
    y = (rng.random((60, 18)) < 0.4).astype(float)
    trained, scored = [], []
    monkeypatch.setattr(science, "prepare_data", lambda root, n, seed, g="synth": root / "shards")
    monkeypatch.setattr(science, "train", lambda v, shards, out, seed, o, stem="phantom":
                        trained.append(v) or out / f"{stem}-{v}" / f"s{seed}")
    monkeypatch.setattr(science, "last_export", lambda d: d / "step_0000010")

    def fake_score(ck, shards, segmentation=False):
        v = ck.parent.parent.name.removeprefix("phantom-")
        scored.append((v, segmentation))
        r = {**_fake(rng, y, 1.0 if "restore" in v else 0.0), "checkpoint": str(ck), "metrics_ensemble": {}}
        if segmentation:
            r["metrics"].update({"segmentation/mean_dice": 0.4, "segmentation/random_init/mean_dice": 0.3,
                                 "segmentation/gain_vs_random": 0.1})
            r["segmentation_seconds"] = 1.0
        return r

    monkeypatch.setattr(science, "score", fake_score)
    runs = tmp_path / "runs"
    assert science.main(["--out", str(runs), "--text-mlm-steps", "0", "--bootstrap", "10",
                         "--variants", "clip,tma,clip_restore,tma_restore", "--segmentation"]) == 0
    assert trained == ["clip", "tma", "clip_restore", "tma_restore"]
    assert scored == [(v, True) for v in trained]
    r = json.loads((runs / "science-s0.json").read_text())                 # the default name
    per = r["summary"]["single"]["per_label"]["Arterial wall calcification"]
    assert {"clip", "tma", "delta", "delta_clip_restore", "delta_tma_restore"} <= set(per)
    assert per["delta_tma_restore"][0] > 0.2
    assert list(r["variants"]) == trained and "restore.enabled=true" in r["variants"]["tma_restore"]
    assert r["segmentation"]["tma_restore"] == {"pretrained": 0.4, "random_init": 0.3, "gain_vs_random": 0.1,
                                                "seconds": 1.0}
    out = capsys.readouterr().out
    assert "segmentation/random_init/mean_dice" in out and "CLIP+TMA+restore" in out
    # the default: two variants, no segmentation
    trained.clear(), scored.clear()
    assert science.main(["--out", str(runs), "--text-mlm-steps", "0", "--bootstrap", "10"]) == 0
    assert trained == ["clip", "tma"] and scored == [("clip", False), ("tma", False)]
    r = json.loads((runs / "science-s0.json").read_text())
    assert r["segmentation"] is None and "delta_clip_restore" not in r["summary"]["single"]["per_label"]["Lung nodule"]
    assert "segmentation/mean_dice" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--only clip_restore is not among"):
        science.main(["--out", str(runs), "--only", "clip_restore"])
