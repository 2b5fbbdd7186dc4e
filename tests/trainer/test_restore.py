"""Text-informed restoration (``restore``): corruption, decoder, loss, config, and the model with it."""
from __future__ import annotations

import hashlib

import pytest
import torch

from common.config import ConfigError, load_config
from tests.conftest import REPO
from tests.trainer.test_model_losses import _batch
from tests.trainer.test_step import phantom_batch
from trainer.config import RestoreConfig
from trainer.losses.restore import masked_error
from trainer.model.corrupt import block_mask, corrupt
from trainer.model.image import ImageEncoder
from trainer.model.restore import (
    RestoreDecoder,
    TokenCrossAttention,
    depth_to_space,
    restoration_figure,
    restore_through,
    space_to_depth,
)

ON = ["restore.enabled=true", "restore.block_size=[8,8,4]", "restore.width=32"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs/debug.yaml", ON)


def _parts(cfg, seed=0):
    torch.manual_seed(seed)
    enc = ImageEncoder(cfg.model)
    return enc, RestoreDecoder(enc.stage_dims, cfg.model.local_dim, cfg.restore, cfg.model.conv1_stride)


def _tokens(b=2, n=7, d=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    m = torch.ones(b, n)
    m[0, 4:] = 0
    return t, m


# ------------------------------------------------------------------------------------ corruption
def test_corruption_is_deterministic_and_masks_the_stated_fraction(cfg):
    x = torch.rand(3, 1, *cfg.data.size)
    seeds = torch.tensor([11.0, 12.0, 11.0], dtype=torch.float64)          # the loader's float64 seeds
    xc, m = corrupt(x, seeds, cfg.restore)
    xc2, m2 = corrupt(x, seeds, cfg.restore)
    assert torch.equal(xc, xc2) and torch.equal(m, m2)                      # same seed, same corruption
    assert torch.equal(m[0], m[2]) and not torch.equal(m[0], m[1])
    blocks = (80 // 8) * (80 // 8) * (40 // 4)
    assert int(m[0].sum()) == round(0.6 * blocks) * 8 * 8 * 4               # exactly round(ratio x blocks) blocks
    assert torch.equal(xc[m], torch.zeros(int(m.sum()))) and torch.equal(xc[~m], x[~m])
    odd = block_mask(seeds[:1], (10, 9, 7), [4, 4, 4], 0.5)                  # partial edge blocks
    assert odd.shape == (1, 1, 10, 9, 7) and 0 < odd.float().mean() < 1


def test_noise_and_downsample_corrupt_every_voxel(cfg):
    x = torch.rand(2, 1, 16, 16, 8)
    seeds = torch.tensor([1, 2])
    for over in ({"noise_std": 0.1}, {"downsample": 2}, {"noise_std": 0.1, "downsample": 2, "mask_ratio": 0.5}):
        c = RestoreConfig(**{**RestoreConfig().__dict__, "mask_ratio": 0.0, "block_size": [4, 4, 4], **over}).validate()
        xc, m = corrupt(x, seeds, c)
        assert bool(m.all()) and not torch.equal(xc, x) and xc.shape == x.shape
        assert torch.equal(xc, corrupt(x, seeds, c)[0])
    c = RestoreConfig(mask_ratio=0.0, noise_std=0.1).validate()
    a, _ = corrupt(x, seeds, c)
    assert abs(float((a - x).std()) - 0.1) < 0.01 and not torch.equal(a[0] - x[0], a[1] - x[1])


# --------------------------------------------------------------------------------------- decoder
def test_decoder_restores_on_the_input_grid_of_the_debug_flavour(cfg):
    enc, dec = _parts(cfg)
    t, m = _tokens()
    for size in (cfg.data.size, cfg.data.views.size):                     # 80x80x40 volume, 40x40x20 view
        x = torch.rand(2, 1, *size)
        xc, mask, pred = restore_through(enc, dec, x, torch.tensor([3, 4]), cfg.restore, t, m)
        assert pred.shape == x.shape == xc.shape == mask.shape and torch.isfinite(pred).all()
    x = torch.rand(1, 1, 21, 19, 9)                                         # odd grids: crop, never pad a rule
    assert restore_through(enc, dec, x, torch.tensor([1]), cfg.restore, t[:1], m[:1])[2].shape == x.shape
    folded = space_to_depth(x, (11, 10, 5), 2)
    assert folded.shape == (1, 8, 11, 10, 5) and torch.equal(depth_to_space(folded, (21, 19, 9), 2), x)


def test_cross_attention_uses_the_text_and_ignores_padding(cfg):
    enc, dec = _parts(cfg)
    dec.eval()
    x = torch.rand(2, 1, *cfg.data.views.size)
    seeds = torch.tensor([5, 6])
    t, m = _tokens()
    with torch.no_grad():
        base = restore_through(enc, dec, x, seeds, cfg.restore, t, m)[2]
        other = restore_through(enc, dec, x, seeds, cfg.restore, _tokens(seed=9)[0], m)[2]
        padded = t.clone()
        padded[0, 4:] = torch.randn(3, t.shape[-1]) * 100                  # padding positions of report 0
        same = restore_through(enc, dec, x, seeds, cfg.restore, padded, m)[2]
        empty = restore_through(enc, dec, x, seeds, cfg.restore, t, torch.zeros_like(m))[2]
    assert (other - base).abs().amax() > 1e-4                               # another report, another restoration
    torch.testing.assert_close(same, base, rtol=0, atol=0)                  # masked tokens: exactly no effect
    assert torch.isfinite(empty).all()                                      # a report without tokens: no NaN
    att = TokenCrossAttention(16, 8, 4)
    y = att(torch.rand(1, 16, 2, 2, 2), torch.rand(1, 3, 8), torch.zeros(1, 3))
    assert torch.isfinite(y).all()


def test_without_text_the_decoder_has_no_attention(cfg):
    c = load_config(REPO / "configs/debug.yaml", ON + ["restore.text_informed=false"])
    enc, dec = _parts(c)
    assert len(dec.attn) == 0
    x = torch.rand(1, 1, *c.data.views.size)
    assert restore_through(enc, dec, x, torch.tensor([1]), c.restore)[2].shape == x.shape


def test_gradients_reach_the_encoder_and_every_decoder_parameter(cfg):
    enc, dec = _parts(cfg)
    x = torch.rand(2, 1, *cfg.data.views.size)
    t, m = _tokens()
    t.requires_grad_(True)
    _, mask, pred = restore_through(enc, dec, x, torch.tensor([1, 2]), cfg.restore, t, m)
    masked_error(pred, x, mask).backward()
    assert enc.net.conv1.weight.grad is not None and enc.net.conv1.weight.grad.abs().sum() > 0
    dead = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert t.grad is not None and t.grad[0, :4].abs().sum() > 0 and t.grad[0, 4:].abs().sum() == 0


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_loss_counts_only_corrupted_voxels(kind):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 1, 8, 8, 4, generator=g), torch.rand(2, 1, 8, 8, 4, generator=g)
    mask = torch.rand(2, 1, 8, 8, 4, generator=g) < 0.3
    loss = masked_error(pred, target, mask, kind)
    moved = torch.where(mask, pred, pred + 5.0)                             # change only uncorrupted voxels
    assert masked_error(moved, target, mask, kind) == loss
    assert masked_error(torch.where(mask, pred + 1.0, pred), target, mask, kind) != loss
    d = (pred - target)[mask]
    torch.testing.assert_close(loss, d.square().mean() if kind == "mse" else d.abs().mean())


def test_no_corrupted_voxel_gives_zero_not_nan():
    pred = torch.rand(1, 1, 4, 4, 4, requires_grad=True)
    loss = masked_error(pred, torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(pred.grad).all()
    with pytest.raises(ValueError, match="restore.loss"):
        masked_error(pred, pred, pred > 0, "huber")


# ---------------------------------------------------------------------------------------- config
def test_restore_config_is_checked():
    base = REPO / "configs/debug.yaml"
    c = load_config(base)
    assert c.restore.enabled is False and c.restore.text_informed is True
    assert load_config(base, ["restore.block_size=8"]).restore.block_size == [8, 8, 8]
    bad = {"restore.mask_ratio=1.0": "restore.mask_ratio", "restore.loss=huber": "restore.loss",
           "restore.block_size=[8,8]": "restore.block_size", "restore.downsample=0": "restore.downsample",
           "restore.noise_std=-0.1": "restore.noise_std", "restore.heads=3": "restore.heads",
           "restore.weight=-1": "restore.weight", "restore.depth=0": "restore.depth",
           "restore.attn_levels=6": "restore.attn_levels", "restore.width=4": "restore.width",
           "restore.mask_rato=0.5": "restore.mask_ratio",                   # unknown key: names the closest
           "restore.enabled=2": "restore.enabled"}
    for item, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(base, [item])
    with pytest.raises(ConfigError, match="corrupts nothing"):
        load_config(base, ["restore.enabled=true", "restore.mask_ratio=0"])
    load_config(base, ["restore.width=64", "restore.heads=4", "restore.attn_levels=5"])     # widths 64 ... 8: ok
    with pytest.raises(ValueError, match="restore.heads=16"):               # ConfigError is a ValueError
        load_config(base, ["restore.width=64", "restore.heads=16", "restore.attn_levels=4"])   # 8 % 16


def test_every_restore_key_can_be_swept():
    from trainer.sweep import check_space_types

    space = {"restore.weight": {"loguniform": [0.1, 10.0]}, "restore.enabled": {"choice": [False, True]},
             "restore.mask_ratio": {"uniform": [0.3, 0.8]}, "restore.block_size": {"choice": [[8, 8, 4], 16]},
             "restore.noise_std": {"choice": [0.0, 0.05]}, "restore.downsample": {"randint": [1, 3]},
             "restore.depth": {"grid": [1, 2]}, "restore.width": {"choice": [32, 64]},
             "restore.text_informed": {"choice": [True, False]}, "restore.heads": {"choice": [2, 4]},
             "restore.attn_levels": {"choice": [1, 2]}, "restore.loss": {"choice": ["mse", "l1"]}}
    assert set(space) == {f"restore.{k}" for k in RestoreConfig.__dataclass_fields__}
    cfg = load_config(REPO / "configs/debug.yaml", [f"sweep.space={space}".replace("'", '"')])
    check_space_types(cfg)
    with pytest.raises(ConfigError, match=r"sweep.space\['restore.mask_ratio'\]"):
        check_space_types(load_config(REPO / "configs/debug.yaml",
                                      ['sweep.space={"restore.mask_ratio": {"choice": [1.5]}}']))


def test_restore_disabled_keeps_todays_parameters():
    """restore.enabled=false (the default) builds exactly the model of before restoration existed:
    old checkpoints and exports load strictly."""
    from trainer.model import build_model

    m = build_model(load_config(REPO / "configs/debug.yaml"))
    sig = ";".join(f"{n}:{tuple(t.shape)}" for n, t in m.state_dict().items())
    assert sum(p.numel() for p in m.parameters()) == 1094961 and len(m.state_dict()) == 123
    assert hashlib.sha256(sig.encode()).hexdigest()[:16] == "98e9a83e253121a6"


# ------------------------------------------------------------------------------ in the model
def _model_batch(cfg, b=2, v=2, seed=0):
    """test_model_losses' random batch, with the restoration seeds of each volume and view."""
    return {**_batch(cfg, b, v, seed),
            "restore_seeds": torch.arange(b * (1 + v), dtype=torch.float64).view(b, 1 + v) + 100}


def test_model_restores_volume_and_views_and_the_objective_adds_the_term(cfg):
    from trainer.losses import T3DLoss
    from trainer.losses.restore import restore_loss
    from trainer.model import build_model

    torch.manual_seed(0)
    m = build_model(cfg)
    batch = _model_batch(cfg)
    out = m(**batch)
    assert out["restore_image"].shape == batch["image"].shape
    assert out["restore_views"].shape == batch["views"].shape == out["restore_views_mask"].shape
    total, logs = T3DLoss(cfg.tma, cfg.restore)(out)
    assert logs["restore"].ndim == 0 and isinstance(logs["restore"], torch.Tensor)
    without, _ = T3DLoss(cfg.tma)(out)
    torch.testing.assert_close(total, without + cfg.restore.weight * restore_loss(out, cfg.restore.loss))
    total.backward()
    assert m.restorer.head.weight.grad.abs().sum() > 0 and m.image.net.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.restorer.parameters())
    assert "restore_image" not in m(**{k: v for k, v in batch.items() if k != "restore_seeds"})  # no seeds: no term


def test_model_restoration_reads_the_report_but_not_its_padding(cfg):
    from trainer.model import build_model

    torch.manual_seed(0)
    m = build_model(cfg).eval()
    batch = _model_batch(cfg)
    with torch.no_grad():
        base = m(**batch)["restore_views"]
        pad = dict(batch, input_ids=batch["input_ids"].clone())
        pad["input_ids"][0, 8:] = 7                                         # padded positions of report 0
        same = m(**pad)["restore_views"]
        other = dict(batch, input_ids=batch["input_ids"].clone())
        other["input_ids"][:, 1:7] = torch.randint(5, cfg.model.vocab_size, (2, 6))
        changed = m(**other)["restore_views"]
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    assert (changed - base).abs().amax() > 1e-4


def test_restoration_figure_writes_a_png(cfg, tmp_path):
    from common.text import build_tokenizer
    from trainer.model import build_model

    reports = ["Nodule in the right upper lobe.", "No pleural effusion.", "Calcified plaque in the aorta."]
    tok = build_tokenizer(reports, 200)
    torch.manual_seed(0)
    m = build_model(cfg, len(tok))
    ct = torch.randint(-1000, 1000, tuple(cfg.data.size), dtype=torch.int16).numpy()
    got = restoration_figure(m, tok, cfg, ct, reports[0], tmp_path / "r.png", seed=3)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.5 < got["restore/corrupted_fraction"] < 0.7 and got["restore/error"] > 0
    assert restoration_figure(m, tok, cfg, ct, reports[0], tmp_path / "s.png", seed=3) == got    # same seed
    assert m.training                                                       # left as it was


# ------------------------------------------------------------------------------ training
@pytest.mark.timeout(400)
def test_training_with_restore_lowers_the_restoration_loss(phantom):
    """The loop's step on a one-process engine, CLIP + TMA + restore on the debug preset: the
    restoration term falls over 20 steps on a fixed batch, and every term is a 0-d device tensor."""
    from trainer.engine import init_engine
    from trainer.losses import T3DLoss
    from trainer.model import build_model
    from trainer.step import scalars, train_step

    cfg = load_config(REPO / "configs/debug.yaml", ["train.lr=0.001", "train.warmup_steps=0", "train.steps=20",
                                                    "train.batch_size=4", "tma.prototypes=2", *ON])
    batch, tok = phantom_batch(cfg, phantom)
    torch.manual_seed(0)
    engine = init_engine(build_model(cfg, len(tok)), cfg)
    loss_fn = T3DLoss(cfg.tma, cfg.restore)
    logs = [train_step(engine, loss_fn, batch, cfg.data) for _ in range(20)]
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs[0].values())
    r = [scalars(x)["restore"] for x in logs]
    assert {"clip", "local", "consistency", "restore", "loss"} <= set(logs[0])
    assert sum(r[-3:]) / 3 < 0.5 * sum(r[:3]) / 3, [round(x, 4) for x in r]


@pytest.mark.timeout(300)
def test_restore_under_zero3_and_without_a_host_sync(monkeypatch):
    """ZeRO-3 partitions the decoder with the rest (its weights move and gather into the export);
    a micro-step with restoration reads no value on the host."""
    from benchmarks.train_step import synthetic_batch
    from tests.trainer.test_step import _count_reads
    from trainer.engine import init_engine
    from trainer.export import full_fp32_state_dict
    from trainer.losses import T3DLoss
    from trainer.model import build_model
    from trainer.step import train_step

    cfg = load_config(REPO / "configs/debug.yaml", ["train.batch_size=2", "tma.prototypes=4", "train.lr=0.01",
                                                    "deepspeed.zero_stage=3", "train.warmup_steps=0", *ON])
    torch.manual_seed(0)
    model = build_model(cfg, 200)
    before = {k: v.clone() for k, v in model.restorer.state_dict().items()}
    engine = init_engine(model, cfg)
    loss_fn, batch = T3DLoss(cfg.tma, cfg.restore), synthetic_batch(cfg, 2, 200, "cpu")
    for _ in range(3):
        logs = train_step(engine, loss_fn, batch, cfg.data)
    inside = _count_reads(monkeypatch, lambda: train_step(engine, loss_fn, batch, cfg.data))
    assert not [r for r in inside if "site-packages" not in r[1]], inside      # only DeepSpeed's / AdamW's own
    assert torch.isfinite(logs["restore"]) and engine.global_steps == 4
    after = full_fp32_state_dict(engine)
    assert any(not torch.equal(after[f"restorer.{k}"], v) for k, v in before.items() if v.is_floating_point())
