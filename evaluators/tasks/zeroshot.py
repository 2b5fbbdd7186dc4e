"""Zero-shot abnormality classification (CT-RATE protocol).

For each label, prompts "{finding} is present." / "{finding} is not present."; the softmax over
the two image-text similarities (scaled by the model's temperature) is P(present).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from trainer.config import FINDINGS

PROMPTS = ("{} is present.", "{} is not present.")


@torch.no_grad()
def prompt_embeddings(model, tokenizer, findings: Sequence[str] = FINDINGS, max_tokens: int = 32) -> torch.Tensor:
    """-> (F, 2, E) normalized text embeddings of the positive/negative prompts."""
    texts = [p.format(f) for f in findings for p in PROMPTS]
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    txt, _, _ = model.encode_text(enc["input_ids"], enc["attention_mask"])
    return txt.view(len(findings), 2, -1)


@torch.no_grad()
def zeroshot_probs(img_emb: torch.Tensor, prompts: torch.Tensor, logit_scale: float) -> np.ndarray:
    """img_emb (N,E), prompts (F,2,E) -> P(present) (N,F)."""
    logits = logit_scale * torch.einsum("ne,fpe->nfp", img_emb.float(), prompts.float())
    return logits.softmax(-1)[..., 0].cpu().numpy()


def per_label_auc(probs: np.ndarray, labels: np.ndarray, findings: Sequence[str] = FINDINGS) -> dict[str, float]:
    """AUC per label; labels with only one class present get NaN (AUC undefined)."""
    from sklearn.metrics import roc_auc_score

    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ")
    out = {}
    for k, f in enumerate(findings):
        y = labels[:, k]
        out[f] = float(roc_auc_score(y, probs[:, k])) if 0 < y.sum() < len(y) else float("nan")
    return out
