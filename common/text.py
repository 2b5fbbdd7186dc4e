"""The report tokenizer: a local HF tokenizer folder, or a reproducible WordPiece vocabulary built
from the training reports (no hub access at run time). Used by the data stream, the trainer and
the evaluators alike."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence


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


_SENTENCE = re.compile(r"(?<=[.;!?])\s+")


def split_sentences(report: str) -> list[str]:
    """A report -> its sentences: section heads (``Findings:``) dropped, split after . ; ! ?"""
    out = []
    for line in report.split("\n"):
        head, sep, body = line.partition(": ")
        text = body if sep and " " not in head.strip() else line
        out += [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]
    return out or [report.strip()]


def encode_reports(tokenizer, texts: Sequence[str], unit: str = "report", max_tokens: int = 256,
                   max_sentences: int = 32, max_sentence_tokens: int = 48, pad_to_max: bool = False,
                   return_tensors: str = "pt") -> dict:
    """THE tokenization of reports, for the loader, the trainer's health batch and the evaluators.
    ``unit="report"``: ids (B, L); ``unit="sentence"``: each report split into sentences
    (``split_sentences``, at most ``max_sentences``; the rest is cut), ids (B, S, Ls) with a
    mask that is 0 for missing sentences. ``pad_to_max`` pads to the maximum lengths (fixed shapes
    for the loader's batches) instead of the longest in the batch."""
    if unit == "report":
        return dict(tokenizer(list(texts), padding="max_length" if pad_to_max else "longest", truncation=True,
                              max_length=max_tokens, return_tensors=return_tensors))
    if unit != "sentence":
        raise ValueError(f"text unit {unit!r} is not one of ['report', 'sentence']")
    import numpy as np

    sents = [split_sentences(t)[:max_sentences] for t in texts]
    flat = [s for ss in sents for s in ss]
    enc = tokenizer(flat, padding="max_length" if pad_to_max else "longest", truncation=True,
                    max_length=max_sentence_tokens, return_tensors="np")
    s_max = max_sentences if pad_to_max else max(len(ss) for ss in sents)
    ids = np.full((len(texts), s_max, enc["input_ids"].shape[1]), tokenizer.pad_token_id, np.int64)
    mask = np.zeros(ids.shape, np.int64)
    k = 0
    for b, ss in enumerate(sents):
        ids[b, :len(ss)] = enc["input_ids"][k:k + len(ss)]
        mask[b, :len(ss)] = enc["attention_mask"][k:k + len(ss)]
        k += len(ss)
    if return_tensors == "pt":
        import torch

        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    return {"input_ids": ids, "attention_mask": mask}
