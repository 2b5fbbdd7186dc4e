"""The data plan (exact position), the views, and the decode actor's handling of corrupt samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_service.stream import DecodeCrop, Plan, build_index
from data_service.views import MultiViewCrop
from trainer.config import ViewsConfig


def test_plan_is_exact_and_resumable():
    keys = [f"k{i:03d}" for i in range(23)]
    plan = Plan(keys, world=2, batch=3, seed=7)
    assert plan.steps_per_epoch == 3 and plan.unused_per_epoch == 5
    full = {r: plan.rank_keys(r, 0, 9) for r in range(2)}
    for m in range(9):                                       # 3 epochs
        step_keys = [k for r in range(2) for mm, k in full[r] if mm == m]
        assert len(step_keys) == len(set(step_keys)) == 6
    for epoch in range(3):
        used = [k for r in range(2) for mm, k in full[r] if mm // 3 == epoch]
        assert len(used) == len(set(used)) == 18             # no repeats within an epoch
    assert [k for _, k in full[0][:9]] != [k for _, k in full[0][9:18]]   # reshuffled per epoch
    # resuming at micro-step 4 gives exactly the tail of the uninterrupted plan
    assert plan.rank_keys(1, 4, 5) == full[1][4 * 3:]
    assert Plan(keys, 2, 3, 7).rank_keys(0, 0, 9) == full[0]            # deterministic
    with pytest.raises(ValueError, match="one global batch"):
        _ = Plan(keys[:5], 2, 3, 0).steps_per_epoch


def test_views_deterministic_per_seed():
    cfg = ViewsConfig(n=3, size=[16, 16, 8], scale=[0.4, 0.6])
    t = MultiViewCrop(cfg)
    vol = torch.rand(1, 40, 40, 20)
    a, b, c = t(vol, 1), t(vol, 1), t(vol, 2)
    assert a.shape == (3, 1, 16, 16, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="volume must be"):
        t(torch.rand(40, 40, 20), 0)


def test_decode_actor_flags_corrupt_sample(phantom, debug_cfg, tmp_path):
    import dataclasses

    from trainer.model.text import build_tokenizer

    index = build_index(phantom / "shards", "train")
    keys = sorted(index)[:3]
    tok_dir = tmp_path / "tok"
    build_tokenizer(["no pleural effusion", "cardiomegaly is present"], 200, tok_dir)
    actor = DecodeCrop(dataclasses.asdict(debug_cfg.data), str(tok_dir), seed=0)
    members = [dict(index[k]["members"]) for k in keys]
    off, size = members[1]["ct.npz"]
    members[1]["ct.npz"] = [off, size // 2]                   # a truncated member inside the shard
    batch = {"key": np.array(keys), "micro": np.array([0, 0, 0]),
             "shard": np.array([index[k]["shard"] for k in keys]),
             "members": np.array([json.dumps(m) for m in members])}
    out = actor(batch)
    assert out["ok"].tolist() == [1, 0, 1]
    assert keys[1] in out["error"][1] and "ct.npz" in out["error"][1]
    assert out["views"].shape == (3, debug_cfg.data.views.n, 1, *debug_cfg.data.views.size)
    assert np.isfinite(out["image"]).all() and out["image"][0].max() <= 1.0
