"""Sentence <-> volume InfoNCE (``tma.w_sentence``, needs ``model.text_unit=sentence``).

A report is a list of statements, one finding each ("No pleural effusion.", "A 9 mm nodule ...").
The global CLIP term aligns the volume with their *mean*, which never asks whether one statement
fits the volume; zero-shot classification asks exactly that of a one-sentence prompt. This term
asks it in training, in both directions, with negatives from every rank:
  sentence -> volume  each sentence picks its own volume among the global batch's volumes;
  volume -> sentence  each volume scores every sentence of the global batch; its own sentences
                      are the positives (multi-positive: the mean of their log-probabilities).
The same statement in another study's report ("No consolidation.") is a negative for this volume;
in expectation that teaches p(volume | statement), which is what a prompt is scored on.

Negated sentences (``negs``, from ``data.augment.negated_sentences``): each of the volume's own
sentences with its polarity flipped ("No consolidation." -> "Consolidation."). A flipped statement
is false of *this* volume by construction, so it joins this volume's volume -> sentence softmax as a
negative (and no other volume's: for them it may be true). That is NegCLIP's hard-negative caption
(Yuksekgonul et al., ICLR 2023) at sentence level: the volume must prefer what its report says over
the same words with the opposite polarity, which is exactly the choice a zero-shot prompt pair poses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses.dist import gather_with_grad, ranks_agree, world


def sentence_loss(img: torch.Tensor, sents: torch.Tensor, smask: torch.Tensor, logit_scale: torch.Tensor,
                  negs: torch.Tensor | None = None, nmask: torch.Tensor | None = None) -> torch.Tensor:
    """img (b,E) and sents (b,S,E) L2-normalized, smask (b,S) True where a sentence is; optional
    ``negs`` (b,S',E) / ``nmask`` (b,S'): each volume's own false statements. Every rank needs the
    same b and S (the loader pads reports to ``data.max_sentences``)."""
    b, s, e = sents.shape
    if img.shape[0] != b or smask.shape != (b, s):
        raise ValueError(f"sentence_loss: img {tuple(img.shape)}, sentences {tuple(sents.shape)} and "
                         f"mask {tuple(smask.shape)} disagree")
    rank, ws = world()
    if not ranks_agree(b, s):
        raise ValueError(f"sentence_loss: every rank needs the same batch and sentence count, rank {rank} has {b} x {s}")
    flat, present = sents.reshape(b * s, e), smask.reshape(b * s).bool()
    owner = torch.arange(b, device=img.device).repeat_interleave(s) + rank * b
    all_img = gather_with_grad(img)                                         # (W*b, E)
    t2i = F.cross_entropy(logit_scale * flat[present].float() @ all_img.float().t(), owner[present])
    all_sent = gather_with_grad(flat)                                       # (W*b*S, E)
    all_present = gather_with_grad(present.float()) > 0
    all_owner = torch.arange(ws * b, device=img.device).repeat_interleave(s)
    logits = (logit_scale * img.float() @ all_sent.float().t()).masked_fill(~all_present[None], float("-inf"))
    if negs is not None:
        if nmask is None or negs.shape[0] != b or nmask.shape != negs.shape[:2]:
            raise ValueError(f"sentence_loss: negations {tuple(negs.shape)} / mask "
                             f"{None if nmask is None else tuple(nmask.shape)} do not fit batch {b}")
        own = (logit_scale * torch.einsum("be,bse->bs", img.float(), negs.float())).masked_fill(~nmask.bool(), float("-inf"))
        logits = torch.cat([logits, own], 1)                                # positives stay in the first block
    logp = logits.log_softmax(-1)[:, :all_sent.shape[0]]
    pos = (all_owner[None] == (torch.arange(b, device=img.device) + rank * b)[:, None]) & all_present[None]
    i2t = -(logp.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp_min(1))
    return 0.5 * (t2i + i2t.mean())
