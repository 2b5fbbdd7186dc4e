"""Fused Triton kernels against their PyTorch references: on the CPU with TRITON_INTERPRET=1 (CI, via
tests/conftest.py), compiled on CUDA where a GPU is (``pytest --noconftest tests/trainer/test_kernels.py``)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import TMAConfig
from trainer.losses import local_alignment_loss, token_region_similarity

pytest.importorskip("triton", reason="the kernels need triton (pip install 't3d[kernels]')")
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(bi, bt, l, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = F.normalize(torch.randn(bi, n, d, generator=g), dim=-1).to(DEV).requires_grad_()
    t = F.normalize(torch.randn(bt, l, d, generator=g), dim=-1).to(DEV).requires_grad_()
    m = (torch.rand(bt, l, generator=g) > 0.3).float()
    m[:, 0] = 1.0
    return r, t, m.to(DEV)


@pytest.mark.parametrize("pool", ["mean", "lse"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 8), (3, 2, 70, 18, 24), (1, 4, 16, 32, 64)])
def test_token_region_parity(shape, pool):
    """Forward and both gradients match the reference: odd sizes, several token blocks (L=70)."""
    assert DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    r, t, m = _inputs(*shape)
    w = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1)).to(DEV)
    out = {}
    for k in ("triton", "torch"):
        s = token_region_similarity(r, t, m, 0.07, pool, kernel=k)
        out[k] = (s, *torch.autograd.grad((s * w).sum(), [r, t]))
    for a, b, what in zip(out["triton"], out["torch"], ("S", "dR", "dT")):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (what, (a - b).abs().max())


def test_local_loss_same_with_kernel():
    r, t, m = _inputs(4, 4, 12, 8, 16, seed=3)
    views = torch.stack([r, r.flip(1)], 1)                       # (B, V, N, D)
    res = {}
    for k in ("triton", "torch"):
        loss = local_alignment_loss(views, t, m, TMAConfig(kernel=k))
        res[k] = (loss, *torch.autograd.grad(loss, [r, t]))
    for a, b in zip(res["triton"], res["torch"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.skipif(DEV != "cpu", reason="checks the CPU's choices (auto = reference, triton refused)")
def test_kernel_choice(monkeypatch):
    from trainer.kernels import token_region

    r, t, m = _inputs(2, 2, 4, 4, 8)
    calls = []
    real = token_region.token_cosines
    monkeypatch.setattr(token_region, "token_cosines", lambda *a: calls.append(1) or real(*a))
    token_region_similarity(r, t, m, 0.1, kernel="auto")
    assert calls == []                                     # auto on the CPU: the reference, not the kernel
    token_region_similarity(r, t, m, 0.1, kernel="triton")
    assert calls == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="tma.kernel=triton: the fused kernel runs on CUDA tensors"):
        token_region_similarity(r, t, m, 0.1, kernel="triton")
    with pytest.raises(ValueError, match="tma.kernel"):
        token_region_similarity(r, t, m, 0.1, kernel="cuda")


@pytest.mark.parametrize("shape", [(3, 1, 7, 5, 3), (2, 1, 33, 17, 9)])
def test_augment_kernel_parity(shape):
    """The fused augmentation (window, flips, scale/shift, hashed noise) against its reference,
    at odd sizes spanning several blocks, with every flip combination and noise on and off."""
    from data_service.views import AugmentParams
    from trainer.augment import augment_reference
    from trainer.kernels import augment

    g = torch.Generator().manual_seed(0)
    n = shape[0]
    x = torch.randint(-1200, 3200, shape, generator=g).to(torch.int16)
    p = AugmentParams(flips=torch.randint(0, 2, (n, 3), generator=g).numpy() > 0,
                      scale=(1 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64) - 0.1).numpy(),
                      shift=(0.2 * torch.rand(n, generator=g, dtype=torch.float64) - 0.1).numpy(),
                      noise_std=np.array([0.02, 0.0, 0.1][:n]), seed=np.array([3, 2**31 - 2, 12345][:n], np.int64))
    x = x.to(DEV)                                          # the parameters stay host data
    ref = augment_reference(x, p, (-1000.0, 1000.0))
    out = augment(x, p, (-1000.0, 1000.0), kernel="triton")
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    # auto: the reference on the CPU, the fused kernel on CUDA (trainer/kernels/__init__.py)
    assert torch.equal(augment(x, p, (-1000.0, 1000.0), kernel="auto"), ref if DEV == "cpu" else out)
