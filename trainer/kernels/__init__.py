"""Fused kernels behind one module; each keeps its PyTorch reference beside it.

- ``token_cosines``: the token-region attention + cosine of TMA's local alignment
  (``token_region.py``; reference ``trainer.losses.tma.token_cosines_reference``).
- ``augment``: the device-side float work of a training sample (``augment_kernel.py``: window, flips, jitter,
  noise; reference ``trainer.augment.augment_reference``).

``tma.kernel``: ``torch`` runs the reference; ``triton`` runs the fused kernel (CUDA, or the CPU
under ``TRITON_INTERPRET=1`` as the tests do) and fails clearly where it cannot. ``auto`` runs the
reference for now: the kernel's parity is proven in the interpreter only, since no GPU was
available to run ``tests/trainer/test_kernels.py`` on CUDA. Opt in with ``tma.kernel=triton``.
"""
from __future__ import annotations

import torch


def token_cosines(regions: torch.Tensor, tokens: torch.Tensor, attn_temperature: float,
                  kernel: str = "auto") -> torch.Tensor | None:
    """(Bi,N,D), (Bt,L,D) -> (Bi,Bt,L) from the fused kernel, or None: use the reference."""
    if kernel in ("torch", "auto"):
        return None
    if kernel != "triton":
        raise ValueError(f"tma.kernel: {kernel!r} is not one of ['auto', 'torch', 'triton']")
    from trainer.kernels import token_region as tr  # imports without triton; tr.triton is then None

    if tr.triton is None:
        raise ImportError("tma.kernel=triton needs the triton package: pip install 't3d[kernels]'")
    if not tr.available(regions):
        raise RuntimeError(f"tma.kernel=triton: the fused kernel runs on CUDA tensors (or on the CPU with "
                           f"TRITON_INTERPRET=1, for tests); got a tensor on {regions.device}. "
                           "Use tma.kernel=auto or torch here")
    return tr.token_cosines(regions, tokens, attn_temperature)


def augment(x: torch.Tensor, params: torch.Tensor, window, kernel: str = "auto") -> torch.Tensor:
    """int16 HU (N,1,X,Y,Z) + parameters (N,7) -> float32 model input (``trainer.augment``).
    ``kernel`` (``train.augment_kernel``): as ``tma.kernel``; ``auto`` runs the reference (the fused
    kernel's parity is proven in the interpreter; it has not run on a GPU here)."""
    from trainer.augment import augment_reference

    if kernel in ("torch", "auto"):
        return augment_reference(x, params, window)
    if kernel != "triton":
        raise ValueError(f"train.augment_kernel: {kernel!r} is not one of ['auto', 'torch', 'triton']")
    from trainer.kernels import augment_kernel as ka
    from trainer.kernels import token_region as tr

    if ka.triton is None:
        raise ImportError("train.augment_kernel=triton needs the triton package: pip install 't3d[kernels]'")
    if not tr.available(x):
        raise RuntimeError(f"train.augment_kernel=triton: the fused kernel runs on CUDA tensors (or on the CPU "
                           f"with TRITON_INTERPRET=1, for tests); got a tensor on {x.device}")
    return ka.augment(x, params, window)
