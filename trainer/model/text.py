"""BERT text encoder (HF transformers) from a local directory, or random-init with a WordPiece
tokenizer built from the training reports (no hub access at run time)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from trainer.config import ModelConfig


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """A lower-cased BERT WordPiece tokenizer (HF ``tokenizers``) whose vocabulary is built from
    the report texts: special tokens, every character (and its ``##`` continuation), then whole
    words by frequency (ties alphabetical) up to ``vocab_size``. Written here rather than with
    ``WordPieceTrainer`` because that trainer breaks merge ties in hash order, so the same
    reports gave different vocabularies in different processes; this one is reproducible."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = specials + chars + ["##" + c for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(vocab)} characters and specials")
    have = set(vocab)
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if w not in have:
            vocab.append(w)
            have.add(w)
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.decoder = decoders.WordPiece()           # '##' pieces join back into words on decode
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {p}")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


class TextEncoder(nn.Module):
    """Returns (report embedding (B, H), token embeddings (B, L, H)). The report embedding is the
    [CLS] state (``model.text_pool=cls``, what a pretrained BERT such as MedCPT was trained for) or
    the masked mean of the token states (``mean``: a random-init BERT's [CLS] output is the same
    vector for every report, so contrastive training would start from a collapsed tower)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        from transformers import BertConfig, BertModel

        if cfg.text_encoder:
            p = Path(cfg.text_encoder)
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"model.text_encoder={p}: no config.json there (expected a local "
                                        "copy of a BERT model such as MedCPT-Query-Encoder)")
            self.bert = BertModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False,
                                                  hidden_dropout_prob=cfg.text_dropout,
                                                  attention_probs_dropout_prob=cfg.text_dropout)
        else:
            bc = BertConfig(vocab_size=vocab_size or cfg.vocab_size, hidden_size=cfg.text_hidden,
                            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                            intermediate_size=cfg.text_intermediate, max_position_embeddings=512,
                            hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout)
            self.bert = BertModel(bc, add_pooling_layer=False)
        self.out_dim = self.bert.config.hidden_size
        if cfg.text_pool not in ("cls", "mean"):
            raise ValueError(f"model.text_pool: {cfg.text_pool!r} is not one of ['cls', 'mean']")
        self.pool = cfg.text_pool

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pool == "cls":
            return h[:, 0], h
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0), h
