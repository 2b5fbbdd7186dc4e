"""Fused kernels behind one module; each keeps its PyTorch reference beside it.

No fused kernel ships yet: the token-region similarity (``trainer/losses/tma.py``) always runs
its PyTorch reference. ``tma.kernel=auto`` and ``torch`` select it; ``triton`` is refused with
a clear error rather than silently falling back.
"""
from __future__ import annotations


def token_region_similarity(regions, tokens, token_mask, attn_temperature, pool, gamma, kernel):
    if kernel == "triton":
        raise NotImplementedError("tma.kernel=triton: no fused Triton kernel for the token-region "
                                  "similarity in this version; use tma.kernel=torch or auto")
    return None
