"""Fused kernels behind one module; each keeps its PyTorch reference beside it.

- ``token_cosines``: the token-region attention + cosine of TMA's local alignment
  (``token_region.py``; reference ``trainer.losses.tma.token_cosines_reference``).
- ``augment``: the device-side float work of a training sample (``augment_kernel.py``: window, flips, jitter,
  noise; reference ``trainer.augment.augment_reference``).

``torch`` runs the reference; ``triton`` runs the fused kernel (CUDA, or the CPU under
``TRITON_INTERPRET=1`` as the tests do) and fails clearly where it cannot. ``auto`` picks by what was
measured on an H200 (benchmarks/RESULTS.md, "GPU"; both kernels pass their parity tests compiled there):
- ``train.augment_kernel=auto``: the fused kernel on a CUDA tensor when triton is installed (x16.9
  faster and 0.28x the memory of the reference on a paper-grid micro-batch), else the reference;
- ``tma.kernel=auto``: the reference. The fused token-region kernel uses 0.10x the memory but runs
  x0.21 the reference's speed at the paper preset's sizes (cuBLAS wins there); opt in with
  ``tma.kernel=triton`` where memory binds.
"""
from __future__ import annotations

import torch


def _use_triton(kernel: str, key: str, module, x: torch.Tensor, auto_fused: bool = False) -> bool:
    """False for ``torch`` (the reference runs), and for ``auto`` unless ``auto_fused`` and the fused
    kernel can run on ``x`` (a CUDA tensor, triton installed); True when ``triton`` and the kernel in
    ``module`` can run on ``x``; a clear error naming ``key`` otherwise."""
    if kernel == "auto":
        return auto_fused and module.triton is not None and x.is_cuda
    if kernel == "torch":
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


def augment(x: torch.Tensor, params, window, kernel: str = "auto") -> torch.Tensor:
    """int16 HU (N,1,X,Y,Z) + parameters (N,) (``data_service.views.AugmentParams``, host data) -> float32 model input (``trainer.augment``).
    ``kernel`` (``train.augment_kernel``): ``auto`` runs the fused kernel on CUDA tensors (see above)."""
    from trainer.augment import augment_reference
    from trainer.kernels import augment_kernel as ka

    if not _use_triton(kernel, "train.augment_kernel", ka, x, auto_fused=True):
        return augment_reference(x, params, window)
    return ka.augment(x, params, window)
