"""Training samples: multi-view crops, the shifted whole volume and the sampled report.

The work is split where it is cheapest (docs/design.md, "Data path"):
- here, in the loader, per sample and on int16: the random crop boxes of the TMA views resized to
  ``views.size``, the random shift of the whole volume, and the report's sentence sampling. Every
  random choice comes from one generator seeded by ``seed_for(seed, micro-step, key)``, so a
  resumed run rebuilds the very same sample. The parameters of the float work (flips, intensity
  scale and shift, noise seed) are drawn here too, and shipped beside the int16 arrays;
- on the trainer's device (``trainer.augment``): the HU window, flips, intensity jitter and noise,
  from those parameters (one fused kernel on a GPU).
MONAI's ``Rand*`` transforms are not used for the random part: each holds its own RandomState and
does its float work on the loader's CPU, whereas here one seeded draw decides everything and the
float work moves to the accelerator. The resize is MONAI's ``Resize``.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import torch

from data_service.config import AugmentConfig, DataConfig, ViewsConfig
from data_service.preprocess import AIR

N_PARAMS = 7
"""Per volume or view: flip x, flip y, flip z (0/1), intensity scale, intensity shift, noise std,
noise seed (float64 holds it exactly)."""
_SENTENCE = re.compile(r"(?<=[.;!?])\s+")


def seed_for(base_seed: int, epoch: int, key: str) -> int:
    h = hashlib.sha256(f"{base_seed}:{epoch}:{key}".encode()).hexdigest()
    return int(h[:15], 16)


def float_params(rng: np.random.Generator, flip_prob: float, jitter: float, noise_std: float) -> np.ndarray:
    """The device-side augmentation of one volume or view (see N_PARAMS)."""
    flips = [float(rng.random() < flip_prob) for _ in range(3)]
    a = 1.0 + rng.uniform(-jitter, jitter) if jitter > 0 else 1.0
    b = rng.uniform(-jitter, jitter) if jitter > 0 else 0.0
    return np.array([*flips, a, b, noise_std, float(rng.integers(0, 2**31 - 1))], np.float64)


class MultiViewCrop:
    """Array transform: int16 HU (X, Y, Z) -> V random crops resized to ``views.size`` (int16) and
    their float parameters (V, N_PARAMS). A crop's edge is a random fraction (``views.scale``) of the
    volume's edge."""

    def __init__(self, cfg: ViewsConfig):
        if cfg.n < 0:
            raise ValueError(f"views.n must be >= 0, got {cfg.n}")
        from monai.transforms import Resize

        self.cfg = cfg
        self.resize = Resize(spatial_size=list(cfg.size), mode="trilinear", align_corners=False)

    def __call__(self, hu: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if hu.ndim != 3:
            raise ValueError(f"volume must be (X, Y, Z), got {tuple(hu.shape)}")
        c = self.cfg
        views = np.empty((c.n, 1, *c.size), np.int16)
        params = np.empty((c.n, N_PARAMS), np.float64)
        for v in range(c.n):
            s = rng.uniform(c.scale[0], c.scale[1])
            size = [max(4, int(round(d * s))) for d in hu.shape]
            start = [int(rng.integers(0, d - k + 1)) for d, k in zip(hu.shape, size)]
            crop = hu[start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]
            out = self.resize(torch.from_numpy(crop.astype(np.float32))[None])
            views[v, 0] = np.rint(np.asarray(out[0])).astype(np.int16)
            params[v] = float_params(rng, c.flip_prob, c.intensity_jitter, c.noise_std)
        return views, params


class MultiViewCropd:
    """Dictionary wrapper: reads ``ct`` (X, Y, Z int16) and ``rng``, writes ``views`` and ``view_params``."""

    def __init__(self, cfg: ViewsConfig, key: str = "ct"):
        self.t, self.key = MultiViewCrop(cfg), key

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d["views"], d["view_params"] = self.t(d[self.key], d["rng"])
        return d


def shift_volume(hu: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Translate by up to ``fraction`` of each edge; what comes in from outside is air."""
    if fraction <= 0:
        return hu
    shifts = [int(rng.integers(-int(d * fraction), int(d * fraction) + 1)) for d in hu.shape]
    out = np.full_like(hu, int(AIR))
    src = tuple(slice(max(0, -s), d - max(0, s)) for s, d in zip(shifts, hu.shape))
    dst = tuple(slice(max(0, s), d - max(0, -s)) for s, d in zip(shifts, hu.shape))
    out[dst] = hu[src]
    return out


def augment_report(text: str, rng: np.random.Generator, aug: AugmentConfig) -> str:
    """Keep each sentence (split at . ; ! ?) with probability ``sentence_keep`` and optionally
    shuffle them, section by section (``Findings: ...`` / ``Impression: ...`` lines); at least one
    sentence of the report survives."""
    if aug.sentence_keep >= 1.0 and not aug.sentence_shuffle:
        return text
    sections = []
    for line in text.split("\n"):
        head, sep, body = line.partition(": ")
        if not sep:
            head, body = "", line
        sents = [s for s in _SENTENCE.split(body.strip()) if s]
        sections.append((head, sents))
    total = sum(len(s) for _, s in sections)
    if total == 0:
        return text
    keep = rng.random(total) < aug.sentence_keep
    if not keep.any():
        keep[int(rng.integers(0, total))] = True
    out, k = [], 0
    for head, sents in sections:
        kept = [s for s, m in zip(sents, keep[k:k + len(sents)]) if m]
        k += len(sents)
        if aug.sentence_shuffle:
            kept = [kept[i] for i in rng.permutation(len(kept))]
        if kept:
            out.append((head + ": " if head else "") + " ".join(kept))
    return "\n".join(out)


def prepare_sample(sample: dict[str, Any], data: DataConfig, seed: int,
                   crop: MultiViewCrop | None = None) -> dict[str, Any]:
    """A decoded shard sample -> the loader's part of a training sample (see the module doc):
    ``image`` (1, X, Y, Z) int16, ``views`` (V, 1, *views.size) int16, ``params`` (1 + V, N_PARAMS)
    for the device-side float work (row 0: the whole volume), and the sampled ``report``."""
    rng = np.random.default_rng(seed)
    aug = data.augment
    image = shift_volume(sample["ct"], rng, aug.shift)[None]
    views, vparams = (crop or MultiViewCrop(data.views))(sample["ct"], rng)
    params = np.concatenate([float_params(rng, 0.0, aug.intensity_jitter, aug.noise_std)[None], vparams])
    return {"key": sample["key"], "image": image, "views": views, "params": params,
            "report": augment_report(sample["report"], rng, aug)}
