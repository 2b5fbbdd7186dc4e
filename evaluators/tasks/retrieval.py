"""Cross-modal retrieval: image->report and report->image Recall@k."""
from __future__ import annotations

import torch


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, ks=(1, 5, 10, 50, 100)) -> dict[str, float]:
    """img, txt (N,E) normalized, row i of each is a pair. Ks above N are skipped."""
    if img.shape != txt.shape:
        raise ValueError(f"image {tuple(img.shape)} and text {tuple(txt.shape)} embeddings differ")
    sim = img.float() @ txt.float().t()
    n = sim.shape[0]
    target = torch.arange(n)
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        rank = (s > s[target, target].unsqueeze(1)).sum(1)   # how many beat the true pair
        for k in ks:
            if k <= n:
                out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out
