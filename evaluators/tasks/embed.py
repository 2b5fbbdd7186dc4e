"""Embed the samples of one split with a loaded model (shared by every task)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_service.preprocess import normalize_hu
from data_service.shards import iter_split
from trainer.config import FINDINGS


@torch.no_grad()
def embed_split(model, tokenizer, cfg, shards: str, split: str, batch: int = 8) -> dict[str, Any]:
    samples = list(iter_split(shards, split))
    imgs, txts, labels, keys = [], [], [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        x = torch.stack([normalize_hu(torch.from_numpy(s["ct"].astype(np.float32)), cfg.data.hu_window)[None]
                         for s in chunk])
        img, _ = model.encode_image(x)
        enc = tokenizer([s["report"] for s in chunk], padding="longest", truncation=True,
                        max_length=cfg.data.max_text_tokens, return_tensors="pt")
        txt, _, _ = model.encode_text(enc["input_ids"], enc["attention_mask"])
        imgs.append(img)
        txts.append(txt)
        keys += [s["key"] for s in chunk]
        for s in chunk:
            lab = s["meta"].get("labels")
            labels.append([lab[f] for f in FINDINGS] if lab else [np.nan] * len(FINDINGS))
    return {"img": torch.cat(imgs), "txt": torch.cat(txts), "labels": np.array(labels, float), "keys": keys}


def load_volumes(cfg, shards: str, split: str, masks: bool = False) -> dict[str, Any]:
    """One split as tensors: x (N,1,D,H,W) normalized CT, reports, keys and (``masks``) y, a list of
    (1,D,H,W) int64 label maps. Raises ValueError naming the split (empty) or the sample (no mask)."""
    xs, ys, reports, keys = [], [], [], []
    for s in iter_split(shards, split):
        if masks and s.get("mask") is None:
            raise ValueError(f"{shards}: sample {s['key']!r} in split {split!r} has no mask.npz; segmentation "
                             "needs organ masks on every train/test study (ingest with masks)")
        xs.append(normalize_hu(torch.from_numpy(s["ct"].astype(np.float32)), cfg.data.hu_window)[None])
        if masks:
            ys.append(torch.from_numpy(s["mask"].astype(np.int64))[None])
        reports.append(s["report"])
        keys.append(s["key"])
    if not xs:
        raise ValueError(f"{shards}: split {split!r} is empty")
    return {"x": torch.stack(xs), "y": ys, "reports": reports, "keys": keys}
