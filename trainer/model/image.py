"""3D ResNet image encoder (MONAI), exposing the pooled embedding, the last feature map and (on
request) every stage's feature map."""
from __future__ import annotations

import torch
from torch import nn

from trainer.config import ModelConfig


def norm_layer(kind: str):
    """MONAI norm spec for ``model.image_norm``. BatchNorm couples the samples of a small per-rank
    batch and differs between train and eval; GroupNorm/InstanceNorm are per sample."""
    if kind == "batch":
        return "batch"
    if kind == "group":
        return ("group", {"num_groups": 8})
    if kind == "instance":
        return ("instance", {"affine": True})
    raise ValueError(f"model.image_norm: {kind!r} is not one of ['batch', 'group', 'instance']")


def pool_regions(local: torch.Tensor, kind: str, p: float = 3.0) -> torch.Tensor:
    """(B, N, C) region features (after ReLU, so >= 0) -> (B, C) (``model.image_pool``): ``mean``
    (the paper's global average pool), ``max``, or ``gem``, the generalised mean (mean of x^p)^(1/p)
    with p = 3, between the two: a finding that lights up a few of the N regions (a nodule, a
    calcified plaque) is not averaged away over the whole chest."""
    if kind == "mean":
        return local.mean(1)
    if kind == "max":
        return local.amax(1)
    if kind == "gem":
        return local.float().clamp_min(1e-6).pow(p).mean(1).pow(1.0 / p).to(local.dtype)
    raise ValueError(f"model.image_pool: {kind!r} is not one of ['mean', 'max', 'gem']")


class MixedBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm whose running statistics may stay float32 while its input and affine parameters are
    bf16 (DeepSpeed's bf16 casts parameters, not buffers): normalises in the kernels' mixed mode
    (reduced-precision input, float32 statistics and affine), as autocast would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rm = self.running_mean          # present only with track_running_stats (then so is num_batches_tracked)
        if rm is None or self.weight is None or self.weight.dtype == rm.dtype:
            return super().forward(x)
        import torch.nn.functional as F

        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, rm, self.running_var, self.weight.to(rm.dtype), self.bias.to(rm.dtype),
                            self.training, momentum, self.eps)


class InputWindows(nn.Module):
    """(B, 1, ...) input in [0, 1] over HU ``input_range`` -> (B, 1 + K, ...): the input plus one
    channel per HU window of ``model.input_windows``, each clipped to [0, 1] (radiology's lung,
    soft-tissue and bone windows). Exact re-windowing: the input is linear in HU inside its range.
    No parameters; the first convolution sees the windows a radiologist would look through."""

    def __init__(self, windows, input_range):
        super().__init__()
        lo, hi = input_range
        w = torch.tensor([[(a - lo) / (hi - lo), (b - lo) / (hi - lo)] for a, b in windows], dtype=torch.float32)
        self.register_buffer("bounds", w.reshape(-1, 2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.bounds):
            return x
        shape = (1, -1) + (1,) * (x.ndim - 2)
        a, b = self.bounds[:, 0].view(shape).to(x.dtype), self.bounds[:, 1].view(shape).to(x.dtype)
        return torch.cat([x, ((x - a) / (b - a)).clamp(0.0, 1.0)], dim=1)


class ImageEncoder(nn.Module):
    """MONAI ``ResNet`` (ResNet-50 in the paper preset, a tiny basic-block net in ``debug``);
    ``forward`` returns (global (B, C), local (B, N, C), grid (d, h, w))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import ResNet

        self.net = ResNet(block=cfg.image_block, layers=list(cfg.image_layers),
                          block_inplanes=list(cfg.image_widths), spatial_dims=3, n_input_channels=1 + len(cfg.input_windows),
                          conv1_t_size=cfg.conv1_size, conv1_t_stride=cfg.conv1_stride, no_max_pool=cfg.no_max_pool,
                          feed_forward=False, norm=norm_layer(cfg.image_norm))
        for m in self.net.modules():
            if type(m) is nn.BatchNorm3d:
                m.__class__ = MixedBatchNorm3d        # same state; see MixedBatchNorm3d
        self.windows = InputWindows(cfg.input_windows, cfg.input_range)
        self.pool = cfg.image_pool
        expansion = 4 if cfg.image_block == "bottleneck" else 1
        self.out_dim = cfg.image_widths[-1] * expansion
        self.stage_dims = [cfg.image_widths[0]] + [w * expansion for w in cfg.image_widths]   # stem, layer1..4

    def forward(self, x: torch.Tensor, stages: bool = False):
        """``stages``: also return the per-stage feature maps, finest first: the stem (after its
        activation, before the max pool), then layer1 ... layer4 (each (B, C_k, d_k, h_k, w_k); the
        last is the map the regions come from). The restoration decoder's skips use them."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"image input must be (B, 1, D, H, W), got {tuple(x.shape)}")
        n = self.net
        x = n.act(n.bn1(n.conv1(self.windows(x))))
        feats = [x]
        if not n.no_max_pool:
            x = n.maxpool(x)
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            feats.append(x)
        grid = tuple(x.shape[2:])
        local = x.flatten(2).transpose(1, 2)          # (B, N, C)
        if stages:
            return pool_regions(local, self.pool), local, grid, feats
        return pool_regions(local, self.pool), local, grid
