"""What the image encoder can learn of each planted finding *with* labels: a supervised ceiling for
`make science`.

    python -m benchmarks.supervised_ceiling [--config configs/phantom.yaml] [--steps 500] [--set k=v ...]
    python -m benchmarks.supervised_ceiling --visibility     # are the small findings in the volumes?
    python -m benchmarks.supervised_ceiling --labels "Arterial wall calcification" --net conv  # one layer
    python -m benchmarks.supervised_ceiling --restore [--restore-text]   # restoration alone, then a linear probe

The same encoder, grid and optimiser settings as the science preset (``model``, ``data``,
``train.lr``), trained from scratch on the train split's labels (binary cross-entropy on the 8
planted findings, or ``--labels``, with a linear head on the pooled features), then the test split's
AUC per finding. If a finding stays at chance here, no contrastive objective can be blamed for it:
with this data and a study-level signal the encoder does not learn it (``--visibility`` says whether
it is in the volumes at all, ``--net conv`` whether the simplest detector finds it; the AUC on
training studies printed last tells memorisation from learning, and ``--augment`` takes the
memorising away). If it is learned here but not by pretraining, the objective is what loses it.

``--restore`` / ``--restore-text``: what restoration alone gives, without labels and without any
contrastive loss. The encoder (with the ``restore`` section's decoder, ``restore.enabled=true``) is
pretrained on the train split by the restoration term only (``trainer.losses.restore.masked_error``
on the corrupted voxels of the whole volume, the corruption ``trainer.model.corrupt`` with a fresh
seed per sample and step; ``--restore``: image only, ``restore.text_informed=false``;
``--restore-text``: the decoder cross-attends to the report's tokens, the text tower training with
it). Then it is frozen and probed linearly: per finding a logistic regression on its standardised
pooled features, train -> test (``evaluators.tasks.probe.linear_probe_auc``), beside the same probe
on the same encoder at its random init (what restoration added). ``restore.*`` keys come from the
config and ``--set`` (e.g. the science variants' ``restore.block_size=[4,4,2] restore.width=32``).
Single process, CPU or GPU; no Ray, no DeepSpeed (a diagnostic, not a training path).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from data_service.synth import PLANTED


def load(shards: str, split: str, reports: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(HU volumes, planted labels) of ``split``; the reports are appended to ``reports`` when given."""
    from data_service.shards import iter_split

    xs, ys = [], []
    for s in iter_split(shards, split):
        xs.append(s["ct"])
        ys.append([float(s["meta"]["labels"][f]) for f in PLANTED])
        if reports is not None:
            reports.append(s["report"])
    if not xs:
        raise SystemExit(f"{shards}: split {split!r} is empty")
    return np.stack(xs), np.array(ys, dtype=np.float32)


def visibility(shards: str, split: str) -> None:
    """Are the two small findings in the ingested volumes at all? Hand-made features from the
    shard's organ mask (1 lung, 3 aorta, 4 bone), scored by AUC on ``split``: the highest HU within
    2 voxels of the aorta (calcification), and soft-tissue voxels (> -400 HU) in the eroded lung
    (nodule; effusion and consolidation also put soft tissue there, so also without them)."""
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    from data_service.shards import iter_split

    f, y = [], []
    for s in iter_split(shards, split):
        ct, m, lab = s["ct"], s.get("mask"), s["meta"]["labels"]
        if m is None:
            raise SystemExit(f"{shards}: sample {s['key']} has no organ mask")
        near = ndimage.binary_dilation(m == 3, iterations=2)
        f.append((int(((ct > -400) & ndimage.binary_erosion(m == 1)).sum()), float(ct[near].max()) if near.any() else 0.0))
        y.append((lab["Lung nodule"], lab["Arterial wall calcification"], lab["Pleural effusion"], lab["Consolidation"]))
    f, y = np.array(f, dtype=float), np.array(y)
    clean = (y[:, 2] == 0) & (y[:, 3] == 0)
    print(f"visibility on {split} ({len(y)} studies):")
    print(f"  calcification: max HU within 2 voxels of the aorta      AUC {roc_auc_score(y[:, 1], f[:, 1]):.3f}")
    print(f"  nodule: soft-tissue voxels in the eroded lung           AUC {roc_auc_score(y[:, 0], f[:, 0]):.3f}")
    print(f"  nodule, {int(clean.sum())} studies without effusion/consolidation AUC "
          f"{roc_auc_score(y[clean, 0], f[clean, 0]):.3f} (median voxels {np.median(f[clean & (y[:, 0] == 1), 0]):.0f} "
          f"in positives, {np.median(f[clean & (y[:, 0] == 0), 0]):.0f} in negatives)")


def one_conv(stride: int, pool: str):
    """The simplest lesion detector (``--net conv``): one 3x3x3 convolution (8 channels), ReLU,
    global max or mean; returns (pooled, None, None) like ``ImageEncoder``."""
    import torch

    class OneConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out_dim = torch.nn.Conv3d(1, 8, 3, stride=stride, padding=1), 8

        def forward(self, x):
            h = torch.relu(self.conv(x)).flatten(2)
            return (h.amax(2) if pool == "max" else h.mean(2)), None, None

    return OneConv()


def adamw_warmup(params, cfg):
    """Plain AdamW at ``train.lr`` with a linear warmup over ``train.warmup_steps`` and no decay: the
    optimiser of the single-process diagnostics (this one and ``benchmarks.term_signal``)."""
    import torch

    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warm = max(1, cfg.train.warmup_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))


def train_steps(loss_of, opt, sched, steps: int, draw, label: str, t0: float):
    """``steps`` optimiser steps on ``loss_of(draw())`` (a batch of train indices), a line every 100;
    returns the last loss."""
    import torch

    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = loss_of(draw())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps} {label} {loss.item():.5f} ({time.time() - t0:.0f} s)", flush=True)
    return loss


def restore_probe(a, cfg, names: list[str], cols: list[int], dev: str) -> int:
    """``--restore`` / ``--restore-text`` (module doc): restoration-only pretraining, then a linear
    probe of the frozen encoder, beside the probe of its random init."""
    import copy

    import torch

    from common.text import build_tokenizer
    from data_service.preprocess import to_model_input
    from evaluators.tasks.probe import linear_probe_auc
    from trainer.losses.restore import masked_error
    from trainer.model import build_model
    from trainer.model.restore import restore_through
    from trainer.model.text import tokenize_reports

    text = a.restore_text
    rtr: list[str] = []
    xtr, ytr = load(cfg.data.shards, "train", rtr)
    xte, yte = load(cfg.data.shards, a.test_split)
    ytr, yte = ytr[:, cols], yte[:, cols]
    tok = build_tokenizer(rtr, cfg.model.vocab_size or 1000) if text else None
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, len(tok) if tok is not None else None).to(dev)
    init = copy.deepcopy(model.image).eval()
    # text-informed: the text tower and its token head train through the cross-attention too
    # (AdamW skips the parameters no gradient reaches)
    params = list(model.parameters()) if text else [*model.image.parameters(), *model.restorer.parameters()]
    opt, sched = adamw_warmup(params, cfg)
    rng = np.random.default_rng(cfg.train.seed)

    def inputs(x: np.ndarray) -> torch.Tensor:
        return to_model_input(torch.from_numpy(x).to(dev), cfg.data)[:, None]

    @torch.no_grad()
    def features(enc, x: np.ndarray) -> np.ndarray:
        return np.concatenate([enc(inputs(x[i:i + 32]))[0].float().cpu().numpy() for i in range(0, len(x), 32)])

    t0 = time.time()
    model.train()
    def restore_loss(idx: np.ndarray) -> torch.Tensor:
        x = inputs(xtr[idx])
        seeds = torch.from_numpy(rng.integers(0, 2 ** 31, len(idx))).to(dev)
        if text:
            enc = tokenize_reports(tok, [rtr[i] for i in idx], cfg)
            _, mask, pred = model.restore_study(x, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), seeds)
        else:
            _, mask, pred = restore_through(model.image, model.restorer, x, seeds, cfg.restore)
        return masked_error(pred, x, mask, cfg.restore.loss)

    loss = train_steps(restore_loss, opt, sched, a.steps,
                       lambda: rng.choice(len(xtr), min(a.batch, len(xtr)), replace=False), "restore loss", t0)
    model.image.eval()

    def probe(enc) -> dict[str, float]:
        ftr, fte = features(enc, xtr), features(enc, xte)
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
        return linear_probe_auc((ftr - mu) / sd, ytr, (fte - mu) / sd, yte, findings=names)

    got, base = probe(model.image), probe(init)
    r = cfg.restore
    what = "text-informed (the decoder reads the report)" if text else "image only"
    print(f"\nrestoration only, {what}, then a frozen linear probe: {a.config} {' '.join(a.set)}; "
          f"{len(xtr)} train / {len(xte)} {a.test_split} studies, {a.steps} steps of {a.batch}, "
          f"{time.time() - t0:.0f} s; blocks {r.block_size} voxels, mask ratio {r.mask_ratio}, noise {r.noise_std}, "
          f"downsample {r.downsample}, width {r.width}; last restore loss ({r.loss}) {loss.item():.5f}")
    for k, f in enumerate(names):
        print(f"{f:30s} AUC {got.get(f, float('nan')):.3f}  (positives {int(yte[:, k].sum())}/{len(yte)}; "
              f"random init {base.get(f, float('nan')):.3f})")
    mean = lambda d: float(np.mean(list(d.values()))) if d else float("nan")  # noqa: E731
    print(f"{f'mean ({len(names)} probed)':30s} AUC {mean(got):.3f}  (random init {mean(base):.3f})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.supervised_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/phantom.yaml")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--test-split", default="test")
    p.add_argument("--labels", default=",".join(PLANTED), help="comma-separated findings to train on (default all 8)")
    p.add_argument("--net", choices=["encoder", "conv"], default="encoder",
                   help="encoder: the preset's image encoder; conv: one 3x3x3 conv layer (8 channels), ReLU, "
                        "global pooling, a linear head: can the lesion be found by the simplest detector?")
    p.add_argument("--conv-stride", type=int, default=1, help="--net conv: the conv's stride")
    p.add_argument("--conv-pool", choices=["max", "mean"], default="max", help="--net conv: global pooling")
    p.add_argument("--augment", action="store_true",
                   help="random flips (each axis, p = 0.5) and a random circular shift of up to --shift voxels per "
                        "axis on every training batch: can the encoder still memorise the studies?")
    p.add_argument("--shift", type=int, default=8, help="--augment: the largest shift, voxels")
    p.add_argument("--visibility", action="store_true", help="only the hand-made visibility check, no training")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--restore", action="store_true",
                      help="no labels: pretrain the encoder by restoration alone (image only, "
                           "restore.text_informed=false), freeze it, probe it linearly (and its random init)")
    mode.add_argument("--restore-text", action="store_true",
                      help="as --restore, with text-informed restoration (the decoder cross-attends to the report)")
    a = p.parse_args(argv)
    import torch
    from sklearn.metrics import roc_auc_score

    from common.config import load_config
    from data_service.preprocess import to_model_input
    from evaluators.tasks.zeroshot import two_classes
    from trainer.model.image import ImageEncoder

    restoring = a.restore or a.restore_text
    if restoring and a.net != "encoder":
        raise SystemExit("--restore/--restore-text pretrain the preset's encoder: --net conv does not apply")
    mode = ["restore.enabled=true", f"restore.text_informed={'true' if a.restore_text else 'false'}"]
    cfg = load_config(a.config, [*a.set, *mode] if restoring else a.set)
    if a.visibility:
        visibility(cfg.data.shards, a.test_split)
        return 0
    torch.manual_seed(cfg.train.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    names = [f.strip() for f in a.labels.split(",") if f.strip()]
    if bad := [f for f in names if f not in PLANTED]:
        raise SystemExit(f"--labels: {bad} not among the planted findings {list(PLANTED)}")
    cols = [PLANTED.index(f) for f in names]
    if restoring:
        return restore_probe(a, cfg, names, cols, dev)
    xtr, ytr = load(cfg.data.shards, "train")
    xte, yte = load(cfg.data.shards, a.test_split)
    ytr, yte = ytr[:, cols], yte[:, cols]
    enc = (ImageEncoder(cfg.model) if a.net == "encoder" else one_conv(a.conv_stride, a.conv_pool)).to(dev)
    head = torch.nn.Linear(enc.out_dim, len(names)).to(dev)
    params = [*enc.parameters(), *head.parameters()]
    opt, sched = adamw_warmup(params, cfg)
    rng = np.random.default_rng(cfg.train.seed)

    def inputs(x: np.ndarray) -> torch.Tensor:
        return to_model_input(torch.from_numpy(x).to(dev), cfg.data)[:, None]

    def augmented(x: np.ndarray) -> torch.Tensor:
        t = inputs(x)
        if not a.augment:
            return t
        t = t.flip([ax for ax in (2, 3, 4) if rng.random() < 0.5])
        return torch.roll(t, [int(v) for v in rng.integers(-a.shift, a.shift + 1, 3)], (2, 3, 4))

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        enc.eval()
        out = np.concatenate([torch.sigmoid(head(enc(inputs(x[i:i + 32]))[0])).cpu().numpy()
                              for i in range(0, len(x), 32)])
        enc.train()
        return out

    t0 = time.time()
    enc.train()
    def bce(idx: np.ndarray) -> torch.Tensor:
        logits = head(enc(augmented(xtr[idx]))[0])
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(ytr[idx]).to(dev))

    train_steps(bce, opt, sched, a.steps, lambda: rng.choice(len(xtr), a.batch, replace=False), "loss", t0)
    probs, fit = predict(xte), predict(xtr[:200])
    net = "" if a.net == "encoder" else f"one conv (stride {a.conv_stride}, {a.conv_pool} pool); "
    aug = f"flips + shifts up to {a.shift} voxels; " if a.augment else ""
    print(f"\nsupervised ceiling: {a.config} {' '.join(a.set)}; {net}{aug}{len(xtr)} train / {len(xte)} {a.test_split} "
          f"studies, {a.steps} steps of {a.batch}, {time.time() - t0:.0f} s")
    aucs = {}
    for k, f in enumerate(names):
        aucs[f] = float(roc_auc_score(yte[:, k], probs[:, k])) if two_classes(yte[:, k]) else float("nan")
        print(f"{f:30s} AUC {aucs[f]:.3f}  (positives {int(yte[:, k].sum())}/{len(yte)})")
    print(f"{f'mean ({len(names)} trained)':30s} AUC {np.nanmean(list(aucs.values())):.3f}")
    # held-out chance with training AUC near 1 is memorisation, not a lesion found
    yfit = ytr[:200]
    print(f"the same, on the first {len(yfit)} training studies (memorisation check): " + ", ".join(
        f"{f} {roc_auc_score(yfit[:, k], fit[:, k]):.3f}" if two_classes(yfit[:, k]) else f"{f} nan"
        for k, f in enumerate(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
