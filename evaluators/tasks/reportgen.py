"""Report generation: a small Transformer decoder trained on frozen image features.

The pretrained image encoder is frozen; its last feature map (one token per region, plus the
pooled token) is the decoder's memory. The decoder (``torch.nn.TransformerDecoder``, pre-norm)
is trained with teacher forcing on the ``train`` split's reports for ``eval.reportgen_steps``
steps, then writes a report greedily for each ``test`` volume. Tokens are the pretrained text
tokenizer's (``[CLS]`` starts a report, ``[SEP]`` ends it).

Metrics are pycocoevalcap's (the package R2Gen-style radiology report generation papers use):
BLEU-1..4, METEOR 1.5 (a bundled Java jar with its paraphrase table: no download, but a Java
runtime) and ROUGE-L, on lower-cased text with punctuation split off.
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
from typing import Sequence

import numpy as np
import torch
from torch import nn

_WORD = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*|[^\sa-z0-9]")


def clean_report(text: str) -> str:
    """Lower-case, punctuation as separate tokens, single spaces: the text the metrics compare."""
    return " ".join(_WORD.findall(text.lower()))


def caption_metrics(refs: Sequence[str], hyps: Sequence[str], meteor: bool = True) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR and ROUGE-L of ``hyps`` against one reference each."""
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need as many hypotheses as references (>0), got {len(hyps)} and {len(refs)}")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise ImportError("report generation metrics need pycocoevalcap: pip install pycocoevalcap==1.2") from e
    # an empty hypothesis would crash the scorers; it scores as a lone '.' (matches nothing useful)
    gts = {i: [clean_report(r) or "."] for i, r in enumerate(refs)}
    res = {i: [clean_report(h) or "."] for i, h in enumerate(hyps)}
    with contextlib.redirect_stdout(io.StringIO()):          # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if meteor:
        if shutil.which("java") is None:
            raise ValueError("METEOR needs a Java runtime on PATH (pycocoevalcap runs meteor-1.5.jar); "
                             "install one (e.g. apt-get install default-jre-headless)")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            with contextlib.suppress(Exception):
                scorer.close()
    return out


class ReportDecoder(nn.Module):
    """Token embeddings + positions -> pre-norm Transformer decoder over image memory -> vocab."""

    def __init__(self, vocab: int, feat_dim: int, max_len: int, d: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.mem = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, d))
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        layer = nn.TransformerDecoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.max_len = max_len

    def forward(self, memory: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        n = ids.shape[1]
        x = self.emb(ids) + self.pos(torch.arange(n, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        if pad is not None:                       # float like the causal mask (mixed kinds are deprecated)
            pad = torch.zeros(pad.shape, dtype=x.dtype, device=x.device).masked_fill(pad, float("-inf"))
        h = self.dec(x, self.mem(memory), tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=pad)
        return self.out(self.norm(h))

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, bos: int, eos: int) -> list[list[int]]:
        ids = torch.full((memory.shape[0], 1), bos, dtype=torch.long, device=memory.device)
        done = torch.zeros(memory.shape[0], dtype=torch.bool, device=memory.device)
        for _ in range(self.max_len - 1):
            nxt = self.forward(memory, ids)[:, -1].argmax(-1)
            nxt[done] = eos
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == eos
            if done.all():
                break
        out = []
        for row in ids[:, 1:].tolist():
            out.append(row[:row.index(eos)] if eos in row else row)
        return out


def train_and_generate(mem_train: torch.Tensor, reports_train: Sequence[str], mem_test: torch.Tensor,
                       tokenizer, max_len: int, steps: int, seed: int = 0, lr: float = 1e-3,
                       batch: int = 16, device: str | torch.device = "cpu") -> tuple[list[str], float]:
    """Fit a decoder on (memory, report) pairs, then write a report for each test memory.
    Returns (generated reports, mean loss of the last 10 steps)."""
    if len(reports_train) == 0 or len(mem_test) == 0:
        raise ValueError(f"report generation needs train and test studies, got {len(reports_train)} and {len(mem_test)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = tokenizer(list(reports_train), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"].bool()
    dec = ReportDecoder(len(tokenizer), mem_train.shape[-1], max_len).to(device)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    dec.train()
    for _ in range(steps):
        idx = torch.randperm(len(ids), generator=g)[:batch]
        x, y, m = ids[idx, :-1].to(device), ids[idx, 1:].to(device), att[idx, 1:].to(device)
        logits = dec(mem_train[idx].to(device), x, pad=~att[idx, :-1].to(device))
        loss = nn.functional.cross_entropy(logits[m], y[m])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    dec.eval()
    seqs = []
    for i in range(0, len(mem_test), batch):
        seqs += dec.generate(mem_test[i:i + batch].to(device), tokenizer.cls_token_id, tokenizer.sep_token_id)
    texts = [tokenizer.decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=True) for s in seqs]
    return texts, float(np.mean(losses[-10:])) if losses else float("nan")
