"""The one training step outside Ray (a one-process DeepSpeed engine), and the device-side
augmentation it starts with."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import load_config
from data_service.views import AugmentParams
from tests.conftest import REPO
from trainer.augment import augment_reference, hash_normal


def test_augment_reference_hand_case():
    x = torch.tensor([[-1000, 0], [1000, 2000]], dtype=torch.int16).view(1, 1, 2, 2, 1).repeat(2, 1, 1, 1, 1)
    p = AugmentParams.identity(2)
    p.flips[1] = [True, False, False]                     # volume 1: flipped along x
    p.scale[1], p.shift[1] = 2.0, -0.5                    # ... and scaled / shifted
    y = augment_reference(x, p, (-1000.0, 1000.0))
    assert y[0, 0, :, :, 0].tolist() == [[0.0, 0.5], [1.0, 1.0]]            # window, clipped at 1
    assert y[1, 0, :, :, 0].tolist() == [[1.5, 1.5], [-0.5, 0.5]]           # flip x, then 2 v - 0.5
    p.noise_std[:], p.seed[:] = 0.1, 42                   # noise: std 0.1, seed 42
    n = augment_reference(x, p, (-1000.0, 1000.0))
    torch.testing.assert_close(n[0] - y[0], 0.1 * hash_normal(42, 4).view(1, 2, 2, 1))
    assert torch.equal(n, augment_reference(x, p, (-1000.0, 1000.0)))       # same seed, same noise
    assert torch.equal(n, augment_reference(x, torch.from_numpy(p.to_array()), (-1000.0, 1000.0)))  # the packed form
    z = hash_normal(3, 100_000)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02 and not torch.equal(z, hash_normal(4, 100_000))


def phantom_batch(cfg, phantom, n=4):
    """The first ``n`` train phantoms as the loader ships them (views, parameters), on the CPU, and a
    tokenizer built from their reports."""
    from common.text import build_tokenizer
    from data_service.shards import iter_split
    from data_service.views import prepare_sample
    from trainer.step import Batch

    samples = list(iter_split(phantom / "shards", "train"))[:n]
    tok = build_tokenizer([s["report"] for s in samples], 300)
    items = [prepare_sample(s, cfg.data, seed=i) for i, s in enumerate(samples)]
    enc = tok([it["report"] for it in items], padding="longest", truncation=True, max_length=96, return_tensors="np")
    batch = Batch.from_numpy({"image": np.stack([it["image"] for it in items]),
                              "views": np.stack([it["views"] for it in items]),
                              "params": np.stack([it["params"] for it in items]),
                              "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, "cpu", True)
    return batch, tok


@pytest.mark.timeout(300)
def test_train_step_outside_ray_learns(phantom):
    """The step the Ray Train loop runs, on a one-process engine: the loss falls on a fixed batch."""
    from trainer.engine import init_engine
    from trainer.losses import T3DLoss
    from trainer.model import build_model
    from trainer.step import train_step

    cfg = load_config(REPO / "configs/debug.yaml", ["train.lr=0.001", "train.warmup_steps=0", "train.steps=30",
                                                    "train.batch_size=4", "tma.prototypes=2"])
    batch, tok = phantom_batch(cfg, phantom)
    torch.manual_seed(0)
    engine = init_engine(build_model(cfg, len(tok)), cfg)
    loss_fn = T3DLoss(cfg.tma)
    logs = [train_step(engine, loss_fn, batch, cfg.data) for _ in range(25)]
    assert {"clip", "local", "consistency", "loss"} <= set(logs[0])
    assert logs[-1]["clip"] < 0.5 * logs[0]["clip"], [round(x["clip"], 3) for x in logs]
    assert engine.global_steps == 25


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedule_warmup_then_cosine_or_stable_decay(schedule):
    """The engine's lr per step: linear warmup to train.lr, then a cosine to min_lr_ratio over the
    rest (cosine) or held at train.lr until the last decay_fraction of the steps (wsd). A resumed
    scheduler continues from the saved step."""
    import math

    from trainer.engine import init_engine

    cfg = load_config(REPO / "configs/debug.yaml", ["train.lr=0.001", "train.warmup_steps=10", "train.steps=100",
                                                    "train.min_lr_ratio=0.1", f"train.schedule={schedule}",
                                                    "train.decay_fraction=0.25"])
    engine = init_engine(torch.nn.Linear(4, 4), cfg)
    lrs = []
    for _ in range(100):                                                     # lrs[i]: the lr of step i
        engine.lr_scheduler.step()
        lrs.append(engine.get_lr()[0])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.0005) and lrs[10] == pytest.approx(0.001, rel=1e-3)
    assert lrs[99] == pytest.approx(0.0001, rel=0.05) and min(lrs[10:]) >= 0.0001 - 1e-12
    if schedule == "wsd":
        assert all(lr == pytest.approx(0.001) for lr in lrs[10:75])          # stable until step 75
        frac = (1 + math.cos(math.pi * (88 - 75 + 1) / 25)) / 2
        assert lrs[88] == pytest.approx(0.0001 + 0.0009 * frac)
    else:
        assert lrs[55] < 0.001 * 0.6 and lrs[30] < 0.001                     # halfway down the cosine
    saved = engine.lr_scheduler.state_dict()
    fresh = init_engine(torch.nn.Linear(4, 4), cfg)
    fresh.lr_scheduler.load_state_dict(saved)
    fresh.lr_scheduler.step()
    engine.lr_scheduler.step()
    assert fresh.get_lr()[0] == pytest.approx(engine.get_lr()[0])


SYNC_READS = ("item", "__float__", "__int__", "__bool__", "tolist")   # a tensor's value read on the host


def _count_reads(monkeypatch, fn) -> list[tuple[str, str, int]]:
    """Run ``fn`` with every host read of a tensor's value recorded as (method, file, line) of its caller."""
    import traceback

    seen: list[tuple[str, str, int]] = []
    for name in SYNC_READS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            caller = traceback.extract_stack(limit=3)[-2]
            seen.append((_name, caller.filename, caller.lineno))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return seen


@pytest.mark.timeout(300)
@pytest.mark.parametrize("preset", ["debug", "sentence"])
def test_no_host_sync_on_an_ordinary_micro_step(monkeypatch, preset):
    """Loss terms, temperature and the augmentation parameters never leave the device (or are host
    data to begin with) on a micro-step: its only value reads are the optimizer's at an accumulation
    boundary (DeepSpeed's check that skips a step on a non-finite gradient norm; torch's AdamW step
    count, a host tensor). Logging reads the terms once, stacked (``scalars``). The sentence unit
    keeps one data-dependent shape: the packing of its tokens."""
    from benchmarks.train_step import synthetic_batch
    from trainer.engine import init_engine
    from trainer.losses import T3DLoss
    from trainer.model import build_model
    from trainer.step import scalars, train_step

    extra = ["model.text_unit=sentence", "tma.w_sentence=1.0"] if preset == "sentence" else []
    cfg = load_config(REPO / "configs/debug.yaml", ["train.batch_size=2", "train.grad_accum=2", "tma.prototypes=4",
                                                    *extra])
    torch.manual_seed(0)
    engine = init_engine(build_model(cfg, 200), cfg)
    loss_fn, batch = T3DLoss(cfg.tma), synthetic_batch(cfg, 2, 200, "cpu")
    train_step(engine, loss_fn, batch, cfg.data)                                    # warm: lazy inits read values
    train_step(engine, loss_fn, batch, cfg.data)
    logs = {}
    inside = _count_reads(monkeypatch, lambda: logs.update(train_step(engine, loss_fn, batch, cfg.data)))
    assert engine.global_steps == 1                                                 # no optimizer step in there
    boundary = _count_reads(monkeypatch, lambda: logs.update(train_step(engine, loss_fn, batch, cfg.data)))
    ours = [r for r in inside + boundary if "site-packages" not in r[1]]
    optim = {r for r in boundary if "/deepspeed/" in r[1] or "/torch/optim/" in r[1]}
    if preset == "sentence":
        assert {f.rsplit("/", 1)[-1] for _, f, _ in ours} <= {"t3d.py", "sentence.py"}, ours
    else:
        assert not inside and not ours and optim and set(boundary) == optim, (inside, boundary)
    assert engine.global_steps == 2
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values()), logs
    reads = _count_reads(monkeypatch, lambda: logs.update(scalars(logs)))
    assert [r[0] for r in reads] == ["tolist"] and isinstance(logs["loss"], float)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: torch.cuda.set_sync_debug_mode needs a GPU")
def test_no_cuda_sync_between_optimizer_steps():
    """On a GPU: a micro-step inside an accumulation window runs with sync debugging set to error."""
    from benchmarks.train_step import synthetic_batch
    from trainer.engine import init_engine
    from trainer.losses import T3DLoss
    from trainer.model import build_model
    from trainer.step import train_step

    cfg = load_config(REPO / "configs/debug.yaml", ["train.batch_size=2", "train.grad_accum=2", "tma.prototypes=4",
                                                    "ray.use_gpu=true", "train.augment_kernel=torch"])
    torch.manual_seed(0)
    engine = init_engine(build_model(cfg, 200).cuda(), cfg)
    loss_fn, batch = T3DLoss(cfg.tma), synthetic_batch(cfg, 2, 200, "cuda")
    for _ in range(2):
        train_step(engine, loss_fn, batch, cfg.data)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(engine, loss_fn, batch, cfg.data)          # the first micro-step of a window: no optimizer step
    finally:
        torch.cuda.set_sync_debug_mode("default")
