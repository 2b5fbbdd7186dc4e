"""Each metric against a hand-computed case; the single-volume CLI on real CT."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluators.tasks.probe import linear_probe_auc
from evaluators.tasks.retrieval import recall_at_k
from evaluators.tasks.zeroshot import per_label_auc, zeroshot_probs
from tests.conftest import REPO


def test_auc_hand_case():
    # positives at 0.35, 0.8; negatives 0.1, 0.4: pairs (pos>neg): (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3/4
    probs = np.array([[0.1], [0.4], [0.35], [0.8]])
    labels = np.array([[0], [0], [1], [1]])
    assert per_label_auc(probs, labels, ["x"]) == {"x": 0.75}
    assert np.isnan(per_label_auc(probs, np.zeros((4, 1)), ["x"])["x"])   # one class: undefined


def test_zeroshot_softmax_hand_case():
    img = torch.tensor([[1.0, 0.0]])
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])         # present along x, absent along y
    p = zeroshot_probs(img, prompts, logit_scale=2.0)
    assert p.shape == (1, 1) and abs(p[0, 0] - np.exp(2) / (np.exp(2) + 1)) < 1e-6


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


def _plain_export(tmp_path, step: int = 7, seed: int = 0, info: dict | None = None, texts: list[str] | None = None):
    """A checkpoint export written the way trainer.engine.export writes one (random weights)."""
    from safetensors.torch import save_file

    from trainer.config import load_config, save_config
    from trainer.model import build_model
    from trainer.model.text import build_tokenizer

    cfg = load_config(REPO / "configs/debug.yaml")
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
    assert len(probs) == 18 and all(0 <= p <= 1 for p in probs.values())
    assert "Lung nodule" in capsys.readouterr().out


def test_embed_cli_rejects_bad_volume(realdata, tmp_path):
    from evaluators import embed

    ck = _plain_export(tmp_path)
    with pytest.raises(SystemExit, match="inconsistent_spacing"):
        embed.main(["--checkpoint", str(ck), "--volume", str(realdata / "dcm_qa_ct/In/GE")])
