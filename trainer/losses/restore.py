"""The restoration term (``restore``; docs/design.md, "Text-informed restoration"): the error of the
decoder's restored input against the clean input, counted on the corrupted voxels only.

Per input (the whole volume; each TMA view) the masked mean over the micro-batch (sum of the
errors on corrupted voxels / their count, the count clamped to 1: no corrupted voxel gives 0, not
NaN); the term is the mean over the inputs, so the volume and the views weigh alike whatever their
voxel counts. Per rank, no collective: DeepSpeed averages the gradients across ranks.
"""
from __future__ import annotations

import torch

from trainer.config import RESTORE_LOSSES


def masked_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean ``kind`` error ("mse" | "l1") over the voxels where ``mask`` is set; 0-d float32."""
    if kind not in RESTORE_LOSSES:
        raise ValueError(f"restore.loss: {kind!r} is not one of {list(RESTORE_LOSSES)}")
    if pred.shape != target.shape or mask.shape != pred.shape:
        raise ValueError(f"restore: pred, target and mask must have one shape, got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}, {tuple(mask.shape)}")
    d = pred.float() - target.float()
    e = d.square() if kind == "mse" else d.abs()
    m = mask.to(e.dtype)
    return (e * m).sum() / m.sum().clamp_min(1.0)


def restore_loss(out: dict[str, torch.Tensor], kind: str = "mse") -> torch.Tensor:
    """The term from the model's output (``T3D.forward`` with ``restore_seeds``): ``restore_image``
    (B,1,X,Y,Z) restored, ``restore_image_target`` and ``restore_image_mask``; with views also
    ``restore_views`` (B,V,1,x,y,z) and its target and mask."""
    terms = [masked_error(out["restore_image"], out["restore_image_target"], out["restore_image_mask"], kind)]
    if "restore_views" in out:
        p, t, m = out["restore_views"], out["restore_views_target"], out["restore_views_mask"]
        terms += [masked_error(p[:, v], t[:, v], m[:, v], kind) for v in range(p.shape[1])]
    return torch.stack(terms).mean()
