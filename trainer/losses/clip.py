"""Global CLIP InfoNCE, symmetric, negatives gathered from every rank."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses.dist import gather_with_grad, world


def contrastive_from_logits(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows: (b, W*b) local anchors vs all; cols: (b, W*b) the other direction. Targets are the
    local samples' positions in the gathered batch."""
    rank, _ = world()
    b = rows.shape[0]
    target = torch.arange(b, device=rows.device) + rank * b
    return 0.5 * (F.cross_entropy(rows.float(), target) + F.cross_entropy(cols.float(), target))


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """img, txt: (b, E) L2-normalized. The per-rank loss averages over local rows; the mean over
    ranks (what DDP/DeepSpeed gradient averaging optimizes) equals the single-process loss on the
    concatenated batch, and so do the gradients."""
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
    rows = logit_scale * img.float() @ all_txt.float().t()
    cols = logit_scale * txt.float() @ all_img.float().t()
    return contrastive_from_logits(rows, cols)
