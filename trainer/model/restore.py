"""Text-informed restoration (``restore``; docs/design.md, "Text-informed restoration"): a light
U-Net decoder on the image encoder's stage maps (``ImageEncoder(x, stages=True)``) that restores the
corrupted input (``trainer.model.corrupt``) on the input grid, its coarsest level(s) attending to
the report's tokens so the report helps restore what it names. No distributed code.

Levels, coarse to fine: 0 = the encoder's last stage (layer4), 1-3 = layer3 ... layer1, 4 = the stem.
Level k has ``restore.width >> k`` channels (at least 8); each upsamples (trilinear, to the skip's
exact size: odd grids need no padding rule), concatenates a 1x1x1 projection of the skip, and runs
``restore.depth`` conv blocks (3x3x3 conv, GroupNorm, GELU). The input grid has no level of its
own: the stem level also takes the corrupted input folded to its grid (space-to-depth, s^3 channels
for the stem's stride s: every input voxel, exactly), and a 1x1x1 head gives s^3 channels unfolded
back to the input grid (depth-to-space, ESPCN's sub-pixel output). A U-Net level on the full grid
was 3/4 of the decoder's time on the debug flavour, and the paper grid is 8.4 M voxels.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.corrupt import corrupt

LEVELS = 5


def _groups(c: int) -> int:
    return next(g for g in (8, 4, 2, 1) if c % g == 0)


def conv_blocks(cin: int, cout: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                   nn.GroupNorm(_groups(cout), cout), nn.GELU()]
    return nn.Sequential(*layers)


class TokenCrossAttention(nn.Module):
    """Decoder features (B, C, d, h, w) attend to report tokens (B, L, Dt) with mask (B, L), pre-norm
    and residual: x + out(softmax(q k^T / sqrt(dh)) v). Masked tokens get exactly zero weight; a
    report without any valid token adds nothing (no NaN). The product runs in float32."""

    def __init__(self, dim: int, token_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"restore.heads={heads} does not divide the level's width {dim}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(token_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        h, dh = self.heads, c // self.heads
        seq = x.flatten(2).transpose(1, 2)                                          # (B, N, C)
        q = self.q(self.norm(seq)).view(b, -1, h, dh).transpose(1, 2).float()       # (B, H, N, dh)
        k, v = self.kv(tokens.to(seq.dtype)).view(b, -1, 2, h, dh).permute(2, 0, 3, 1, 4).float()  # (B, H, L, dh)
        valid = token_mask > 0                                                      # (B, L)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(dh)                          # (B, H, N, L)
        logits = logits.masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)
        a = logits.softmax(-1) * valid.any(1).to(logits.dtype)[:, None, None, None]
        o = (a @ v).transpose(1, 2).reshape(b, -1, c).to(seq.dtype)                 # (B, N, C)
        return x + self.out(o).transpose(1, 2).reshape(x.shape)


def space_to_depth(x: torch.Tensor, grid: tuple[int, ...], s: int) -> torch.Tensor:
    """(B, 1, X, Y, Z) -> (B, s^3, *grid): the voxels of each s x s x s cell as channels (zero-padded,
    or cropped, to grid x s first)."""
    b = x.shape[0]
    pad = []
    for g, n in zip(reversed(grid), reversed(x.shape[2:])):
        pad += [0, g * s - n]
    x = F.pad(x, pad) if any(pad) else x                       # negative pads crop
    x = x.reshape(b, grid[0], s, grid[1], s, grid[2], s).permute(0, 2, 4, 6, 1, 3, 5)
    return x.reshape(b, s ** 3, *grid)


def depth_to_space(x: torch.Tensor, size: tuple[int, ...], s: int) -> torch.Tensor:
    """(B, s^3, d, h, w) -> (B, 1, *size): the inverse of ``space_to_depth`` (cropped to ``size``)."""
    b, _, d, h, w = x.shape
    x = x.reshape(b, s, s, s, d, h, w).permute(0, 4, 1, 5, 2, 6, 3).reshape(b, 1, d * s, h * s, w * s)
    return x[:, :, :size[0], :size[1], :size[2]]


class RestoreDecoder(nn.Module):
    """Stage maps (finest first, ``ImageEncoder.stage_dims`` channels) + the corrupted input ->
    the restored input (B, 1, X, Y, Z). ``token_dim``: the width of the tokens it attends to;
    ``stem_stride``: the input-to-stem stride (``model.conv1_stride``)."""

    def __init__(self, stage_dims: list[int], token_dim: int, cfg, stem_stride: int):
        super().__init__()
        if len(stage_dims) != LEVELS:
            raise ValueError(f"RestoreDecoder: expected {LEVELS} stage widths (stem, layer1-4), got {stage_dims}")
        w = [cfg.level_width(k) for k in range(LEVELS)]
        self.stride = s = int(stem_stride)
        skips = list(reversed(stage_dims))                              # level k's skip channels
        self.lateral = nn.ModuleList([nn.Conv3d(skips[k], w[k], 1) for k in range(LEVELS)])
        self.blocks = nn.ModuleList([conv_blocks(w[0], w[0], cfg.depth)]
                                    + [conv_blocks(w[k - 1] + w[k] + (s ** 3 if k == LEVELS - 1 else 0), w[k], cfg.depth)
                                       for k in range(1, LEVELS)])
        self.attn = nn.ModuleList([TokenCrossAttention(w[k], token_dim, cfg.heads) for k in range(cfg.attn_levels)]
                                  if cfg.text_informed else [])
        self.head = nn.Conv3d(w[-1], s ** 3, 1)

    def forward(self, stages: list[torch.Tensor], corrupted: torch.Tensor,
                tokens: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        skips = list(reversed(stages))
        x = None
        for k, skip in enumerate(skips):
            parts = [self.lateral[k](skip)]
            if k == LEVELS - 1:                                         # the stem: + the input itself
                parts.append(space_to_depth(corrupted, tuple(skip.shape[2:]), self.stride).to(parts[0].dtype))
            if x is not None:
                if x.shape[2:] != skip.shape[2:]:
                    x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
                parts.insert(0, x)
            x = self.blocks[k](torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
            if k < len(self.attn):
                if tokens is None or token_mask is None:
                    raise ValueError("restore.text_informed=true: the decoder needs the report's tokens and mask")
                x = self.attn[k](x, tokens, token_mask)
        return depth_to_space(self.head(x), tuple(corrupted.shape[2:]), self.stride)


def restore_through(encoder: nn.Module, decoder: RestoreDecoder, x: torch.Tensor, seeds: torch.Tensor, cfg,
                    tokens: torch.Tensor | None = None, token_mask: torch.Tensor | None = None):
    """x (N, 1, X, Y, Z) the clean model input, seeds (N,) -> (corrupted, corrupted-voxel mask,
    restored): corrupt, a second encoder pass on the corrupted input (``encoder(.., stages=True)``),
    decode. Call from a module's forward (ZeRO-3 gathers parameters in forward hooks)."""
    xc, mask = corrupt(x, seeds, cfg)
    *_, feats = encoder(xc, stages=True)
    return xc, mask, decoder(feats, xc, tokens, token_mask)


# ---------------------------------------------------------------------------------- the picture
def _hu_to_input(ct, window) -> torch.Tensor:
    """HU (X, Y, Z) or (1, X, Y, Z), numpy or torch -> (1, 1, X, Y, Z) float32 in [0, 1] (the model's
    unaugmented input: ``hu_to_unit``, as ``trainer.augment`` with identity parameters)."""
    from data_service.preprocess import hu_to_unit

    t = torch.as_tensor(ct).float()
    while t.ndim < 5:
        t = t.unsqueeze(0)
    return hu_to_unit(t, window)


@torch.no_grad()
def restoration_figure(model, tokenizer, cfg, ct, report: str, path: str | Path, seed: int = 0,
                       title: str = "") -> dict[str, float]:
    """One PNG at ``path``: the middle axial slice (last axis) of the study's model input, its
    corruption and its restoration side by side (with the corrupted voxels outlined in the middle
    panel). ``model``: a ``T3D`` built with ``restore.enabled=true`` (e.g. from
    ``trainer.engine.load_export``), ``tokenizer``/``cfg`` the export's; ``ct``: the study's HU
    volume (a shard sample's ``ct``, at ``data.size``); ``report``: its text; ``seed``: the
    corruption's seed (fixed, so every checkpoint restores the same corruption). Returns
    ``{"restore/error": the restore.loss on the corrupted voxels, "restore/corrupted_fraction"}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.model.text import tokenize_reports

    if getattr(model, "restorer", None) is None:
        raise ValueError("restoration_figure: the model has no restoration decoder (restore.enabled=false)")
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = _hu_to_input(ct, cfg.data.hu_window).to(p.device, p.dtype)
        enc = tokenize_reports(tokenizer, [report], cfg)
        xc, mask, pred = model.restore_study(x, enc["input_ids"].to(p.device), enc["attention_mask"].to(p.device),
                                             torch.tensor([seed], device=p.device))
    finally:
        model.train(was_training)
    from trainer.losses.restore import masked_error

    err = float(masked_error(pred, x, mask, model.rcfg.loss))
    z = x.shape[-1] // 2
    panels = [x[0, 0, :, :, z], xc[0, 0, :, :, z], pred[0, 0, :, :, z].clamp(0, 1)]
    m = mask[0, 0, :, :, z].float()
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6))
    for ax, img, name in zip(axes, panels, ["input", "corrupted", f"restored ({model.rcfg.loss} {err:.4f})"]):
        ax.imshow(img.float().cpu().numpy().T, cmap="gray", vmin=0, vmax=1, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if 0 < float(m.mean()) < 1:
        axes[1].contour(m.cpu().numpy().T, levels=[0.5], colors="red", linewidths=0.6, origin="lower")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"restore/error": err, "restore/corrupted_fraction": float(mask.float().mean())}
