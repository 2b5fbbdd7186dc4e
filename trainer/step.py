"""One training step, shared by the Ray Train loop and any single-process run (tests, checks).

``train_step(engine, loss_fn, batch, data)``: the device-side float work on the int16 batch
(``trainer.kernels.augment``), forward, loss, backward, optimizer step. ``engine`` is a DeepSpeed
engine (``trainer.engine.init_engine``): it owns the optimizer, the clipping, the accumulation and
the LR schedule, in one place, for every caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_service.config import DataConfig
from data_service.views import AugmentParams, cut_on_device
from trainer.kernels import augment


@dataclass
class Batch:
    """One micro-batch on the trainer's device, as the loader shipped it (int16 + parameters)."""
    image: torch.Tensor                 # (B, 1, X, Y, Z) int16 HU
    views: torch.Tensor | None          # (B, V, 1, x, y, z) int16 HU, or None (CLIP only)
    params: AugmentParams               # (B, 1 + V) on the host: row 0 the whole volume, then the views
    input_ids: torch.Tensor             # (B, L)
    attention_mask: torch.Tensor        # (B, L)
    neg_input_ids: torch.Tensor | None = None       # (B, S, Ls) each sentence negated (data.augment.negated_sentences)
    neg_attention_mask: torch.Tensor | None = None
    shift: np.ndarray | None = None     # data.views.on_device: (B, 3) host ints, image still unshifted
    boxes: np.ndarray | None = None     # and (B, V, 6) the views' crop boxes, cut on the device (views None)

    @classmethod
    def from_numpy(cls, b: dict[str, Any], device, views: bool, rows: np.ndarray | None = None) -> "Batch":
        """From a loader batch (``data_service.stream``); ``rows`` selects samples (default all)."""
        def host(name):
            return np.ascontiguousarray(b[name] if rows is None else b[name][rows])

        def t(name):
            return to_device(torch.from_numpy(host(name)), device)

        neg = [t(k) if k in b else None for k in ("neg_input_ids", "neg_attention_mask")]
        on_device = "boxes" in b
        cut = {"shift": host("shift"), "boxes": host("boxes") if views else None} if on_device else {}
        return cls(t("image"), t("views") if views and not on_device else None,
                   AugmentParams.from_array(host("params")), t("input_ids"), t("attention_mask"), *neg, **cut)

    def __len__(self) -> int:
        return self.image.shape[0]


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto the trainer's device; to CUDA through pinned memory, without waiting on the GPU."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def scalars(logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The step's 0-d loss terms (``T3DLoss``) as floats, read in one stacked transfer: the only
    host sync of a logging step's losses."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    read = torch.stack([logs[k].float() for k in keys]).tolist() if keys else []
    return {**{k: float(v) for k, v in logs.items() if k not in keys}, **dict(zip(keys, read))}


def restore_seeds(batch: Batch, device) -> torch.Tensor:
    """(B, 1 + V) int64 corruption seeds for the restoration term (``restore``): each input's own
    augmentation seed (host data, so exact resume corrupts as before), copied without a sync."""
    return to_device(torch.from_numpy(np.ascontiguousarray(batch.params.seed, dtype=np.int64)), device)


def model_inputs(batch: Batch, data: DataConfig, dtype: torch.dtype, kernel: str = "auto"):
    """int16 HU + parameters -> the float image (B,1,X,Y,Z) and views (B,V,1,x,y,z) or None. With
    ``data.views.on_device`` the views are cut and the image shifted here first (``cut_on_device``)."""
    image, int_views = batch.image, batch.views
    if batch.shift is not None:
        image, int_views = cut_on_device(image, batch.shift, batch.boxes, data.views.size, batch.boxes is not None)
    views = None
    if int_views is not None and int_views.shape[1] > 0:
        b, v = int_views.shape[:2]
        flat = augment(int_views.flatten(0, 1), batch.params[:, 1:].reshape(-1), data.hu_window, kernel)
        views = flat.view(b, v, *flat.shape[1:]).to(dtype)
    return augment(image, batch.params[:, 0], data.hu_window, kernel).to(dtype), views


def train_step(engine, loss_fn, batch: Batch, data: DataConfig, dtype: torch.dtype = torch.float32,
               kernel: str = "auto") -> dict[str, torch.Tensor]:
    """Forward, loss, backward and (at an accumulation boundary) the optimizer step; returns the
    loss terms as 0-d device tensors (``scalars`` reads them)."""
    image, views = model_inputs(batch, data, dtype, kernel)
    negations = None if batch.neg_input_ids is None else (batch.neg_input_ids, batch.neg_attention_mask)
    seeds = restore_seeds(batch, image.device) if getattr(engine.module, "restorer", None) is not None else None
    out = engine(image, batch.input_ids, batch.attention_mask, views, negations, seeds)
    loss, logs = loss_fn(out)
    engine.backward(loss)
    engine.step()
    return logs
