"""Can each loss term learn from this data on its own? A diagnostic for the TMA terms.

    python -m benchmarks.term_signal [--config configs/phantom.yaml] [--steps 600] \
        [--terms clip,view_clip,local] [--set k=v ...]

Each term is trained alone (every other weight 0), from the same initialisation and on the same
batches, single process, with the real model, loss code and loader transform (``DecodeCrop``) and
plain AdamW at ``train.lr`` with ``train.warmup_steps``. Its loss is printed every 50 steps beside
log(B), the value of an InfoNCE term that has learnt nothing. Terms:
  clip       the global volume <-> report term (``tma.w_clip``): the reference that does learn;
  view_clip  the same InfoNCE between each *view's* pooled embedding and its report: does a view,
             as ``data.views`` crops it, carry its report at all? If not, no view <-> text term can
             learn, whatever its form;
  local      TMA's token-region term (``tma.w_local``).
Why: TMA's token-region term sat at its chance value (log 16) through every science run, and no
loss weight moved it. This tells a term that cannot learn from one that learns slowly, in minutes
instead of a 13-minute run: with views of 0.4-0.6 of each edge neither ``local`` nor ``view_clip``
left chance in 600 steps (benchmarks/RESULTS.md). Not a training path: no Ray, no DeepSpeed.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TERMS = ("clip", "view_clip", "local")


def term_loss(name: str, out: dict, cfg):
    """The loss of one term on a model output (``T3D.forward``)."""
    import torch

    from trainer.losses.clip import clip_loss
    from trainer.losses.tma import local_alignment_loss

    if name == "clip":
        return clip_loss(out["img"], out["txt"], out["logit_scale"])
    if name == "view_clip":
        vg = out["view_global"]
        return torch.stack([clip_loss(vg[:, v], out["txt"], out["logit_scale"]) for v in range(vg.shape[1])]).mean()
    if name == "local":
        return local_alignment_loss(out["view_regions"], out["tokens"], out["token_mask"], cfg.tma)
    raise ValueError(f"--terms: {name!r} is not one of {list(TERMS)}")


def run_term(name: str, cfg, tok_dir: str, steps: int, batch: int, every: int) -> list[tuple[int, float]]:
    import torch

    from benchmarks.supervised_ceiling import adamw_warmup
    from common.text import load_tokenizer
    from data_service.stream import DecodeCrop, Plan, build_index, loader_batch
    from trainer.model import build_model
    from trainer.step import Batch, model_inputs

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, len(load_tokenizer(tok_dir)))
    opt, sched = adamw_warmup(model.parameters(), cfg)
    index = build_index(cfg.data.shards, "train")
    decode = DecodeCrop(cfg.data, tok_dir, seed=cfg.train.seed, text_unit=cfg.model.text_unit)
    views = name != "clip"
    window, curve = [], []
    for step, (pos, keys) in enumerate(Plan(sorted(index), batch, cfg.train.seed).steps(1, 0, steps)):
        mb = Batch.from_numpy(decode(loader_batch(index, [(step, k, pos) for k in keys])), "cpu", views=views)
        image, v = model_inputs(mb, cfg.data, torch.float32, "torch")
        loss = term_loss(name, model(image, mb.input_ids, mb.attention_mask, v), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if (step + 1) % every == 0:
            curve.append((step + 1, float(np.mean(window))))
            window = []
    return curve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.term_signal", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/phantom.yaml")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16, help="one process's batch: the science run's global batch")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--terms", default=",".join(TERMS))
    a = p.parse_args(argv)
    from common.config import load_config
    from trainer.pretrain import prepare_tokenizer

    cfg = load_config(a.config, a.set)
    names = [t.strip() for t in a.terms.split(",") if t.strip()]
    if bad := [t for t in names if t not in TERMS]:
        raise SystemExit(f"--terms: {bad} not among {list(TERMS)}")
    chance = math.log(a.batch)
    print(f"term_signal: {a.config} {' '.join(a.set)}; batch {a.batch}, chance log(B) = {chance:.3f}; "
          f"views {cfg.data.views.n} x {cfg.data.views.size} at scale {cfg.data.views.scale} of each edge")
    with tempfile.TemporaryDirectory() as tmp:
        tok = prepare_tokenizer(cfg, Path(tmp))           # the text encoder's own, or WordPiece as a run makes it
        for name in names:
            t0 = time.time()
            curve = run_term(name, cfg, tok, a.steps, a.batch, a.every)
            print(f"{name:10s} " + "  ".join(f"{s}: {v:.3f}" for s, v in curve) +
                  f"  | last/chance {curve[-1][1] / chance:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
