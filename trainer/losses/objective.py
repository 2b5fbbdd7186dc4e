"""The whole pretraining objective: the weighted sum of the terms the config switches on.

``T3DLoss(cfg.tma, cfg.restore)(out)`` -> (total, logs). ``logs`` holds 0-d tensors, detached and still on the
device: reading a value is a host sync, so the loop reads them all at once, stacked, every
``train.log_every`` steps (``trainer.step.scalars``), never on an ordinary micro-step.
"""
from __future__ import annotations

import torch

from trainer.config import RestoreConfig, TMAConfig
from trainer.losses.clip import clip_loss
from trainer.losses.restore import restore_loss
from trainer.losses.sentence import sentence_loss
from trainer.losses.tma import consistency_loss, local_alignment_loss


class T3DLoss:
    """Combines the terms from a model output dict; returns (total, {term: 0-d tensor})."""

    def __init__(self, cfg: TMAConfig, restore: RestoreConfig | None = None):
        self.cfg = cfg
        self.restore = restore if restore is not None else RestoreConfig()

    def __call__(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=out["img"].device)
        if c.w_clip > 0:
            terms["clip"] = clip_loss(out["img"], out["txt"], out["logit_scale"])
            total = total + c.w_clip * terms["clip"]
        if c.w_sentence > 0:
            if "sentences" not in out:
                raise ValueError("tma.w_sentence > 0 but the model gave no sentence embeddings (model.text_unit=sentence?)")
            terms["sentence"] = sentence_loss(out["img"], out["sentences"], out["sentence_mask"], out["logit_scale"],
                                             out.get("negations"), out.get("negation_mask"))
            total = total + c.w_sentence * terms["sentence"]
        if c.enabled and "view_regions" in out:
            vr, tok, tm = out["view_regions"], out["tokens"], out["token_mask"]
            if c.w_local > 0:
                terms["local"] = local_alignment_loss(vr, tok, tm, c)
                total = total + c.w_local * terms["local"]
            if c.w_consistency > 0 and "view_scores" in out:
                terms["consistency"], ent = consistency_loss(out["view_scores"], c)
                total = total + c.w_consistency * terms["consistency"]
                terms["proto_entropy"] = ent
        r = self.restore
        if r.enabled and "restore_image" in out:            # the model restores when given seeds (trainer.step)
            terms["restore"] = restore_loss(out, r.loss)
            total = total + r.weight * terms["restore"]
        logs = {k: v.detach().float() for k, v in terms.items()}
        logs["loss"] = total.detach().float()
        logs["temperature"] = (1.0 / out["logit_scale"].detach()).float()
        return total, logs
