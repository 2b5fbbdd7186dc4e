"""The augmentation parameters as named host fields (``data_service.views.AugmentParams``) over the
loader's packed float64 wire format, and the one HU window (``data_service.preprocess.hu_to_unit``)
shared by evaluation and training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import load_config
from data_service.preprocess import hu_to_unit, to_model_input
from data_service.views import N_PARAMS, AugmentParams, prepare_sample
from tests.conftest import REPO


def _sample(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ct = rng.integers(-1500, 3500, cfg.data.size).astype(np.int16)    # inside and outside the window
    return {"key": "s0", "ct": ct, "report": "Findings: a. b. c.\nImpression: d."}


def test_packed_wire_format_round_trips_and_pins_the_field_order():
    cfg = load_config(REPO / "configs/debug.yaml", ["data.views.flip_prob=0.5", "data.augment.intensity_jitter=0.1"])
    out = prepare_sample(_sample(cfg), cfg.data, seed=123)
    a = out["params"]
    assert a.dtype == np.float64 and a.shape == (1 + cfg.data.views.n, N_PARAMS)
    p = AugmentParams.from_array(a)
    assert p.shape == (1 + cfg.data.views.n,) and p.flips.dtype == bool and p.seed.dtype == np.int64
    assert np.array_equal(p.to_array(), a)                                   # exact round trip
    # the wire layout (what a resumed run's loader must keep writing): flips, scale, shift, std, seed
    assert np.array_equal(a[:, :3], p.flips) and np.array_equal(a[:, 3], p.scale) and np.array_equal(a[:, 4], p.shift)
    assert np.array_equal(a[:, 5], p.noise_std) and np.array_equal(a[:, 6], p.seed)
    assert not p.flips[0].any()                                              # the whole volume is never flipped
    assert np.array_equal(prepare_sample(_sample(cfg), cfg.data, seed=123)["params"], a)   # same seed, same sample
    assert not np.array_equal(prepare_sample(_sample(cfg), cfg.data, seed=124)["params"], a)
    # indexing and reshaping act on the batch axes only
    b = AugmentParams.from_array(np.stack([a, a + 0]))
    assert b.shape == (2, 1 + cfg.data.views.n)
    assert np.array_equal(b[:, 1:].reshape(-1).to_array(), np.concatenate([a[1:], a[1:]]))
    assert np.array_equal(b[..., 0].to_array(), np.stack([a[0], a[0]]))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        AugmentParams(np.zeros((2, 3), bool), np.ones(2), np.zeros(2), np.zeros(3), np.zeros(2, np.int64))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_train_and_eval_map_hu_the_same_way(kernel):
    """One int16 volume through the evaluation's preprocessing (``to_model_input``) and through the
    training path (the loader's packed parameters -> ``Batch`` -> ``model_inputs``) with identity
    augmentation: the same float inputs."""
    if kernel == "triton":
        pytest.importorskip("triton")
    from trainer.step import Batch, model_inputs

    cfg = load_config(REPO / "configs/debug.yaml")
    ct = _sample(cfg)["ct"]
    views = np.stack([ct[:16, :16, :8], ct[-16:, -16:, -8:]])[:, None]       # (V, 1, x, y, z) int16
    wire = AugmentParams.identity((1, 1 + len(views))).to_array()             # what the loader ships
    batch = Batch.from_numpy({"image": ct[None, None], "views": views[None], "params": wire,
                              "input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)},
                             "cpu", views=True)
    image, v = model_inputs(batch, cfg.data, torch.float32, kernel)
    ev = to_model_input(torch.from_numpy(ct), cfg.data)                      # the evaluators' call
    assert image.dtype == ev.dtype == torch.float32
    tol = {} if kernel == "torch" else {"atol": 1e-6, "rtol": 0}
    torch.testing.assert_close(image[0, 0], ev, **({"atol": 0, "rtol": 0} | tol))
    torch.testing.assert_close(v[0, :, 0], to_model_input(torch.from_numpy(views[:, 0]), cfg.data),
                               **({"atol": 0, "rtol": 0} | tol))
    assert np.array_equal(to_model_input(ct, cfg.data), ev.numpy())         # numpy and torch: the same numbers
    assert float(ev.min()) == 0.0 and float(ev.max()) == 1.0                  # clipped at both ends
    assert torch.equal(hu_to_unit(torch.from_numpy(ct).float(), cfg.data.hu_window), ev)
