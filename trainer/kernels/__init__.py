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


def _use_triton(kernel: str, key: str, module, x: torch.Tensor) -> bool:
    """False for ``auto``/``torch`` (the reference runs); True when the fused kernel in ``module``
    can run on ``x``; a clear error naming ``key`` otherwise."""
    if kernel in ("torch", "auto"):
        return False
    if kernel != "triton":
        raise ValueError(f"{key}: {kernel!r} is not one of ['auto', 'torch', 'triton']")
    from trainer.kernels import token_region as tr  # imports without triton; tr.triton is then None

    if module.triton is None:
        raise ImportError(f"{key}=triton needs the triton package: pip install 't3d[kernels]'")
    if not tr.available(x):
        raise RuntimeError(f"{key}=triton: the fused kernel runs on CUDA tensors (or on the CPU with "
                           f"TRITON_INTERPRET=1, for tests); got a tensor on {x.device}. Use {key}=auto or torch here")
    return True


def token_cosines(regions: torch.Tensor, tokens: torch.Tensor, attn_temperature: float,
                  kernel: str = "auto") -> torch.Tensor | None:
    """(Bi,N,D), (Bt,L,D) -> (Bi,Bt,L) from the fused kernel, or None: use the reference."""
    from trainer.kernels import token_region as tr

    if not _use_triton(kernel, "tma.kernel", tr, regions):
        return None
    return tr.token_cosines(regions, tokens, attn_temperature)


def augment(x: torch.Tensor, params: torch.Tensor, window, kernel: str = "auto") -> torch.Tensor:
    """int16 HU (N,1,X,Y,Z) + parameters (N,7) -> float32 model input (``trainer.augment``).
    ``kernel`` (``train.augment_kernel``): as ``tma.kernel``; ``auto`` runs the reference (the fused
    kernel's parity is proven in the interpreter; it has not run on a GPU here)."""
    from trainer.augment import augment_reference
    from trainer.kernels import augment_kernel as ka

    if not _use_triton(kernel, "train.augment_kernel", ka, x):
        return augment_reference(x, params, window)
    return ka.augment(x, params, window)
