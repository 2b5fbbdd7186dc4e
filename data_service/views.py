"""Multi-view crops for TMA and batch collation (pure array functions; no Ray here).

``MultiViewCrop`` (array) / ``MultiViewCropd`` (dict): V random 3D crops whose edge is a random
fraction (``views.scale``) of the volume edge, resized to ``views.size`` with MONAI ``Resize``,
then flipped per axis, intensity-jittered and noised. Randomness comes from a per-sample seed
(``seed_for(base_seed, epoch, key)``) so that a resumed run reproduces exactly the same views.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from data_service.preprocess import normalize_hu
from trainer.config import DataConfig, ViewsConfig


def seed_for(base_seed: int, epoch: int, key: str) -> int:
    h = hashlib.sha256(f"{base_seed}:{epoch}:{key}".encode()).hexdigest()
    return int(h[:15], 16)


class MultiViewCrop:
    def __init__(self, cfg: ViewsConfig):
        if cfg.n < 0:
            raise ValueError(f"views.n must be >= 0, got {cfg.n}")
        self.cfg = cfg
        from monai.transforms import Resize

        self.resize = Resize(spatial_size=list(cfg.size), mode="trilinear", align_corners=False)

    def __call__(self, vol: torch.Tensor, seed: int) -> torch.Tensor:
        """vol (1, X, Y, Z) normalized float -> (V, 1, *size)."""
        if vol.ndim != 4 or vol.shape[0] != 1:
            raise ValueError(f"volume must be (1, X, Y, Z), got {tuple(vol.shape)}")
        rng = np.random.default_rng(seed)
        c = self.cfg
        out = []
        for _ in range(c.n):
            s = rng.uniform(c.scale[0], c.scale[1])
            size = [max(4, int(round(d * s))) for d in vol.shape[1:]]
            start = [int(rng.integers(0, d - k + 1)) for d, k in zip(vol.shape[1:], size)]
            crop = vol[:, start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]
            v = torch.as_tensor(self.resize(crop))
            flips = [ax + 1 for ax in range(3) if rng.random() < c.flip_prob]
            if flips:
                v = v.flip(flips)
            if c.intensity_jitter > 0:
                a = 1.0 + rng.uniform(-c.intensity_jitter, c.intensity_jitter)
                b = rng.uniform(-c.intensity_jitter, c.intensity_jitter)
                v = v * a + b
            if c.noise_std > 0:
                g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
                v = v + torch.randn(v.shape, generator=g) * c.noise_std
            out.append(v)
        if not out:
            return torch.zeros((0, 1, *c.size))
        return torch.stack(out).float()


class MultiViewCropd:
    """Dictionary wrapper: reads ``image`` (1,X,Y,Z) and ``seed``, writes ``views``."""

    def __init__(self, cfg: ViewsConfig, image_key: str = "image", views_key: str = "views"):
        self.t, self.image_key, self.views_key = MultiViewCrop(cfg), image_key, views_key

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d[self.views_key] = self.t(d[self.image_key], d["seed"])
        return d


def prepare_sample(sample: dict[str, Any], data: DataConfig, seed: int) -> dict[str, Any]:
    """A decoded shard sample -> normalized image tensor + views (float32)."""
    img = normalize_hu(torch.from_numpy(sample["ct"].astype(np.float32)), data.hu_window)[None]
    d = MultiViewCropd(data.views)({"image": img, "seed": seed})
    return {"key": sample["key"], "image": img, "views": d["views"], "report": sample["report"]}


def collate(items: Sequence[dict[str, Any]], tokenizer, max_tokens: int) -> dict[str, Any]:
    enc = tokenizer([it["report"] for it in items], padding="longest", truncation=True,
                    max_length=max_tokens, return_tensors="pt")
    return {"keys": [it["key"] for it in items],
            "image": torch.stack([it["image"] for it in items]),
            "views": torch.stack([it["views"] for it in items]),
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
