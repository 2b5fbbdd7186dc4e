"""Training samples: multi-view crops, the shifted whole volume and the sampled report.

The work is split where it is cheapest (docs/design.md, "Data path"):
- here, in the loader, per sample and on int16: the random crop boxes of the TMA views resized to
  ``views.size``, the random shift of the whole volume, and the report's sentence sampling. Every
  random choice comes from one generator seeded by ``seed_for(seed, micro-step, key)``, so a
  resumed run rebuilds the very same sample. The parameters of the float work (flips, intensity
  scale and shift, noise seed) are drawn here too, and shipped beside the int16 arrays;
- on the trainer's device (``trainer.augment``): the HU window, flips, intensity jitter and noise,
  from those parameters (one fused kernel on a GPU). ``AugmentParams`` names them; it alone knows
  their order in the packed float64 array the loader ships.
MONAI's ``Rand*`` transforms are not used for the random part: each holds its own RandomState and
does its float work on the loader's CPU, whereas here one seeded draw decides everything and the
float work moves to the accelerator. The resize is trilinear ``interpolate`` with
``align_corners=False``, what MONAI's ``Resize`` calls (``resize_views``; a test holds them equal).

With ``views.on_device`` the loader only draws: it ships the unshifted int16 volume once, with the
views' crop boxes, the volume's shift and the parameters, and the trainer's device cuts, resizes
and shifts (``cut_on_device``) with the same code, so the loader is bound by decoding alone and
the sample is the same either way.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch

from data_service.config import AugmentConfig, DataConfig, ViewsConfig
from data_service.preprocess import AIR

N_PARAMS = 7
"""Width of the packed parameters (``AugmentParams.to_array``): the loader's wire format."""
_SENTENCE = re.compile(r"(?<=[.;!?])\s+")


def seed_for(base_seed: int, epoch: int, key: str) -> int:
    h = hashlib.sha256(f"{base_seed}:{epoch}:{key}".encode()).hexdigest()
    return int(h[:15], 16)


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """The device-side augmentation of volumes or views, batch shape ``S`` (e.g. (B, 1 + V): row 0
    the whole volume, then the views). Host (numpy) data by design: the parameters steer Python
    control flow and the kernel's launch, so reading them never syncs a device.

    This class owns the field order: ``to_array``/``from_array`` are the only code that packs or
    reads the (S..., N_PARAMS) float64 array the loader ships through Ray Data (flip x, flip y,
    flip z, intensity scale, intensity shift, noise std, noise seed; float64 holds the seed exactly)."""
    flips: np.ndarray         # S + (3,) bool: flip along x, y, z
    scale: np.ndarray         # S float64: intensity scale (applied to the [0, 1] window)
    shift: np.ndarray         # S float64: intensity shift
    noise_std: np.ndarray     # S float64: std of the hashed gaussian noise (0: none)
    seed: np.ndarray          # S int64: the noise seed, also the restoration's corruption seed

    def __post_init__(self):
        s = np.shape(self.scale)
        if np.shape(self.flips) != (*s, 3) or any(np.shape(v) != s for v in (self.shift, self.noise_std, self.seed)):
            raise ValueError(f"AugmentParams: fields of inconsistent shapes {[np.shape(getattr(self, f.name)) for f in fields(self)]}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.scale.shape

    def __len__(self) -> int:
        return self.shape[0]

    @classmethod
    def from_array(cls, a) -> "AugmentParams":
        """The packed (S..., N_PARAMS) host array (numpy, or a CPU tensor) -> the fields."""
        a = np.asarray(a, dtype=np.float64)
        if a.ndim < 1 or a.shape[-1] != N_PARAMS:
            raise ValueError(f"augmentation parameters: expected (..., {N_PARAMS}), got {a.shape}")
        return cls(a[..., 0:3] > 0.5, a[..., 3].copy(), a[..., 4].copy(), a[..., 5].copy(),
                   a[..., 6].astype(np.int64))

    def to_array(self) -> np.ndarray:
        """The fields -> the packed (S..., N_PARAMS) float64 array (``from_array`` inverts it)."""
        cols = [self.flips.astype(np.float64), self.scale[..., None], self.shift[..., None],
                self.noise_std[..., None], self.seed.astype(np.float64)[..., None]]
        return np.concatenate(cols, axis=-1)

    @classmethod
    def identity(cls, shape) -> "AugmentParams":
        """No flips, scale 1, shift 0, no noise (seed 0): the plain HU window."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(d) for d in shape)
        return cls(np.zeros((*shape, 3), bool), np.ones(shape), np.zeros(shape), np.zeros(shape),
                   np.zeros(shape, np.int64))

    @classmethod
    def draw(cls, rng: np.random.Generator, flip_prob: float, jitter: float, noise_std: float) -> "AugmentParams":
        """One volume's or view's parameters (shape ()), drawn from ``rng`` in a fixed order (three
        flips, scale, shift, seed): the same generator state gives the same parameters."""
        flips = [rng.random() < flip_prob for _ in range(3)]
        a = 1.0 + rng.uniform(-jitter, jitter) if jitter > 0 else 1.0
        b = rng.uniform(-jitter, jitter) if jitter > 0 else 0.0
        seed = int(rng.integers(0, 2**31 - 1))
        return cls(np.array(flips, bool), np.array(float(a)), np.array(float(b)), np.array(float(noise_std)),
                   np.array(seed, np.int64))

    @classmethod
    def stack(cls, items: Sequence["AugmentParams"], axis: int = 0) -> "AugmentParams":
        """Stack parameters of equal shape along a new batch axis (none: shape (0,))."""
        if not items:
            return cls.identity((0,))
        return cls(*(np.stack([getattr(p, f.name) for p in items], axis) for f in fields(cls)))

    def __getitem__(self, idx) -> "AugmentParams":
        """Index the batch axes (``p[:, 0]``, ``p[rows]``, ``p[..., 0]``); the flips keep their last axis."""
        last = (idx if isinstance(idx, tuple) else (idx,)) + (slice(None),)
        return AugmentParams(self.flips[last], self.scale[idx], self.shift[idx], self.noise_std[idx], self.seed[idx])

    def reshape(self, *shape: int) -> "AugmentParams":
        """A new batch shape (e.g. ``reshape(-1)`` flattens (B, V) to (B x V,))."""
        return AugmentParams(self.flips.reshape(*shape, 3), self.scale.reshape(*shape), self.shift.reshape(*shape),
                             self.noise_std.reshape(*shape), self.seed.reshape(*shape))


def resize_views(hu: torch.Tensor, boxes: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """The views of one volume: hu (X, Y, Z) of any dtype, on any device; ``boxes`` (V, 6) host ints
    (start x, y, z, then size x, y, z) -> (V, 1, *size) int16 on hu's device, each box resized
    trilinearly (``align_corners=False``, what MONAI's ``Resize`` calls) and rounded half to even.
    The loader's views and the trainer's device-cut ones (``views.on_device``) both come from here."""
    out = torch.empty((len(boxes), 1, *size), dtype=torch.int16, device=hu.device)
    for v, (x, y, z, a, b, c) in enumerate(np.asarray(boxes).tolist()):
        crop = hu[x:x + a, y:y + b, z:z + c].float()[None, None]
        out[v, 0] = torch.nn.functional.interpolate(crop, size=tuple(size), mode="trilinear",
                                                    align_corners=False)[0, 0].round()
    return out


class MultiViewCrop:
    """Array transform: int16 HU (X, Y, Z) -> V random crops resized to ``views.size`` (int16) and
    their packed float parameters (V, N_PARAMS; ``AugmentParams.to_array``). A crop's edge is a random
    fraction (``views.scale``) of the volume's edge. ``draw`` alone makes the random choices (the
    boxes and parameters): with ``views.on_device`` the loader ships those and the trainer cuts."""

    def __init__(self, cfg: ViewsConfig):
        if cfg.n < 0:
            raise ValueError(f"views.n must be >= 0, got {cfg.n}")
        self.cfg = cfg

    def draw(self, shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (V, 6) int32: start x, y, z, size x, y, z; packed parameters (V, N_PARAMS))."""
        c = self.cfg
        boxes = np.empty((c.n, 6), np.int32)
        params = []
        for v in range(c.n):
            s = rng.uniform(c.scale[0], c.scale[1])
            size = [max(4, int(round(d * s))) for d in shape]
            boxes[v] = [int(rng.integers(0, d - k + 1)) for d, k in zip(shape, size)] + size
            params.append(AugmentParams.draw(rng, c.flip_prob, c.intensity_jitter, c.noise_std))
        return boxes, AugmentParams.stack(params).to_array()

    def __call__(self, hu: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if hu.ndim != 3:
            raise ValueError(f"volume must be (X, Y, Z), got {tuple(hu.shape)}")
        boxes, params = self.draw(hu.shape, rng)
        with warnings.catch_warnings():          # a decoded volume is read-only; it is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            src = torch.from_numpy(hu)
        return resize_views(src, boxes, self.cfg.size).numpy(), params


class MultiViewCropd:
    """Dictionary wrapper: reads ``ct`` (X, Y, Z int16) and ``rng``, writes ``views`` and ``view_params``."""

    def __init__(self, cfg: ViewsConfig, key: str = "ct"):
        self.t, self.key = MultiViewCrop(cfg), key

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d["views"], d["view_params"] = self.t(d[self.key], d["rng"])
        return d


def draw_shift(shape: Sequence[int], rng: np.random.Generator, fraction: float) -> np.ndarray:
    """A random translation of up to ``fraction`` of each edge, (3,) int32 voxels (no draw at 0)."""
    if fraction <= 0:
        return np.zeros(3, np.int32)
    return np.array([int(rng.integers(-int(d * fraction), int(d * fraction) + 1)) for d in shape], np.int32)


def shift_volume(hu, shifts: Sequence[int]):
    """Translate hu (X, Y, Z: a numpy array, or a tensor on any device) by ``shifts`` voxels (host
    ints); what comes in from outside is air."""
    shifts = [int(s) for s in shifts]
    if not any(shifts):
        return hu
    out = hu.new_full(hu.shape, int(AIR)) if isinstance(hu, torch.Tensor) else np.full_like(hu, int(AIR))
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
    ``image`` (1, X, Y, Z) int16, ``params`` (1 + V, N_PARAMS) for the device-side float work
    (``AugmentParams.to_array``; row 0: the whole volume), the sampled ``report``, and the views:
    ``views`` (V, 1, *views.size) int16, or with ``views.on_device`` their ``boxes`` (V, 6) and the
    ``shift`` (3,) of the whole volume, ``image`` left unshifted (``cut_on_device`` finishes it)."""
    rng = np.random.default_rng(seed)
    aug, ct = data.augment, sample["ct"]
    shift = draw_shift(ct.shape, rng, aug.shift)
    crop = crop or MultiViewCrop(data.views)
    if data.views.on_device:
        boxes, vparams = crop.draw(ct.shape, rng)
        out = {"image": ct[None], "boxes": boxes, "shift": shift}
    else:
        views, vparams = crop(ct, rng)
        out = {"image": shift_volume(ct, shift)[None], "views": views}
    whole = AugmentParams.draw(rng, 0.0, aug.intensity_jitter, aug.noise_std)      # no flips of the whole volume
    params = np.concatenate([AugmentParams.stack([whole]).to_array(), vparams])
    return {"key": sample["key"], **out, "params": params, "report": augment_report(sample["report"], rng, aug)}


def cut_on_device(image: torch.Tensor, shift: np.ndarray, boxes: np.ndarray | None, size: Sequence[int],
                  views: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loader's view and shift work, on the trainer's device (``views.on_device``): image
    (B, 1, X, Y, Z) int16 unshifted; shift (B, 3) and boxes (B, V, 6) host ints -> the shifted image
    and the views (B, V, 1, *size) int16 (None without ``views``), equal to what the loader ships
    without ``on_device``."""
    views = torch.stack([resize_views(image[b, 0], boxes[b], size) for b in range(image.shape[0])]) if views else None
    if np.asarray(shift).any():
        image = torch.stack([shift_volume(image[b, 0], shift[b])[None] for b in range(image.shape[0])])
    return image, views
