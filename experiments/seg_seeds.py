"""Segmentation, pretrained against random init, over fine-tuning seeds (issue #30 item 4):
evaluators.tasks.segmentation.finetune (with its encoder-lr multiplier or a frozen encoder) on 200
train and 80 test volumes, 3 seeds per variant. Investigation script, not a library path.

    python experiments/seg_seeds.py CHECKPOINT SHARDS base30,mult0.1,frozen,base100 [SEEDS, default 0,1,2]
"""
import copy
import json
import sys
import time

import numpy as np
import torch

from data_service.preprocess import to_model_input
from evaluators.tasks import features
from evaluators.tasks.segmentation import finetune
from trainer.export import load_export
from trainer.model.image import ImageEncoder

torch.set_num_threads(2)
ck, shards = sys.argv[1], sys.argv[2]
variants = sys.argv[3].split(",")
SEEDS = [int(x) for x in sys.argv[4].split(",")] if len(sys.argv) > 4 else [0, 1, 2]
model, tok, cfg, info = load_export(ck)
tr = features.load_volumes(shards, "train", masks=True)
te = features.load_volumes(shards, "test", masks=True)
n_tr = 200
te = {k: (v[:80] if k in ("hu", "y") else v) for k, v in te.items()}
tr = {k: (v[:n_tr] if k in ("hu", "y") else v) for k, v in tr.items()}
prep = lambda hu: to_model_input(hu, cfg.data)
ncls = len(cfg.eval.seg_classes)

def ft(enc, steps, seed, lr=1e-3, mult=1.0, freeze=False):
    d, loss = finetune(enc, tr["hu"], tr["y"], te["hu"], te["y"], ncls, steps, seed=seed, lr=lr, prep=prep,
                       encoder_lr_mult=mult, freeze_encoder=freeze)
    return float(np.nanmean(d)), [round(float(x), 3) for x in d], loss


def encoders(seed):
    torch.manual_seed(seed + 1)
    return {"pre": copy.deepcopy(model.image), "rand": ImageEncoder(cfg.model)}

# weight / activation scale, pretrained vs random
enc = encoders(0)
x = prep(te["hu"][:4])
for name, e in enc.items():
    n = e.net
    with torch.no_grad():
        h = n.act(n.bn1(n.conv1(e.windows(x))))
        stats = [float(h.abs().mean())]
        h = n.maxpool(h) if not n.no_max_pool else h
        for s in (n.layer1, n.layer2, n.layer3, n.layer4):
            h = s(h); stats.append(round(float(h.abs().mean()), 3))
    w = [round(float(p.norm()), 2) for k, p in e.net.named_parameters() if p.ndim == 5][:6]
    print(name, "act |mean| stem,l1..l4:", stats, "conv weight norms (first 6):", w, flush=True)

SPEC = {"base30": dict(steps=30), "base100": dict(steps=100), "mult0.1": dict(steps=30, mult=0.1),
        "mult0.1_100": dict(steps=100, mult=0.1), "lr3e-4": dict(steps=30, lr=3e-4), "frozen": dict(steps=30, freeze=True),
        "frozen100": dict(steps=100, freeze=True)}
out = {}
for v in variants:
    for seed in SEEDS:
        for name, e in encoders(seed).items():
            t = time.time()
            r = ft(e, seed=seed, **SPEC[v])
            out.setdefault(v, {}).setdefault(name, []).append(r)
            print(v, seed, name, "mean dice %.3f" % r[0], r[1], "loss %.3f" % r[2], "%.0fs" % (time.time() - t), flush=True)
    for name in ("pre", "rand"):
        print("==", v, name, "mean over seeds %.3f" % np.mean([r[0] for r in out[v][name]]), flush=True)
json.dump(out, open("seg_seeds.json", "w"))
