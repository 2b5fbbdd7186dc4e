"""Segmentation fine-tuning: the pretrained 3D ResNet under a UNet-style decoder.

The encoder's stem and four stages give the skips; the decoder upsamples (trilinear) to each
skip's size, concatenates, and applies MONAI's ``UnetBasicBlock``; a last block sees the input
volume itself, and MONAI's ``UnetOutBlock`` gives one logit per class + background. Trilinear
resizing instead of transposed convolutions keeps odd feature sizes aligned at any input shape.

``finetune`` trains the whole network (DiceCE loss) for a fixed number of steps and returns the
Dice per class on held-out volumes (MONAI ``DiceMetric``). The evaluator runs it twice, from the
pretrained encoder and from a random one, with the same decoder initialisation, batches and steps.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ResNetUNet(nn.Module):
    def __init__(self, encoder: nn.Module, n_classes: int, spatial_dims: int = 3):
        """``encoder``: a ``trainer.model.image.ImageEncoder`` (its MONAI ResNet is used in place)."""
        super().__init__()
        from monai.networks.blocks import UnetBasicBlock, UnetOutBlock

        self.net = encoder.net
        self.windows = encoder.windows                     # model.input_windows channels, as pretrained
        n = self.net
        stages = [n.layer1, n.layer2, n.layer3, n.layer4]
        widths = [_channels(n.bn1)] + [_out_channels(s) for s in stages]       # stem, layer1..4
        self.up = nn.ModuleList()
        deep = widths[-1]
        for skip in reversed(widths[:-1]):                                        # layer3, 2, 1, stem
            self.up.append(UnetBasicBlock(spatial_dims, deep + skip, skip, 3, 1, "instance"))
            deep = skip
        self.full = UnetBasicBlock(spatial_dims, deep + 1, max(8, deep // 2), 3, 1, "instance")
        self.head = UnetOutBlock(spatial_dims, max(8, deep // 2), n_classes + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        s0 = n.act(n.bn1(n.conv1(self.windows(x))))
        h = s0 if n.no_max_pool else n.maxpool(s0)
        skips = [s0]
        for stage in (n.layer1, n.layer2, n.layer3):
            h = stage(h)
            skips.append(h)
        h = n.layer4(h)
        for block, skip in zip(self.up, reversed(skips)):
            h = block(torch.cat([F.interpolate(h, size=skip.shape[2:], mode="trilinear"), skip], 1))
        h = self.full(torch.cat([F.interpolate(h, size=x.shape[2:], mode="trilinear"), x], 1))
        return self.head(h)


_NORMS = (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)


def _channels(norm: nn.Module) -> int:
    return norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features


def _out_channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: its last norm layer (block output or downsample) sees them."""
    return _channels([m for m in stage.modules() if isinstance(m, _NORMS)][-1])


def check_masks(masks: Sequence[torch.Tensor], keys: Sequence[str], n_classes: int) -> None:
    for m, k in zip(masks, keys):
        hi = int(m.max())
        if hi > n_classes:
            raise ValueError(f"sample {k!r}: mask value {hi} > number of eval.seg_classes ({n_classes}); "
                             "list every class in eval.seg_classes (mask value i = class i)")


def finetune(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, n_classes: int, steps: int, seed: int = 0, lr: float = 1e-3,
             batch: int = 2, roi: Sequence[int] = (), prep: Callable[[torch.Tensor], torch.Tensor] | None = None,
             device: str | torch.device = "cpu", encoder_lr_mult: float = 1.0,
             freeze_encoder: bool = False) -> tuple[np.ndarray, float]:
    """x (N,1,D,H,W), y (N,1,D,H,W) integer labels, kept on the CPU; ``prep`` turns a batch of x
    into network input (e.g. int16 HU -> normalized float) on ``device``. Returns (Dice per class
    on test, NaN where the class is absent from every test mask; mean loss of the last 5 steps).
    ``roi``: train on random crops of this size and infer with a sliding window ([]: whole volumes).
    ``encoder_lr_mult`` scales the encoder's lr; ``freeze_encoder`` trains the decoder alone."""
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError(f"segmentation needs train and test volumes with masks, got {len(train_x)} and {len(test_x)}")
    prep = prep or (lambda t: t.float())
    torch.manual_seed(seed)                                      # same decoder init for every encoder
    model = ResNetUNet(encoder, n_classes).to(device)
    g = torch.Generator().manual_seed(seed)
    enc = list(model.net.parameters())
    ids = {id(p) for p in enc}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr}]
    if freeze_encoder:
        for p in enc:
            p.requires_grad_(False)
    else:
        groups.append({"params": enc, "lr": lr * encoder_lr_mult})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(train_x), generator=g)[:batch]
        x, y = train_x[idx], train_y[idx]
        if roi:
            x, y = _random_crop(x, y, roi, g)
        x, y = prep(x.to(device)), y.to(device).long()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(len(test_x)):
            x = prep(test_x[i:i + 1].to(device))
            logits = sliding_window_inference(x, list(roi), 1, model) if roi else model(x)
            preds.append(logits.argmax(1)[0].cpu())
    dice = dice_per_class(preds, [y[0].long() for y in test_y], n_classes)
    return dice, float(np.mean(losses[-5:])) if losses else float("nan")


def dice_per_class(preds: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], n_classes: int) -> np.ndarray:
    """Label maps (D,H,W) -> Dice per foreground class over the volumes (MONAI ``DiceMetric``,
    mean over the volumes where the class is in the reference; NaN where it never is)."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
    for p, r in zip(preds, refs):
        if p.shape != r.shape:
            raise ValueError(f"prediction {tuple(p.shape)} and reference {tuple(r.shape)} differ")
        oh = [F.one_hot(t.long(), n_classes + 1).movedim(-1, 0)[None] for t in (p, r)]
        metric(oh[0], oh[1])
    dice, counted = metric.aggregate()
    out = dice.numpy().astype(float)
    out[counted.numpy() == 0] = np.nan          # MONAI reports 0 for a class no volume has
    return out


def _random_crop(x: torch.Tensor, y: torch.Tensor, roi: Sequence[int], g: torch.Generator):
    size = [min(r, s) for r, s in zip(roi, x.shape[2:])]
    starts = [int(torch.randint(0, s - r + 1, (1,), generator=g)) for r, s in zip(size, x.shape[2:])]
    sl = (slice(None), slice(None)) + tuple(slice(a, a + r) for a, r in zip(starts, size))
    return x[sl], y[sl]
