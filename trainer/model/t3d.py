"""T3D: image encoder + text encoder + heads into a shared space (no distributed code here)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig, RestoreConfig, TMAConfig
from trainer.model.image import ImageEncoder
from trainer.model.restore import RestoreDecoder, restore_through
from trainer.model.text import TextEncoder


def text_informed_pool(regions: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                       attn_temperature: float) -> torch.Tensor:
    """Regions (B,N,D) weighted by their own report's tokens -> (B,D): each valid token's softmax
    attention over the regions, averaged over tokens, gives a text-chosen mix of regions."""
    a = (torch.einsum("bnd,bld->bln", regions.float(), tokens.float()) / attn_temperature).softmax(-1)
    m = token_mask.float()
    w = (a * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)   # (B,N)
    return torch.einsum("bn,bnd->bd", w, regions.float())


def content_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,L) attention mask -> the same without [CLS] (first) and [SEP] (last attended) positions."""
    m = attention_mask.clone()
    m[:, 0] = 0
    last = (attention_mask.sum(1) - 1).clamp_min(0)
    m[torch.arange(len(last), device=last.device), last] = 0
    return m


def pack_tokens(tokens: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,L,D) tokens and their (B,L) mask -> the same tokens with each row's valid ones first (in
    order) and the columns no row uses cut off. Every use of the tokens pools over them (mean,
    log-sum-exp, attention), so order is free; a padded sentence-level report is mostly padding
    (16 sentences x 32 slots for ~50 words), which the token-region term would pay for."""
    if token_mask.shape[1] == 0:
        return tokens, token_mask
    order = torch.argsort((token_mask <= 0).to(torch.int8), dim=1, stable=True)
    keep = max(1, int((token_mask > 0).sum(1).max()))
    idx = order[:, :keep]
    return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1])), token_mask.gather(1, idx)


def projection(kind: str, d_in: int, d_out: int) -> nn.Module:
    """Head into the shared space: ``linear`` (CLIP) or ``mlp`` (Linear-GELU-Linear, SimCLR/ConVIRT)."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))
    raise ValueError(f"model.proj: {kind!r} is not one of ['linear', 'mlp']")


class T3D(nn.Module):
    def __init__(self, mcfg: ModelConfig, tcfg: TMAConfig, vocab_size: int | None = None,
                 rcfg: RestoreConfig | None = None):
        super().__init__()
        self.image = ImageEncoder(mcfg)
        self.text = TextEncoder(mcfg, vocab_size)
        ci, ct, e, dl = self.image.out_dim, self.text.out_dim, mcfg.embed_dim, mcfg.local_dim
        self.img_proj = projection(mcfg.proj, ci, e)
        self.txt_proj = projection(mcfg.proj, ct, e)
        self.shared_local = tcfg.local_space == "shared"   # regions and tokens in the CLIP space (FILIP-style)
        if self.shared_local:
            dl = e
        else:
            self.img_local = nn.Linear(ci, dl)    # regions -> token space (TMA)
            self.txt_local = nn.Linear(ct, dl)    # tokens -> token space (TMA)
        self.view_proj = nn.Sequential(nn.Linear(dl, dl), nn.GELU(), nn.Linear(dl, e))  # pooled view -> prototypes
        # a direct parameter of the root module: ZeRO-3 gathers it in T3D.forward's hook
        self.prototypes = nn.Parameter(torch.randn(tcfg.prototypes, e) / math.sqrt(e))
        self.tcfg = tcfg
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / mcfg.init_temperature)]))  # 1-d: DeepSpeed broadcasts bytes
        # text-informed restoration (``restore``): built last, so the other parameters' init does not
        # depend on it; disabled, the model has no parameter more than without it
        self.rcfg = rcfg if rcfg is not None else RestoreConfig()
        self.restorer = RestoreDecoder(self.image.stage_dims, dl, self.rcfg, mcfg.conv1_stride) if self.rcfg.enabled else None

    # ----------------------------------------------------------------------------- encoders
    def encode_image(self, x: torch.Tensor):
        """x (B,1,D,H,W) -> normalized global (B,E), normalized regions (B,N,Dl)."""
        g, local, _ = self.image(x)
        return self.project_image(g), F.normalize(self.local_head(local, image=True), dim=-1)

    def local_head(self, x: torch.Tensor, image: bool) -> torch.Tensor:
        """Regions (image) or tokens into the token-region space (``tma.local_space``)."""
        if self.shared_local:
            return self.img_proj(x) if image else self.txt_proj(x)
        return self.img_local(x) if image else self.txt_local(x)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """The image encoder's pooled features (B,C) -> normalized embedding in the shared space (B,E)."""
        return F.normalize(self.img_proj(pooled), dim=-1)

    def token_head(self, states: torch.Tensor) -> torch.Tensor:
        """The text tower's token states -> the token-region space. With ``tma.text_grad=false`` the
        TMA terms train this head but stop at the tower: the tower learns only from clip/sentence."""
        return self.local_head(states if self.tcfg.text_grad else states.detach(), image=False)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sentences: bool = False):
        """Reports (B,L), or reports as sentences (B,S,Ls) (``model.text_unit=sentence``, from
        ``common.text.encode_reports``) -> normalized report (B,E), normalized tokens (B,L',Dl) and
        their mask (B,L') without CLS/SEP/PAD. A sentence-level report embedding is the mean of its
        sentences' projected embeddings (each sentence encoded on its own). With ``sentences``
        (sentence unit only), also each sentence's normalized embedding (B,S,E) and the sentence
        mask (B,S), for the sentence-image term (``tma.w_sentence``)."""
        if input_ids.ndim == 2:
            if sentences:
                raise ValueError("sentence embeddings need model.text_unit=sentence (input ids (B,S,Ls)), "
                                 f"got input ids of shape {tuple(input_ids.shape)}")
            pooled, tokens = self.text(input_ids, attention_mask)
            return (F.normalize(self.txt_proj(pooled), dim=-1), F.normalize(self.token_head(tokens), dim=-1),
                    content_mask(attention_mask).to(tokens.dtype))
        b, s, n = input_ids.shape
        ids, am = input_ids.reshape(b * s, n), attention_mask.reshape(b * s, n)
        present = am[:, 0] > 0                                 # padding sentences are skipped
        if not bool(present.view(b, s).any(1).all()):
            raise ValueError("every report needs at least one sentence")
        pooled, states = self.text(ids[present], am[present])
        owner = torch.arange(b, device=ids.device).repeat_interleave(s)[present]
        sent = self.txt_proj(pooled)
        report = torch.zeros(b, sent.shape[1], dtype=sent.dtype, device=sent.device).index_add(0, owner, sent)
        report = report / torch.bincount(owner, minlength=b).clamp_min(1)[:, None].to(sent.dtype)
        local = self.token_head(states)
        tokens = local.new_zeros(b * s, n, local.shape[-1])
        tokens[present] = local
        out = (F.normalize(report, dim=-1), F.normalize(tokens.view(b, s * n, -1), dim=-1),
               content_mask(am).view(b, s * n).to(local.dtype))
        if not sentences:
            return out
        each = sent.new_zeros(b * s, sent.shape[1])
        each[present] = F.normalize(sent, dim=-1)
        return (*out, each.view(b, s, -1), present.view(b, s))

    def prototype_scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled view features (..., Dl) -> cosine scores with the prototypes (..., K).
        Call only from forward (ZeRO-3 partitions parameters outside it)."""
        z = F.normalize(self.view_proj(pooled), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t().to(z.dtype)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                views: torch.Tensor | None = None,
                negations: tuple[torch.Tensor, torch.Tensor] | None = None,
                restore_seeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """image (B,1,D,H,W); views (B,V,1,d,h,w) or None; ``negations`` the (ids, mask) of each
        sentence negated, (B,S,Ls) like the report (``data.augment.negated_sentences``) or None;
        ``restore_seeds`` (B, 1+V) each input's corruption seed (the loader's augmentation seeds,
        ``AugmentParams.seed``), or None: no restoration (nor without ``restore.enabled``).
        Returns every tensor the losses need."""
        img, _ = self.encode_image(image)
        per_sentence = self.tcfg.w_sentence > 0
        txt, tokens, tmask, *sent = self.encode_text(input_ids, attention_mask, sentences=per_sentence)
        if input_ids.ndim == 3:         # sentences: mostly padding, packed (its size is read from the mask)
            tokens, tmask = pack_tokens(tokens, tmask)
        out = {"img": img, "txt": txt, "tokens": tokens, "token_mask": tmask,
               "logit_scale": self.logit_scale.clamp(0, math.log(100.0)).exp()[0]}
        if per_sentence:
            out["sentences"], out["sentence_mask"] = sent
            if negations is not None:
                *_, out["negations"], out["negation_mask"] = self.encode_text(*negations, sentences=True)
        if views is not None and views.shape[1] > 0:
            b, v = views.shape[:2]
            vg, vr = self.encode_image(views.flatten(0, 1))
            out["view_global"] = vg.view(b, v, -1)
            out["view_regions"] = vr = vr.view(b, v, vr.shape[1], vr.shape[2])
            if v >= 2 and self.tcfg.enabled and self.tcfg.w_consistency > 0:
                if self.tcfg.consistency_on == "text_informed":
                    pooled = torch.stack([text_informed_pool(vr[:, k], tokens, tmask, self.tcfg.attn_temperature)
                                          for k in range(v)], 1)
                else:
                    pooled = vr.float().mean(2)
                out["view_scores"] = self.prototype_scores(pooled.to(vr.dtype))
        if self.restorer is not None and restore_seeds is not None:
            out.update(self.restore_outputs(image, views, tokens, tmask, restore_seeds))
        return out

    def restore_outputs(self, image: torch.Tensor, views: torch.Tensor | None, tokens: torch.Tensor,
                        token_mask: torch.Tensor, seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The restoration of the volume and of each view (``trainer.losses.restore`` reads them):
        restored input, its target (the clean input) and the corrupted-voxel mask. Call only from
        forward (ZeRO-3)."""
        c = self.rcfg
        tok, tm = (tokens, token_mask) if c.text_informed else (None, None)
        _, mask, pred = restore_through(self.image, self.restorer, image, seeds[:, 0], c, tok, tm)
        out = {"restore_image": pred, "restore_image_target": image, "restore_image_mask": mask}
        if views is not None and views.shape[1] > 0:
            b, v = views.shape[:2]
            if tok is not None:
                tok, tm = tok.repeat_interleave(v, 0), tm.repeat_interleave(v, 0)
            _, mask, pred = restore_through(self.image, self.restorer, views.flatten(0, 1), seeds[:, 1:1 + v].reshape(-1),
                                            c, tok, tm)
            out.update(restore_views=pred.view(views.shape), restore_views_target=views,
                       restore_views_mask=mask.view(views.shape))
        return out

    def restore_study(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      seeds: torch.Tensor):
        """Outside training (the picture, ``trainer.model.restore.restoration_figure``): image
        (B,1,X,Y,Z) in [0, 1], its reports, seeds (B,) -> (corrupted, mask, restored)."""
        if self.restorer is None:
            raise ValueError("the model has no restoration decoder (restore.enabled=false)")
        _, tokens, tmask = self.encode_text(input_ids, attention_mask)
        if self.rcfg.text_informed:
            return restore_through(self.image, self.restorer, image, seeds, self.rcfg, tokens, tmask)
        return restore_through(self.image, self.restorer, image, seeds, self.rcfg)


def build_model(cfg: Config, vocab_size: int | None = None) -> T3D:
    return T3D(cfg.model, cfg.tma, vocab_size, getattr(cfg, "restore", None))


def count_parameters(model: nn.Module) -> dict[str, int]:
    parts = {"image": model.image, "text": model.text}
    if getattr(model, "restorer", None) is not None:
        parts["restorer"] = model.restorer
    out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    out["total"] = sum(p.numel() for p in model.parameters())
    out["heads"] = out["total"] - sum(out[k] for k in parts)
    return out
