"""Representation health: is each tower still telling studies apart?

On a fixed small batch of training studies (no augmentation, eval mode), every ``train.log_every``
steps: the mean pairwise cosine and the effective rank (Roy & Vetterli 2007: exp of the entropy of
the normalised singular values) of the image and of the report embeddings. A tower whose mean
pairwise cosine stays above ``train.collapse_cosine`` for ``train.collapse_patience`` logs in a row
is reported as collapsed (printed, and ``health/collapsed_{tower}`` = 1 in MLflow).
"""
from __future__ import annotations

import torch


def mean_pairwise_cosine(e: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows of (N, E)."""
    e = torch.nn.functional.normalize(e.float(), dim=-1)
    n = e.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings, got {n}")
    s = e @ e.t()
    return float((s.sum() - s.diagonal().sum()) / (n * n - n))


def effective_rank(e: torch.Tensor) -> float:
    """exp(entropy of the singular values / their sum) of the centred (N, E) matrix: 1 for
    embeddings on a line, up to min(N, E) for spread-out ones."""
    x = e.float() - e.float().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if float(s.sum()) <= 1e-12:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def health_metrics(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, float]:
    """Embeds the batch in eval mode (then restores the mode) -> ``health/*`` metrics."""
    was = model.training
    model.eval()
    try:
        img, _ = model.encode_image(image)
        txt, _, _ = model.encode_text(input_ids, attention_mask)
    finally:
        model.train(was)
    return {"health/image_cosine": mean_pairwise_cosine(img), "health/report_cosine": mean_pairwise_cosine(txt),
            "health/image_eff_rank": effective_rank(img), "health/report_eff_rank": effective_rank(txt)}


class CollapseMonitor:
    """Counts consecutive logs with a tower's mean pairwise cosine above ``threshold``."""

    TOWERS = ("image", "report")

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience = threshold, patience
        self.streak = {t: 0 for t in self.TOWERS}

    def update(self, metrics: dict[str, float], step: int) -> list[str]:
        """Adds ``health/collapsed_{tower}`` to ``metrics``; returns a warning per collapsed tower."""
        warnings = []
        for t in self.TOWERS:
            cos = metrics[f"health/{t}_cosine"]
            self.streak[t] = self.streak[t] + 1 if cos > self.threshold else 0
            collapsed = self.streak[t] >= self.patience
            metrics[f"health/collapsed_{t}"] = float(collapsed)
            if collapsed:
                warnings.append(f"WARNING: the {t} tower has collapsed: mean pairwise cosine {cos:.4f} > "
                                f"train.collapse_cosine={self.threshold} for {self.streak[t]} logs in a row "
                                f"(step {step}); its embeddings no longer tell studies apart")
        return warnings
