"""The data plan (exact position), the views, the decoder's handling of corrupt samples, and the chunked stream."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_service.config import AugmentConfig, ViewsConfig
from data_service.shards import iter_split
from data_service.stream import DecodeCrop, Plan, build_index, loader_batch
from data_service.views import N_PARAMS, MultiViewCrop, augment_report, draw_shift, resize_views, shift_volume


def test_plan_is_exact_and_resumable():
    keys = [f"k{i:03d}" for i in range(23)]
    plan = Plan(keys, batch=3, seed=7)
    assert plan.steps_per_epoch(2) == 3 and plan.unused_per_epoch(2) == 5
    full = {r: plan.rank_keys(r, 2, 0, 0, 9) for r in range(2)}
    for m in range(9):                                       # 3 epochs
        step_keys = [k for r in range(2) for mm, k, _ in full[r] if mm == m]
        assert len(step_keys) == len(set(step_keys)) == 6
    for epoch in range(3):
        used = [k for r in range(2) for mm, k, _ in full[r] if mm // 3 == epoch]
        assert len(used) == len(set(used)) == 18             # no repeats within an epoch
    assert [k for _, k, _ in full[0][:9]] != [k for _, k, _ in full[0][9:18]]   # reshuffled per epoch
    # resuming at micro-step 4 (its saved position) gives exactly the tail of the uninterrupted plan
    pos = full[1][4 * 3 - 1][2]
    assert pos == plan.position_of(4, 2) == 23 + 6             # epoch 1, 6 samples in
    assert plan.rank_keys(1, 2, pos, 4, 5) == full[1][4 * 3:]
    assert Plan(keys, 3, 7).rank_keys(0, 2, 0, 0, 9) == full[0]                  # deterministic
    with pytest.raises(ValueError, match="one global batch"):
        Plan(keys[:5], 3, 0).steps(2, 0, 1)


def test_plan_continues_in_samples_when_the_world_changes():
    """2 ranks for 2 micro-steps, then 1 rank from the saved position: the samples continue where
    they stopped, none twice, none skipped (but the epoch's tail, which is too short for a batch)."""
    keys = [f"k{i:03d}" for i in range(20)]
    plan = Plan(keys, batch=2, seed=1)
    first = plan.steps(2, 0, 2)                                # 8 samples
    then = plan.steps(1, first[-1][0], 6)                     # 12 samples: the rest of epoch 0
    seen = [k for _, ks in first + then for k in ks]
    assert len(seen) == len(set(seen)) == 20 and seen == plan.epoch_order(0)
    assert then[-1][0] == 20 and plan.steps(1, 20, 1)[0][1] == plan.epoch_order(1)[:2]


def test_views_deterministic_per_seed():
    cfg = ViewsConfig(n=3, size=[16, 16, 8], scale=[0.4, 0.6])
    t = MultiViewCrop(cfg)
    vol = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 20)).astype(np.int16)
    (a, pa), (b, pb), (c, _) = (t(vol, np.random.default_rng(s)) for s in (1, 1, 2))
    assert a.shape == (3, 1, 16, 16, 8) and a.dtype == np.int16 and pa.shape == (3, N_PARAMS)
    assert np.array_equal(a, b) and np.array_equal(pa, pb) and not np.array_equal(a, c)
    # a crop of scale s covers s x the edge, resized: a constant volume stays constant
    const, _ = t(np.full((40, 40, 20), 123, np.int16), np.random.default_rng(3))
    assert (const == 123).all()
    with pytest.raises(ValueError, match="volume must be"):
        t(vol[None], np.random.default_rng(0))


def test_view_resize_is_monai_resize():
    """``resize_views`` (the loader's and the device's resize) is what MONAI's ``Resize`` gives,
    rounded: the crop boxes of a real draw, trilinear, ``align_corners=False``."""
    import torch
    from monai.transforms import Resize

    cfg = ViewsConfig(n=4, size=[16, 12, 8], scale=[0.4, 1.0])
    vol = np.random.default_rng(0).integers(-1000, 1000, (40, 36, 20)).astype(np.int16)
    boxes, _ = MultiViewCrop(cfg).draw(vol.shape, np.random.default_rng(5))
    ours = resize_views(torch.from_numpy(vol), boxes, cfg.size).numpy()
    monai = Resize(spatial_size=cfg.size, mode="trilinear", align_corners=False)
    for v, (x, y, z, a, b, c) in enumerate(boxes.tolist()):
        want = np.rint(np.asarray(monai(torch.from_numpy(vol[x:x + a, y:y + b, z:z + c].astype(np.float32))[None])[0]))
        assert np.array_equal(ours[v, 0], want.astype(np.int16)), v
    assert len({tuple(b[3:]) for b in boxes.tolist()}) > 1                 # boxes of several sizes


def test_views_cut_on_the_device_equal_the_loaders(phantom, debug_cfg, tmp_path):
    """``data.views.on_device``: the loader ships the unshifted volume, its shift and the views'
    boxes; ``trainer.step.model_inputs`` cuts them, giving the very model inputs of the loader-cut
    batch (same seed, same sample: exact resume is unchanged), a shift and jitter on."""
    import dataclasses

    import torch

    from common.text import build_tokenizer
    from trainer.step import Batch, model_inputs

    index = build_index(phantom / "shards", "train")
    tok_dir = tmp_path / "tok"
    build_tokenizer(["no pleural effusion", "cardiomegaly is present"], 200, tok_dir)
    d = debug_cfg.data
    d = dataclasses.replace(d, augment=dataclasses.replace(d.augment, shift=0.2, intensity_jitter=0.1, noise_std=0.02),
                            views=dataclasses.replace(d.views, n=3, scale=[0.4, 1.0]))
    on = dataclasses.replace(d, views=dataclasses.replace(d.views, on_device=True))
    batch = loader_batch(index, [(3, k, -1) for k in sorted(index)[:4]])
    loader, device = DecodeCrop(d, str(tok_dir), seed=1)(batch), DecodeCrop(on, str(tok_dir), seed=1)(batch)
    assert "views" not in device and device["boxes"].shape == (4, 3, 6) and device["shift"].shape == (4, 3)
    assert device["shift"].any() and not np.array_equal(device["image"], loader["image"])   # shipped unshifted
    assert np.array_equal(device["params"], loader["params"]) and np.array_equal(device["input_ids"], loader["input_ids"])
    a, b = Batch.from_numpy(loader, "cpu", views=True), Batch.from_numpy(device, "cpu", views=True)
    (ia, va), (ib, vb) = model_inputs(a, d, torch.float32, "torch"), model_inputs(b, on, torch.float32, "torch")
    assert torch.equal(ia, ib) and torch.equal(va, vb) and va.shape == (4, 3, 1, *d.views.size)
    ic, vc = model_inputs(Batch.from_numpy(device, "cpu", views=False), on, torch.float32, "torch")
    assert torch.equal(ic, ia) and vc is None                                  # CLIP only: no views cut


def test_report_sampling_and_shift():
    aug = AugmentConfig(sentence_keep=0.5, sentence_shuffle=True)
    text = "Findings: A b. C d. E f. G h.\nImpression: X; Y."
    outs = {augment_report(text, np.random.default_rng(s), aug) for s in range(30)}
    assert len(outs) > 10
    for o in outs:
        words = set(o.replace("Findings: ", "").replace("Impression: ", "").replace("\n", " ").split())
        assert words and words <= set("A b. C d. E f. G h. X; Y.".split())    # only whole sentences survive
    assert augment_report(text, np.random.default_rng(0), AugmentConfig()) == text     # off: unchanged
    vol = np.arange(10 * 10 * 10, dtype=np.int16).reshape(10, 10, 10)
    moved = shift_volume(vol, draw_shift(vol.shape, np.random.default_rng(4), 0.2))
    assert moved.shape == vol.shape and not np.array_equal(moved, vol)
    assert (moved == -1024).any()                                         # air comes in at the edge
    kept = moved[moved != -1024]
    assert set(kept.tolist()) <= set(vol.ravel().tolist())


def test_decode_actor_flags_corrupt_sample(phantom, debug_cfg, tmp_path):
    from common.text import build_tokenizer

    index = build_index(phantom / "shards", "train")
    keys = sorted(index)[:3]
    tok_dir = tmp_path / "tok"
    build_tokenizer(["no pleural effusion", "cardiomegaly is present"], 200, tok_dir)
    actor = DecodeCrop(debug_cfg.data, str(tok_dir), seed=0)
    members = [dict(index[k]["members"]) for k in keys]
    off, size = members[1]["ct.bin"]
    members[1]["ct.bin"] = [off, size // 2]                   # a truncated member inside the shard
    batch = {"key": np.array(keys), "micro": np.array([0, 0, 0]), "position": np.array([6, 6, 6]),
             "shard": np.array([index[k]["shard"] for k in keys]),
             "members": np.array([json.dumps(m) for m in members])}
    out = actor(batch)
    assert out["ok"].tolist() == [1, 0, 1]
    assert keys[1] in out["error"][1] and "ct.bin" in out["error"][1]
    assert out["views"].shape == (3, debug_cfg.data.views.n, 1, *debug_cfg.data.views.size)
    assert out["image"].dtype == np.int16 and out["params"].shape == (3, 1 + debug_cfg.data.views.n, N_PARAMS)
    good = [s for s in iter_split(phantom / "shards", "train") if s["key"] == keys[0]][0]
    assert np.array_equal(out["image"][0, 0], good["ct"])        # no shift configured: the stored volume
    assert not out["views"][1].any() and out["error"][0] == ""


def test_decode_actor_ships_negated_sentences(phantom, debug_cfg, tmp_path):
    """data.augment.negated_sentences: the loader tokenizes each sentence flipped, in the same
    (B, S, Ls) slots as the sentences, so sentence s's negation sits beside it."""
    import dataclasses

    from common.text import build_tokenizer, negate_sentence, split_sentences

    index = build_index(phantom / "shards", "train")
    keys = sorted(index)[:2]
    report = {s["key"]: s["report"] for s in iter_split(phantom / "shards", "train", decode_ct=False)}
    tok_dir = tmp_path / "tok"
    tok = build_tokenizer(list(report.values()) + ["no not"], 400, tok_dir)
    data = dataclasses.replace(debug_cfg.data, augment=dataclasses.replace(debug_cfg.data.augment, negated_sentences=True))
    actor = DecodeCrop(data, str(tok_dir), seed=0, text_unit="sentence")
    batch = loader_batch(index, [(0, k, 2) for k in keys])
    out = actor(batch)
    assert out["neg_input_ids"].shape == out["input_ids"].shape == (2, data.max_sentences, data.max_sentence_tokens)
    assert np.array_equal(out["neg_attention_mask"][:, :, 0], out["attention_mask"][:, :, 0])
    first = split_sentences(report[keys[0]])[0]                 # debug preset: no sentence dropping
    assert tok.decode(out["input_ids"][0, 0], skip_special_tokens=True) == first.lower()
    assert tok.decode(out["neg_input_ids"][0, 0], skip_special_tokens=True) == negate_sentence(first).lower()
    assert "neg_input_ids" not in DecodeCrop(debug_cfg.data, str(tok_dir), seed=0, text_unit="sentence")(batch)


def test_rank_stream_chunks_keep_the_plan(phantom, debug_cfg, tmp_path, monkeypatch):
    """The stream runs one Ray Data execution per ``data.loader_chunk`` micro-steps (module doc:
    Ray Data's executor spins while backpressured), each started before the previous one ends:
    chunking changes nothing in what a rank gets, batch by batch, from a resumed position,
    including a last chunk shorter than the rest; and each batch is what ``DecodeCrop`` makes of
    its rows, whatever configuration the worker processes decoded before (another seed here)."""
    import dataclasses

    import ray

    from common.text import build_tokenizer
    from data_service import stream

    index = build_index(phantom / "shards", "train")
    tok_dir = tmp_path / "tok"
    build_tokenizer(["no pleural effusion", "cardiomegaly is present"], 200, tok_dir)
    executions = []
    from_items = ray.data.from_items
    monkeypatch.setattr(ray.data, "from_items", lambda rows, **kw: executions.append(len(rows)) or from_items(rows, **kw))
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        runs = {}
        for chunk, seed in ((2, 3), (100, 3), (2, 4)):
            data = dataclasses.replace(debug_cfg.data, loader_chunk=chunk)
            runs[chunk, seed] = list(stream.rank_stream(index, Plan(sorted(index), 2, seed), 1, 2, 4, 1, 5, data,
                                                        str(tok_dir)))
    finally:
        ray.shutdown()
    assert executions == [4, 4, 2, 10, 4, 4, 2]                 # rows per execution: 2 + 2 + 1 micro-steps, then 5
    for (chunk, seed), got in runs.items():
        want = Plan(sorted(index), 2, seed).rank_keys(1, 2, 4, 1, 5)
        assert [int(b["micro"][0]) for b in got] == [1, 2, 3, 4, 5]
        assert [k for b in got for k in b["key"]] == [k for _, k, _ in want]
        assert [int(p) for b in got for p in b["position"]] == [p for _, _, p in want]
        assert all(b["ok"].all() for b in got)
    for a, b in zip(runs[2, 3], runs[100, 3]):
        for name in ("image", "views", "params", "input_ids"):
            assert np.array_equal(a[name], b[name]), name
    direct = DecodeCrop(debug_cfg.data, str(tok_dir), seed=4)
    last = runs[2, 4][-1]
    want = Plan(sorted(index), 2, 4).rank_keys(1, 2, 4, 1, 5)[-2:]
    ref = direct(loader_batch(index, want))
    assert np.array_equal(ref["image"], last["image"]) and np.array_equal(ref["views"], last["views"])
    assert not np.array_equal(runs[2, 3][-1]["views"], last["views"])          # the seed reached the decoder
