"""Features of a split from a loaded model, shared by every task: embeddings (zero-shot,
retrieval, probes), the frozen feature map (report generation), int16 volumes and masks
(segmentation).

Volumes are streamed from the shards a batch at a time and go to the model's device; only the
embeddings (or, for segmentation, int16 HU and uint8 masks) are kept.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from common.labels import FINDINGS
from data_service.preprocess import to_model_input
from data_service.shards import iter_split
from trainer.model.text import tokenize_reports


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def iter_batches(shards: str, split: str, batch: int = 8, masks: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Decoded samples of ``split`` in lists of ``batch``. With ``masks``, a sample without
    a mask raises ValueError naming it; an empty split raises (from ``split_shards``)."""
    chunk: list[dict[str, Any]] = []
    for s in iter_split(shards, split):
        if masks and s.get("mask") is None:
            raise ValueError(f"{shards}: sample {s['key']!r} in split {split!r} has no mask member; segmentation "
                             "needs organ masks on every train/test study (ingest with masks)")
        chunk.append(s)
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _volumes(chunk: list[dict[str, Any]], cfg) -> torch.Tensor:
    """A batch of decoded samples -> network input (B, 1, D, H, W)."""
    return to_model_input(torch.from_numpy(np.stack([s["ct"] for s in chunk]))[:, None], cfg.data)


def _labels(s: dict[str, Any]) -> list[float]:
    lab = s["meta"].get("labels")
    return [lab[f] for f in FINDINGS] if lab else [np.nan] * len(FINDINGS)


def _report_embeddings(model, tokenizer, cfg, texts: list[str], dev) -> torch.Tensor:
    """Reports -> normalized embeddings (N,E), float32 on the CPU."""
    enc = tokenize_reports(tokenizer, texts, cfg)
    txt, _, _ = model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
    return txt.float().cpu()


@torch.no_grad()
def embed_split(model, tokenizer, cfg, shards: str, split: str, batch: int = 8, memory: bool = False) -> dict[str, Any]:
    """One pass over ``split`` -> {img (N,E), txt (N,E) normalized embeddings on the CPU, labels (N,18)
    with NaN where a study has none, keys, reports}; with ``memory``, also the frozen encoder's
    feature map for report generation, memory (N, 1 + R, C): the pooled token, then one per region."""
    dev = model_device(model)
    imgs, txts, mem, labels, keys, reports = [], [], [], [], [], []
    for chunk in iter_batches(shards, split, batch):
        pooled, local, _ = model.image(_volumes(chunk, cfg).to(dev))
        imgs.append(model.project_image(pooled).float().cpu())
        if memory:
            mem.append(torch.cat([pooled[:, None], local], 1).float().cpu())
        txts.append(_report_embeddings(model, tokenizer, cfg, [s["report"] for s in chunk], dev))
        keys += [s["key"] for s in chunk]
        reports += [s["report"] for s in chunk]
        labels += [_labels(s) for s in chunk]
    out = {"img": torch.cat(imgs), "txt": torch.cat(txts), "labels": np.array(labels, float), "keys": keys,
           "reports": reports}
    if memory:
        out["memory"] = torch.cat(mem)
    return out


@torch.no_grad()
def embed_reports(model, tokenizer, cfg, shards: str, split: str, limit: int, batch: int = 64) -> dict[str, Any]:
    """Text only (no volume is decoded): the first ``limit`` labelled reports of ``split`` ->
    {txt (N,E) normalized, labels (N,18)}. Bounded whatever the split's size."""
    from data_service.shards import iter_split

    dev = model_device(model)
    texts, labels = [], []
    for s in iter_split(shards, split, decode_ct=False):
        if len(texts) >= limit:
            break
        if s["meta"].get("labels"):
            texts.append(s["report"])
            labels.append(_labels(s))
    txts = [_report_embeddings(model, tokenizer, cfg, texts[i:i + batch], dev) for i in range(0, len(texts), batch)]
    return {"txt": torch.cat(txts) if txts else torch.zeros(0, 1), "labels": np.array(labels, float).reshape(-1, len(FINDINGS))}


def load_volumes(shards: str, split: str, masks: bool = False) -> dict[str, Any]:
    """One split in memory, compactly: hu (N,1,D,H,W) int16, y (N,1,D,H,W) uint8 label maps
    (``masks``), reports, keys. Normalise batches with ``to_model_input`` when they are used."""
    hu, ys, reports, keys = [], [], [], []
    for chunk in iter_batches(shards, split, 16, masks):
        for s in chunk:
            hu.append(torch.from_numpy(s["ct"].astype(np.int16))[None])
            if masks:
                ys.append(torch.from_numpy(s["mask"].astype(np.uint8))[None])
            reports.append(s["report"])
            keys.append(s["key"])
    return {"hu": torch.stack(hu), "y": torch.stack(ys) if masks else None, "reports": reports, "keys": keys}
