"""Read a split in batches and embed it with a loaded model (shared by every task).

Volumes are streamed from the shards a batch at a time and go to the model's device; only the
embeddings (or, for segmentation, int16 HU and uint8 masks) are kept.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from data_service.preprocess import normalize_hu
from data_service.shards import iter_split
from trainer.config import FINDINGS


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def iter_batches(shards: str, split: str, batch: int = 8, masks: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Decoded samples of ``split`` in lists of ``batch``. With ``masks``, a sample without
    ``mask.npz`` raises ValueError naming it; an empty split raises (from ``split_shards``)."""
    chunk: list[dict[str, Any]] = []
    for s in iter_split(shards, split):
        if masks and s.get("mask") is None:
            raise ValueError(f"{shards}: sample {s['key']!r} in split {split!r} has no mask.npz; segmentation "
                             "needs organ masks on every train/test study (ingest with masks)")
        chunk.append(s)
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def to_input(hu: torch.Tensor, cfg) -> torch.Tensor:
    """HU (..., D, H, W) of any dtype -> the network's float input, same device."""
    return normalize_hu(hu.float(), cfg.data.hu_window)


def _volumes(chunk: list[dict[str, Any]], cfg) -> torch.Tensor:
    """A batch of decoded samples -> network input (B, 1, D, H, W)."""
    return torch.stack([to_input(torch.from_numpy(s["ct"]), cfg)[None] for s in chunk])


def _labels(s: dict[str, Any]) -> list[float]:
    lab = s["meta"].get("labels")
    return [lab[f] for f in FINDINGS] if lab else [np.nan] * len(FINDINGS)


@torch.no_grad()
def embed_split(model, tokenizer, cfg, shards: str, split: str, batch: int = 8) -> dict[str, Any]:
    """-> {img (N,E), txt (N,E) normalized embeddings on the CPU, labels (N,18) with NaN where a
    study has none, keys}."""
    dev = model_device(model)
    imgs, txts, labels, keys = [], [], [], []
    for chunk in iter_batches(shards, split, batch):
        x = _volumes(chunk, cfg).to(dev)
        img, _ = model.encode_image(x)
        enc = tokenizer([s["report"] for s in chunk], padding="longest", truncation=True,
                        max_length=cfg.data.max_text_tokens, return_tensors="pt").to(dev)
        txt, _, _ = model.encode_text(enc["input_ids"], enc["attention_mask"])
        imgs.append(img.float().cpu())
        txts.append(txt.float().cpu())
        keys += [s["key"] for s in chunk]
        labels += [_labels(s) for s in chunk]
    return {"img": torch.cat(imgs), "txt": torch.cat(txts), "labels": np.array(labels, float), "keys": keys}


@torch.no_grad()
def image_features(model, cfg, shards: str, split: str, batch: int = 8) -> dict[str, Any]:
    """The frozen encoder's memory for report generation, streamed: {memory (N, 1 + R, C) on the
    CPU (pooled token, then one token per region of the last feature map), reports, keys}."""
    dev = model_device(model)
    mem, reports, keys = [], [], []
    for chunk in iter_batches(shards, split, batch):
        x = _volumes(chunk, cfg).to(dev)
        g, local, _ = model.image(x)
        mem.append(torch.cat([g[:, None], local], 1).float().cpu())
        reports += [s["report"] for s in chunk]
        keys += [s["key"] for s in chunk]
    return {"memory": torch.cat(mem), "reports": reports, "keys": keys}


def load_volumes(shards: str, split: str, masks: bool = False) -> dict[str, Any]:
    """One split in memory, compactly: hu (N,1,D,H,W) int16, y (N,1,D,H,W) uint8 label maps
    (``masks``), reports, keys. Normalise batches with ``to_input`` when they are used."""
    hu, ys, reports, keys = [], [], [], []
    for chunk in iter_batches(shards, split, 16, masks):
        for s in chunk:
            hu.append(torch.from_numpy(s["ct"].astype(np.int16))[None])
            if masks:
                ys.append(torch.from_numpy(s["mask"].astype(np.uint8))[None])
            reports.append(s["report"])
            keys.append(s["key"])
    return {"hu": torch.stack(hu), "y": torch.stack(ys) if masks else None, "reports": reports, "keys": keys}
