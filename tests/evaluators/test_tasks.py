"""Each metric against a hand-computed case; the single-volume CLI on real CT."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.labels import FINDINGS
from evaluators.tasks.probe import linear_probe_auc
from evaluators.tasks.retrieval import recall_at_k
from evaluators.tasks.zeroshot import (
    auc_rows,
    auc_with_ci,
    bootstrap_indices,
    max_f1_threshold,
    score_zeroshot,
    zeroshot_probs,
)
from tests.conftest import REPO


def test_auc_threshold_and_protocol_hand_case():
    # positives at 0.35, 0.8; negatives 0.1, 0.4: pairs (pos>neg): (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3/4
    p = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    auc, lo, hi, n = auc_with_ci(y, p, 200)
    assert auc == 0.75 and n == 200 and 0.0 <= lo <= 0.75 <= hi <= 1.0 and hi - lo > 0.1
    # thresholds: >=0.35 -> P 2/3 R 1 F1 0.8; >=0.8 -> P 1 R 1/2 F1 2/3; >=0.1 -> F1 2/3: max at 0.35
    assert max_f1_threshold(y, p) == 0.35
    # the protocol: threshold from the first split, applied to the second; a one-class label is not scored
    p2 = np.stack([p, p], 1)
    y_test = np.array([[0, 0], [1, 0], [0, 0], [1, 0]])          # label 1 has no positive in test
    out, table, rocs = score_zeroshot(p2, np.stack([y, y], 1), p2, y_test, 50, findings=["a", "b"])
    assert out["zeroshot/auc/a"] == 1.0 and out["zeroshot/n_labels"] == 1.0 and "zeroshot/auc/b" not in out
    # at 0.35: predictions 0,1,1,1 vs truth 0,1,0,1 -> acc 3/4, precision 2/3, F1 0.8
    assert table[0]["threshold"] == 0.35 and table[0]["acc"] == 0.75
    assert out["zeroshot/mean_precision"] == pytest.approx(2 / 3) and out["zeroshot/mean_f1"] == pytest.approx(0.8)
    assert table[1]["scored"] is False and set(rocs) == {"a"}
    with pytest.raises(ValueError, match="no label has both classes"):
        score_zeroshot(p2, np.stack([y, y], 1), p2, np.zeros((4, 2)), 10, findings=["a", "b"])


def test_bootstrap_aucs_are_scikit_learns():
    """The bootstrap's AUCs, all resamples at once, are roc_auc_score's on each resample (ties too),
    and each resample keeps both classes at their counts."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.3).astype(float)
    p = np.round(rng.random(60), 1)                           # many ties
    b = bootstrap_indices(y, 30, seed=4)
    assert b.shape == (30, 60) and (y[b].sum(1) == y.sum()).all()
    want = np.array([roc_auc_score(y[r], p[r]) for r in b])
    assert np.abs(auc_rows(y[b], p[b]) - want).max() < 1e-12
    assert abs(auc_rows(y, p) - roc_auc_score(y, p)) < 1e-12
    with pytest.raises(ValueError, match="only one class"):
        auc_rows(np.zeros(5), p[:5])


def test_zeroshot_softmax_hand_case():
    img = torch.tensor([[1.0, 0.0]])
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])         # present along x, absent along y
    p = zeroshot_probs(img, prompts, logit_scale=2.0)
    assert p.shape == (1, 1) and abs(p[0, 0] - np.exp(2) / (np.exp(2) + 1)) < 1e-6


def test_report_centroid_readout_finds_aligned_labels_only():
    """Label 0 moves both the image and the report along one direction; label 1 only the report,
    label 2 is absent from the threshold split: AUC ~1, ~0.5, skipped."""
    from evaluators.scoring import centroid_readout

    g = torch.Generator().manual_seed(0)

    def split(n):
        y = np.zeros((n, len(FINDINGS)), np.float32)
        y[:, 0] = np.arange(n) % 2
        y[:, 1] = (np.arange(n) // 2) % 2
        d0, d1 = torch.zeros(16), torch.zeros(16)
        d0[0], d1[1] = 3.0, 3.0
        lab = torch.from_numpy(y)
        img = F.normalize(torch.randn(n, 16, generator=g) + lab[:, :1] * d0, dim=-1)
        txt = F.normalize(torch.randn(n, 16, generator=g) + lab[:, :1] * d0 + lab[:, 1:2] * d1, dim=-1)
        return {"img": img, "txt": txt, "labels": y}

    out = centroid_readout(split(80), split(80), 10.0, "train")
    assert out[f"zeroshot/report_centroid/train/auc/{FINDINGS[0]}"] > 0.95
    assert 0.3 < out[f"zeroshot/report_centroid/train/auc/{FINDINGS[1]}"] < 0.7
    assert f"zeroshot/report_centroid/train/auc/{FINDINGS[2]}" not in out and len(out) == 3


def test_recall_hand_case():
    img = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]), dim=-1)   # 2 and 3 swapped
    r = recall_at_k(img, txt, ks=(1, 2, 5))
    assert r["i2t_R@1"] == pytest.approx(1 / 3) and r["t2i_R@1"] == pytest.approx(1 / 3)
    assert r["i2t_R@2"] == 1.0 and "i2t_R@5" not in r          # k > N is not reported


def test_linear_probe_separable_and_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 2))
    x = np.c_[y[:, 0] * 2.0 + rng.normal(0, 0.3, 200), rng.normal(0, 1, (200, 3))]  # label 0 readable, 1 not
    r = linear_probe_auc(x[:100], y[:100], x[100:], y[100:], ["easy", "noise"])
    assert r["easy"] > 0.97 and 0.3 < r["noise"] < 0.7


def _plain_export(tmp_path, step: int = 7, seed: int = 0, info: dict | None = None, texts: list[str] | None = None,
                  overrides: list[str] | None = None):
    """A checkpoint export written the way trainer.engine.export writes one (random weights);
    ``overrides`` change configs/debug.yaml (e.g. ``restore.enabled=true``)."""
    from safetensors.torch import save_file

    from common.config import load_config, save_config
    from common.text import build_tokenizer
    from trainer.model import build_model

    cfg = load_config(REPO / "configs/debug.yaml", overrides)
    out = tmp_path / f"step_{step:07d}" / "export"
    tok = build_tokenizer(texts or ["Cardiomegaly is present.", "No pleural effusion.", "Lung nodule is not present."],
                          2000 if texts else 200, out / "tokenizer")
    torch.manual_seed(seed)
    model = build_model(cfg, len(tok))
    save_file(model.state_dict(), str(out / "model.safetensors"))
    save_config(cfg, out / "config.yaml")
    (out / "export.json").write_text(json.dumps({"step": step, **(info or {})}))
    return out.parent


@pytest.mark.parametrize("volume", ["totalseg/pulmonary_report_ct_cropped.nii.gz", "totalseg/example_ct_dicom"])
def test_embed_cli_on_real_volume(realdata, tmp_path, volume, capsys):
    from evaluators import embed

    ck = _plain_export(tmp_path)
    out = tmp_path / "e.npy"
    assert embed.main(["--checkpoint", str(ck), "--volume", str(realdata / volume), "--out", str(out)]) == 0
    e = np.load(out)
    assert e.shape == (64,) and abs(np.linalg.norm(e) - 1) < 1e-4
    probs = json.loads(out.with_suffix(".json").read_text())["probabilities"]
    assert list(probs) == list(FINDINGS)
    assert "Lung nodule" in capsys.readouterr().out
    # one preprocessing path: the same volume ingested (folder importer) and embedded by the
    # evaluators' split reader gives the same embedding as the one-volume CLI
    from data_service import ingest
    from evaluators.tasks.features import embed_split
    from trainer.export import load_export

    model, tok, cfg, _ = load_export(ck)
    root = tmp_path / "folder"
    root.mkdir()
    (root / "reports.csv").write_text(f"id,image,report,split\nv,{realdata / volume},No findings.,test\n")
    ingest.run("folder", str(root), str(tmp_path / "shards"), cfg.data, workers=1, progress=False)
    via_shards = embed_split(model, tok, cfg, str(tmp_path / "shards"), "test")["img"][0].numpy()
    np.testing.assert_allclose(via_shards, e, atol=1e-5)


def test_embed_cli_rejects_bad_volume(realdata, tmp_path):
    from evaluators import embed

    ck = _plain_export(tmp_path)
    with pytest.raises(SystemExit, match="inconsistent_spacing"):
        embed.main(["--checkpoint", str(ck), "--volume", str(realdata / "dcm_qa_ct/In/GE")])
