"""BERT text encoder (HF transformers) from a local directory, or random-init (no hub access)."""
from __future__ import annotations

import torch
from torch import nn

from common.text import encode_reports
from trainer.config import ModelConfig


def tokenize_reports(tokenizer, texts: list[str], cfg) -> dict[str, torch.Tensor]:
    """Reports -> the text encoder's input ids and mask, as ``model.text_unit`` wants them
    (``common.text.encode_reports``: (B, L), or (B, S, Ls) sentences)."""
    d = cfg.data
    return encode_reports(tokenizer, list(texts), cfg.model.text_unit, d.max_text_tokens, d.max_sentences,
                          d.max_sentence_tokens)


def bert_config(cfg: ModelConfig, vocab_size: int):
    """The HF ``BertConfig`` of a from-scratch text tower of the flavour's text size (used by the
    model and by ``trainer.text_mlm``, so a pretrained stand-in has exactly the tower's shape)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                      num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
                      max_position_embeddings=512, hidden_dropout_prob=cfg.text_dropout,
                      attention_probs_dropout_prob=cfg.text_dropout)


class TextEncoder(nn.Module):
    """Returns (report embedding (B, H), token embeddings (B, L, H)). The report embedding is the
    [CLS] state (``model.text_pool=cls``, what a pretrained BERT such as MedCPT was trained for) or
    the masked mean of the token states (``mean``: a random-init BERT's [CLS] output is the same
    vector for every report, so contrastive training would start from a collapsed tower)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        from transformers import BertModel

        if cfg.text_encoder:
            from common.storage import local_dir

            p = local_dir(cfg.text_encoder)           # a URI: a copy in the local cache, made once
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"model.text_encoder={p}: no config.json there (expected a local "
                                        "copy of a BERT model such as MedCPT-Query-Encoder)")
            self.bert = BertModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False,
                                                  hidden_dropout_prob=cfg.text_dropout,
                                                  attention_probs_dropout_prob=cfg.text_dropout)
        else:
            self.bert = BertModel(bert_config(cfg, vocab_size or cfg.vocab_size), add_pooling_layer=False)
        self.out_dim = self.bert.config.hidden_size
        if cfg.text_pool not in ("cls", "mean"):
            raise ValueError(f"model.text_pool: {cfg.text_pool!r} is not one of ['cls', 'mean']")
        self.pool = cfg.text_pool

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # the additive (B,1,1,L) mask BERT would build: given ready, transformers skips its check of
        # whether any token is padded (``padding_mask.all()``, a host sync on every step)
        dtype = self.bert.get_input_embeddings().weight.dtype
        bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        h = self.bert(input_ids=input_ids, attention_mask=bias).last_hidden_state
        if self.pool == "cls":
            return h[:, 0], h
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0), h
