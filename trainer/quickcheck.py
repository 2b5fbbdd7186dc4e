"""Scientific check: does TMA help small local findings? CLIP-only vs CLIP+TMA on phantoms.

    python -m trainer.quickcheck [--n 240] [--steps 600] [--seed 0] [--out runs/quickcheck]

Single process, CPU, debug flavour. Makes a phantom dataset (data_service.synth), ingests it,
trains both variants for the same steps/batches/seed, and prints zero-shot AUC per planted
label on the held-out valid+test splits ("{finding} is present." vs "... is not present.").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_service import ingest, synth
from data_service.shards import iter_split
from data_service.views import collate, prepare_sample, seed_for
from evaluators.tasks.zeroshot import per_label_auc, prompt_embeddings, zeroshot_probs
from trainer.config import FINDINGS, add_config_args, load_config
from trainer.losses import T3DLoss
from trainer.model import build_model
from trainer.model.text import build_tokenizer


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_variant(cfg, train, tokenizer, tma: bool, log_every: int = 50):
    torch.manual_seed(cfg.train.seed)
    cfg.tma.enabled = tma
    model = build_model(cfg, tokenizer.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = T3DLoss(cfg.tma)
    rng = np.random.default_rng(cfg.train.seed)      # same batches for both variants
    t0, logs = time.time(), {}
    for step in range(cfg.train.steps):
        idx = rng.choice(len(train), cfg.train.batch_size, replace=False)
        items = [prepare_sample(train[i], cfg.data, seed_for(cfg.train.seed, step, train[i]["key"])) for i in idx]
        b = collate(items, tokenizer, cfg.data.max_text_tokens)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio)
        out = model(b["image"], b["input_ids"], b["attention_mask"], b["views"] if tma else None)
        loss, logs = loss_fn(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if step % log_every == 0 or step == cfg.train.steps - 1:
            print(f"  [{'tma ' if tma else 'clip'}] step {step:4d} {json.dumps({k: round(v, 3) for k, v in logs.items()})} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def evaluate(model, tokenizer, held, cfg):
    prompts = prompt_embeddings(model, tokenizer)
    embs = []
    for i in range(0, len(held), 16):
        items = [prepare_sample(s, cfg.data, 0) for s in held[i:i + 16]]
        img, _ = model.encode_image(torch.stack([it["image"] for it in items]))
        embs.append(img)
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    probs = zeroshot_probs(torch.cat(embs), prompts, scale)
    labels = np.array([[s["meta"]["labels"][f] for f in FINDINGS] for s in held])
    return per_label_auc(probs, labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.quickcheck", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=240, help="phantom volumes (2/3 train, 1/3 held out)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/quickcheck")
    add_config_args(p)
    a = p.parse_args(argv)
    cfg = load_config(a.config or Path(__file__).resolve().parents[1] / "configs/debug.yaml",
                      a.overrides + [f"train.steps={a.steps}", f"train.seed={a.seed}"])
    out = Path(a.out)
    raw, shards = out / f"phantom_n{a.n}_s{a.seed}", out / f"shards_n{a.n}_s{a.seed}"
    if not (raw / "metadata").is_dir():
        synth.generate(raw, a.n, seed=a.seed, valid_fraction=1 / 3)
    ingest.run("ctrate", str(raw), str(shards), cfg.data, progress=False)
    train = list(iter_split(shards, "train"))
    held = list(iter_split(shards, "valid")) + list(iter_split(shards, "test"))
    tokenizer = build_tokenizer([s["report"] for s in train], cfg.model.vocab_size)
    print(f"quickcheck: {len(train)} train / {len(held)} held-out volumes, {a.steps} steps, "
          f"batch {cfg.train.batch_size}, seed {a.seed}", flush=True)
    results = {}
    for name, tma in (("clip", False), ("clip+tma", True)):
        model = train_variant(cfg, train, tokenizer, tma)
        results[name] = evaluate(model, tokenizer, held, cfg)
    planted = [f for f in FINDINGS if not math.isnan(results["clip"][f])]
    print(f"\nzero-shot AUC on {len(held)} held-out phantoms ({a.steps} steps, seed {a.seed}):")
    print(f"{'finding':32s} {'CLIP':>7s} {'CLIP+TMA':>9s}")
    for f in planted:
        print(f"{f:32s} {results['clip'][f]:7.3f} {results['clip+tma'][f]:9.3f}")
    for name in results:
        results[name]["mean_planted"] = float(np.mean([results[name][f] for f in planted]))
    print(f"{'mean (planted labels)':32s} {results['clip']['mean_planted']:7.3f} {results['clip+tma']['mean_planted']:9.3f}")
    (out / f"quickcheck_n{a.n}_s{a.seed}_steps{a.steps}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
