"""Fused token-region similarity (Triton), forward and backward.

Reference: ``trainer.losses.tma.token_cosines_reference``. For image i, report t and
token l, with regions r_n (N x D) and the token q (D):

    a = softmax_n(q . r_n / tau),  c = sum_n a_n r_n,  s[i,t,l] = cos(c, q)

The reference materialises (Bi, Bt, L, N) attention and (Bi, Bt, L, D) context tensors; here one
program handles an (i, t, block of tokens) tile and keeps both in registers, so memory is the
(Bi, Bt, L) output. The backward recomputes the tile and accumulates dR and dT atomically.
Pooling over tokens (mean or log-sum-exp) stays in PyTorch on the small output.

Gradients, per tile (dots over D):
    dc = ds (q/(|c||q|) - s c/|c|^2),  dq = ds (c/(|c||q|) - s q/|q|^2) + sum_n dz_n r_n / tau
    dz_n = a_n (dc . r_n - dc . c),    dr_n = a_n dc + dz_n q / tau
"""
from __future__ import annotations

import os

import torch

try:  # optional: the PyTorch reference runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None

EPS = 1e-6   # F.cosine_similarity's eps, applied to each norm


def available(x: torch.Tensor) -> bool:
    """Triton can run here: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _tile(r_ptr, t_ptr, i, t, l0, N, L, D, inv_tau,
              BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Load the tile and compute attention, context and cosine (shared by fwd and bwd)."""
        offs_l = l0 + tl.arange(0, BLOCK_L)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        lm, nm, dm = offs_l < L, offs_n < N, offs_d < D
        q = tl.load(t_ptr + (t * L + offs_l[:, None]) * D + offs_d[None, :], mask=lm[:, None] & dm[None, :], other=0.0)
        r = tl.load(r_ptr + (i * N + offs_n[:, None]) * D + offs_d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        z = tl.dot(q, tl.trans(r), input_precision="ieee") * inv_tau                                   # (BL, BN)
        z = tl.where(nm[None, :], z, float("-inf"))
        z = z - tl.max(z, axis=1)[:, None]
        e = tl.exp(z)
        a = e / tl.sum(e, axis=1)[:, None]                                     # (BL, BN)
        c = tl.dot(a, r, input_precision="ieee")                                                       # (BL, BD)
        cn = tl.maximum(tl.sqrt(tl.sum(c * c, axis=1)), 1e-6)
        qn = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-6)
        s = tl.sum(c * q, axis=1) / (cn * qn)
        return offs_l, offs_n, offs_d, lm, nm, dm, q, r, a, c, cn, qn, s

    @triton.jit
    def _fwd(r_ptr, t_ptr, s_ptr, Bt, N, L, D, inv_tau,
             BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        it = tl.program_id(0)
        i, t = it // Bt, it % Bt
        l0 = tl.program_id(1) * BLOCK_L
        offs_l, _, _, lm, _, _, _, _, _, _, _, _, s = _tile(r_ptr, t_ptr, i, t, l0, N, L, D, inv_tau,
                                                             BLOCK_L, BLOCK_N, BLOCK_D)
        tl.store(s_ptr + it * L + offs_l, s, mask=lm)

    @triton.jit
    def _bwd(r_ptr, t_ptr, ds_ptr, dr_ptr, dt_ptr, Bt, N, L, D, inv_tau,
             BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        it = tl.program_id(0)
        i, t = it // Bt, it % Bt
        l0 = tl.program_id(1) * BLOCK_L
        offs_l, offs_n, offs_d, lm, nm, dm, q, r, a, c, cn, qn, s = _tile(
            r_ptr, t_ptr, i, t, l0, N, L, D, inv_tau, BLOCK_L, BLOCK_N, BLOCK_D)
        ds = tl.load(ds_ptr + it * L + offs_l, mask=lm, other=0.0)
        ds = tl.where(lm, ds, 0.0)
        dc = ds[:, None] * (q / (cn * qn)[:, None] - (s / (cn * cn))[:, None] * c)          # (BL, BD)
        dq = ds[:, None] * (c / (cn * qn)[:, None] - (s / (qn * qn))[:, None] * q)
        da = tl.dot(dc, tl.trans(r), input_precision="ieee")                                                       # (BL, BN)
        dz = a * (da - tl.sum(dc * c, axis=1)[:, None])
        dz = tl.where(nm[None, :], dz, 0.0)
        dq += tl.dot(dz, r, input_precision="ieee") * inv_tau
        dr = tl.dot(tl.trans(a), dc, input_precision="ieee") + tl.dot(tl.trans(dz), q, input_precision="ieee") * inv_tau                   # (BN, BD)
        tl.atomic_add(dt_ptr + (t * L + offs_l[:, None]) * D + offs_d[None, :], dq, mask=lm[:, None] & dm[None, :])
        tl.atomic_add(dr_ptr + (i * N + offs_n[:, None]) * D + offs_d[None, :], dr, mask=nm[:, None] & dm[None, :])


def _blocks(n: int, l: int, d: int) -> tuple[int, int, int]:
    p2 = lambda x: max(16, triton.next_power_of_2(x))   # noqa: E731 - tl.dot needs >= 16
    return min(32, p2(l)), p2(n), p2(d)


class _TokenRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, regions: torch.Tensor, tokens: torch.Tensor, tau: float) -> torch.Tensor:
        r, t = regions.float().contiguous(), tokens.float().contiguous()
        (bi, n, d), (bt, l, _) = r.shape, t.shape
        bl, bn, bd = _blocks(n, l, d)
        s = torch.empty(bi, bt, l, device=r.device, dtype=torch.float32)
        _fwd[(bi * bt, triton.cdiv(l, bl))](r, t, s, bt, n, l, d, 1.0 / tau, BLOCK_L=bl, BLOCK_N=bn, BLOCK_D=bd)
        ctx.save_for_backward(r, t)
        ctx.tau, ctx.dtypes = tau, (regions.dtype, tokens.dtype)
        return s

    @staticmethod
    def backward(ctx, ds: torch.Tensor):
        r, t = ctx.saved_tensors
        (bi, n, d), (bt, l, _) = r.shape, t.shape
        bl, bn, bd = _blocks(n, l, d)
        dr, dt = torch.zeros_like(r), torch.zeros_like(t)
        _bwd[(bi * bt, triton.cdiv(l, bl))](r, t, ds.float().contiguous(), dr, dt, bt, n, l, d, 1.0 / ctx.tau,
                                            BLOCK_L=bl, BLOCK_N=bn, BLOCK_D=bd)
        return dr.to(ctx.dtypes[0]), dt.to(ctx.dtypes[1]), None


def token_cosines(regions: torch.Tensor, tokens: torch.Tensor, attn_temperature: float) -> torch.Tensor:
    """regions (Bi,N,D), tokens (Bt,L,D) -> s (Bi,Bt,L): cos(token, its attended context), fused.
    Call through ``trainer.kernels.token_cosines``, which checks that triton can run here."""
    if regions.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"regions {tuple(regions.shape)} and tokens {tuple(tokens.shape)} differ in the last dim")
    return _TokenRegion.apply(regions, tokens, float(attn_temperature))
