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

    from common import storage

    if storage.is_remote(path):
        path = storage.local_dir(path)                  # a copy in the local cache, made once
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


# NegEx-style negation cues (Chapman et al. 2001, the cue family radiology labelers use): removing
# them turns a negated statement into an affirmed one. Order matters: "there is no" before "no".
_NEGATED = [(re.compile(r"\b(there (?:is|are|was|were)) no\b\s*", re.I), r"\1 "),
            (re.compile(r"^no evidence of\s+", re.I), ""),
            (re.compile(r"\b(is|are|was|were|has been|have been|could be|can be)\s+not\b", re.I), r"\1"),
            (re.compile(r"\bnot\s+", re.I), ""),
            (re.compile(r"\bno\s+", re.I), ""),
            (re.compile(r"\bwithout\b", re.I), "with")]
_HAS_CUE = re.compile(r"\b(no|not|without)\b", re.I)
_COPULA = re.compile(r"\b(is|are|was|were)\b", re.I)
_THERE = re.compile(r"^(there (?:is|are|was|were))\s+(?:an?\s+)?", re.I)


def negate_sentence(sentence: str) -> str:
    """The sentence with its polarity flipped, by rule: a negated statement ("No pleural effusion.",
    "X was not observed.", "There is no X.", "... without X") loses its negation cues; an affirmed
    one gains one ("There is a X" -> "There is no X", the first copula "is" -> "is not", otherwise
    "No " in front). Generic English negation, not the zero-shot prompts' wording; the result is a
    statement that is false of the study whose report held the original (a hard negative for the
    sentence term, ``data.augment.negated_sentences``). Grammar may suffer; polarity does not."""
    s = sentence.strip()
    if _HAS_CUE.search(s):
        for pat, rep in _NEGATED:
            s = pat.sub(rep, s)
        s = re.sub(r"\s{2,}", " ", s).strip()
    elif _THERE.search(s):
        s = _THERE.sub(lambda m: m.group(1) + " no ", s, count=1)
    elif _COPULA.search(s):
        s = _COPULA.sub(lambda m: m.group(1) + " not", s, count=1)
    else:
        s = "No " + s[:1].lower() + s[1:]
    return s[:1].upper() + s[1:] if s else sentence


def encode_reports(tokenizer, texts: Sequence[str], unit: str = "report", max_tokens: int = 256,
                   max_sentences: int = 32, max_sentence_tokens: int = 48, pad_to_max: bool = False,
                   return_tensors: str = "pt", negations: bool = False) -> dict:
    """THE tokenization of reports, for the loader, the trainer's health batch and the evaluators.
    ``unit="report"``: ids (B, L); ``unit="sentence"``: each report split into sentences
    (``split_sentences``, at most ``max_sentences``; the rest is cut), ids (B, S, Ls) with a
    mask that is 0 for missing sentences. ``pad_to_max`` pads to the maximum lengths (fixed shapes
    for the loader's batches) instead of the longest in the batch. ``negations`` (sentence unit
    only) also returns ``neg_input_ids`` / ``neg_attention_mask`` of the same shape: sentence s of
    report b flipped by ``negate_sentence``."""
    if unit == "report":
        return dict(tokenizer(list(texts), padding="max_length" if pad_to_max else "longest", truncation=True,
                              max_length=max_tokens, return_tensors=return_tensors))
    if unit != "sentence":
        raise ValueError(f"text unit {unit!r} is not one of ['report', 'sentence']")
    import numpy as np

    sents = [split_sentences(t)[:max_sentences] for t in texts]
    s_max = max_sentences if pad_to_max else max(len(ss) for ss in sents)

    def pack(per_report):
        flat = [s for ss in per_report for s in ss]
        enc = tokenizer(flat, padding="max_length" if pad_to_max else "longest", truncation=True,
                        max_length=max_sentence_tokens, return_tensors="np")
        ids = np.full((len(texts), s_max, enc["input_ids"].shape[1]), tokenizer.pad_token_id, np.int64)
        mask = np.zeros(ids.shape, np.int64)
        k = 0
        for b, ss in enumerate(per_report):
            ids[b, :len(ss)] = enc["input_ids"][k:k + len(ss)]
            mask[b, :len(ss)] = enc["attention_mask"][k:k + len(ss)]
            k += len(ss)
        return ids, mask

    out = dict(zip(("input_ids", "attention_mask"), pack(sents)))
    if negations:
        out.update(zip(("neg_input_ids", "neg_attention_mask"), pack([[negate_sentence(s) for s in ss] for ss in sents])))
    if return_tensors == "pt":
        import torch

        return {k: torch.from_numpy(v) for k, v in out.items()}
    return out
