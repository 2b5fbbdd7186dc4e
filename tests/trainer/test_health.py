"""Representation health: the metrics, and the monitor that names a collapsed tower."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.config import load_config
from tests.conftest import REPO
from trainer.health import CollapseMonitor, effective_rank, health_metrics, mean_pairwise_cosine
from trainer.model import build_model


def test_cosine_and_rank_hand_cases():
    eye = torch.eye(6, 16)
    assert mean_pairwise_cosine(eye) == 0.0
    assert mean_pairwise_cosine(eye[[0] * 5]) == 1.0
    assert abs(effective_rank(eye) - 5.0) < 1e-4      # centred: 6 orthogonal points span 5 dimensions
    line = torch.arange(8.0)[:, None] * torch.ones(1, 16)
    assert abs(effective_rank(line) - 1.0) < 1e-4


def test_health_metrics_catch_a_collapsed_model(capsys):
    cfg = load_config(REPO / "configs/debug.yaml", ["model.image_norm=group", "model.text_pool=mean"])
    torch.manual_seed(0)
    model = build_model(cfg, 300)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(8, 1, *cfg.data.size, generator=g)
    image[:4, :, :40] = 0.0                               # two kinds of volume
    ids = torch.randint(5, 300, (8, 20), generator=g)
    mask = torch.ones_like(ids)
    healthy = health_metrics(model, image, ids, mask)
    assert model.training                                 # the mode is restored
    # deliberately collapse both towers: the projections ignore their input
    with torch.no_grad():
        for head in (model.img_proj, model.txt_proj):
            head.weight.zero_()
            head.bias.copy_(F.normalize(torch.randn(head.bias.shape, generator=g), dim=0))
    collapsed = health_metrics(model, image, ids, mask)
    for t in ("image", "report"):
        assert collapsed[f"health/{t}_cosine"] > 0.9999 and collapsed[f"health/{t}_eff_rank"] < 1.01
        assert healthy[f"health/{t}_cosine"] < 0.99 and healthy[f"health/{t}_eff_rank"] > 1.5
    mon = CollapseMonitor(threshold=0.995, patience=3)     # a random init sits near 0.99: above it, collapsed
    assert mon.update(dict(healthy), 10) == []
    warnings = [mon.update(dict(collapsed), s) for s in (20, 30, 40)]
    assert warnings[0] == warnings[1] == []               # not yet: patience 3
    assert len(warnings[2]) == 2 and "the image tower has collapsed" in warnings[2][0]
    assert "the report tower has collapsed" in warnings[2][1]
    m = dict(healthy)
    assert mon.update(m, 50) == [] and m["health/collapsed_image"] == 0.0     # a healthy log resets it
