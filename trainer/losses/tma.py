"""Text-informed Multi-view Alignment (TMA). Design and rationale: docs/design.md.

The whole objective, which combines these terms, is ``trainer.losses.objective.T3DLoss``.
Switchable terms (weights in ``tma``):
  clip         global volume <-> report InfoNCE (losses/clip.py)
  sentence     each report sentence <-> the volume (losses/sentence.py; not part of TMA: applies
               with tma.enabled=false too, like clip)
  local        view <-> report: each report token attends over a view's regions; the similarity
               of (view i, report j) is the masked mean (or LSE) over j's tokens of cos(token,
               attended context). InfoNCE over these similarities, negatives from all ranks.
  consistency  the text-informed pooled feature of each view (its own report's tokens attending
               over its regions) is assigned to learnable prototypes; the Sinkhorn-balanced
               assignment of one view is the target for the softmax prediction of every other
               view of the same volume (SwAV swapped prediction). Sinkhorn's equipartition
               across the global batch is the collapse guard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import TMAConfig
from trainer.losses.clip import contrastive_from_logits
from trainer.losses.dist import all_reduce_min, all_reduce_sum, gather_with_grad


def token_region_similarity(regions: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                            attn_temperature: float, pool: str = "mean", gamma: float = 5.0,
                            kernel: str = "torch") -> torch.Tensor:
    """regions (Bi,N,D), tokens (Bt,L,D) (both L2-normalized), token_mask (Bt,L) -> S (Bi,Bt).
    S[i,j] aggregates, over report j's tokens, cos(token, softmax-attended context in image i).
    ``kernel``: "torch" (reference), "triton" (fused, ``trainer/kernels``), "auto" (fused on CUDA)."""
    from trainer.kernels import token_cosines

    s = token_cosines(regions, tokens, attn_temperature, kernel)
    if s is None:
        s = token_cosines_reference(regions, tokens, attn_temperature)
    return pool_tokens(s, token_mask, pool, gamma)


def token_cosines_reference(regions: torch.Tensor, tokens: torch.Tensor, attn_temperature: float) -> torch.Tensor:
    """(Bi,N,D), (Bt,L,D) -> (Bi,Bt,L): each token's cosine with its attention-weighted regions."""
    r, t = regions.float(), tokens.float()
    logits = torch.einsum("ind,tld->itln", r, t) / attn_temperature          # (Bi,Bt,L,N)
    ctx = torch.einsum("itln,ind->itld", logits.softmax(-1), r)              # (Bi,Bt,L,D)
    return F.cosine_similarity(ctx, t.unsqueeze(0), dim=-1, eps=1e-6)        # (Bi,Bt,L)


def pool_tokens(s: torch.Tensor, token_mask: torch.Tensor, pool: str = "mean", gamma: float = 5.0) -> torch.Tensor:
    """(Bi,Bt,L) token cosines -> (Bi,Bt): masked mean, or GLoRIA's log-sum-exp (soft max)."""
    m = token_mask.float().unsqueeze(0)
    if pool == "mean":
        return (s * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    s = s * gamma + (m - 1.0) * 1e4
    return torch.logsumexp(s, dim=-1) / gamma


def local_alignment_loss(view_regions: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                         cfg: TMAConfig) -> torch.Tensor:
    """view_regions (B,V,N,D): InfoNCE over token-region similarities, averaged over views. Ranks
    may bring different token counts (the model packs them): each pads to the longest."""
    longest = -all_reduce_min(-tokens.shape[1])
    if longest > tokens.shape[1]:
        tokens = F.pad(tokens, (0, 0, 0, longest - tokens.shape[1]))
        token_mask = F.pad(token_mask, (0, longest - token_mask.shape[1]))
    all_tokens, all_mask = gather_with_grad(tokens), gather_with_grad(token_mask)
    losses = []
    for v in range(view_regions.shape[1]):
        reg = view_regions[:, v]
        all_reg = gather_with_grad(reg)
        rows = token_region_similarity(reg, all_tokens, all_mask, cfg.attn_temperature, cfg.token_pool,
                                       cfg.lse_gamma, cfg.kernel)                       # (b, W*b)
        cols = token_region_similarity(all_reg, tokens, token_mask, cfg.attn_temperature, cfg.token_pool,
                                       cfg.lse_gamma, cfg.kernel).t()                   # (b, W*b)
        losses.append(contrastive_from_logits(rows / cfg.local_temperature, cols / cfg.local_temperature))
    return torch.stack(losses).mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """SwAV Sinkhorn-Knopp on (B,K) scores -> (B,K) soft assignments with equal prototype mass
    over the global batch (sums are all-reduced across ranks)."""
    q = torch.exp((scores.float() - scores.float().max()) / epsilon).t()    # (K,B)
    k = q.shape[0]
    b = all_reduce_sum(q.new_full((1,), float(q.shape[1])))              # the global batch, kept on the device
    q = q / all_reduce_sum(q.sum().reshape(1)).clamp_min(1e-30)
    for _ in range(iters):
        q = q / all_reduce_sum(q.sum(1, keepdim=True)).clamp_min(1e-30) / k
        q = q / q.sum(0, keepdim=True).clamp_min(1e-30) / b
    return (q * b).t()


def consistency_loss(view_scores: torch.Tensor, cfg: TMAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """view_scores (B,V,K): swapped prediction over all ordered view pairs (u != v), so the term
    is invariant to the order of the views. Returns (loss, entropy of the mean assignment)."""
    b, v, k = view_scores.shape
    if v < 2:
        raise ValueError(f"consistency needs >= 2 views per volume, got {v}")
    targets = [sinkhorn(view_scores[:, u], cfg.sinkhorn_epsilon, cfg.sinkhorn_iters) for u in range(v)]
    logp = F.log_softmax(view_scores.float() / cfg.student_temperature, dim=-1)
    total, n = 0.0, 0
    for u in range(v):
        for w in range(v):
            if u != w:
                total = total + (-(targets[u] * logp[:, w]).sum(-1)).mean()
                n += 1
    p_mean = logp.exp().mean((0, 1))
    entropy = -(p_mean * p_mean.clamp_min(1e-12).log()).sum()
    return total / n, entropy.detach()
