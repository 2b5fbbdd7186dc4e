"""3D ResNet image encoder (MONAI), exposing the pooled embedding and the last feature map."""
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


class ImageEncoder(nn.Module):
    """MONAI ``ResNet`` (ResNet-50 in the paper preset, a tiny basic-block net in ``debug``);
    ``forward`` returns (global (B, C), local (B, N, C), grid (d, h, w))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import ResNet

        self.net = ResNet(block=cfg.image_block, layers=list(cfg.image_layers),
                          block_inplanes=list(cfg.image_widths), spatial_dims=3, n_input_channels=1,
                          conv1_t_size=cfg.conv1_size, conv1_t_stride=cfg.conv1_stride, no_max_pool=cfg.no_max_pool,
                          feed_forward=False, norm=norm_layer(cfg.image_norm))
        expansion = 4 if cfg.image_block == "bottleneck" else 1
        self.out_dim = cfg.image_widths[-1] * expansion

    def forward(self, x: torch.Tensor):
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"image input must be (B, 1, D, H, W), got {tuple(x.shape)}")
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        grid = tuple(x.shape[2:])
        local = x.flatten(2).transpose(1, 2)          # (B, N, C)
        return local.mean(1), local, grid
