"""Domain-adaptive pretraining of the text tower: masked-language modelling on a local corpus.

    python -m trainer.text_mlm --config configs/phantom.yaml --out runs/text-mlm \\
        [--corpus ../shared/realdata/ctclip_reports/train.csv] [--steps 3000]
    python -m trainer.pretrain --config configs/phantom.yaml --set model.text_encoder=runs/text-mlm

The paper starts its text tower from MedCPT, a BERT pretrained on PubMed; an offline machine has
no such checkpoint. This writes the nearest thing it can make: a BERT of the model flavour's text
size, trained with BERT's masked-language objective (HF ``BertForMaskedLM`` and
``DataCollatorForLanguageModeling``: 15 % of tokens, 80/10/10) on

- the **train** split's reports of ``data.shards`` (never valid or test), and
- any ``--corpus`` file: a ``.csv`` with a report column (``--column``, default ``report_text``,
  CT-RATE's) or a ``.txt`` with one document per line.

The folder (a ``BertModel``'s ``config.json`` and weights without the MLM head, the tokenizer, and
``text_mlm.json`` with the corpus counts and the held-out masked-token accuracy before and after)
is what ``model.text_encoder`` loads. Examples follow
``model.text_unit``: single sentences (``sentence``) or whole reports (``report``), as the
contrastive run will feed them. A document that yields no text is counted as rejected, never
silently dropped. Plain torch loop (a few thousand steps of a small BERT): HF ``Trainer`` would
add ``accelerate`` as a dependency for nothing this needs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

from common.config import add_config_args, parse_config_cli


def read_corpus(path: str | Path, column: str = "report_text") -> list[str]:
    """Documents of one corpus file (.csv column or .txt lines); ValueError naming file and key."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus file not found: {p}")
    if p.suffix.lower() == ".csv":
        csv.field_size_limit(1 << 24)
        with p.open(newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f)
            if column not in (rows.fieldnames or []):
                raise ValueError(f"{p}: no column {column!r} (columns: {rows.fieldnames})")
            return [r[column] or "" for r in rows]
    if p.suffix.lower() == ".txt":
        return p.read_text(encoding="utf-8").splitlines()
    raise ValueError(f"{p}: corpus files are .csv or .txt, got {p.suffix!r}")


def examples(docs: list[str], unit: str) -> tuple[list[str], int]:
    """(texts to train on, documents rejected as empty)."""
    from common.text import split_sentences

    out, rejected = [], 0
    for d in docs:
        d = (d or "").strip()
        if not d:
            rejected += 1
            continue
        out += split_sentences(d) if unit == "sentence" else [d]
    return out, rejected


def train_mlm(docs: list[str], cfg, out: Path, steps: int, batch: int, lr: float, seed: int,
              vocab_size: int, max_tokens: int, holdout: float = 0.05, log_every: int = 250) -> dict:
    """Hold out ``holdout`` of the documents (whole reports, so no report is on both sides), build
    the tokenizer on the rest, train a BERT MLM on their examples (``model.text_unit``), save the
    encoder and the tokenizer to ``out``; -> stats (the held-out masked-token accuracy before and
    after, on the same masks, and how many held-out examples also occur verbatim in training:
    template corpora repeat sentences)."""
    import torch
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    from common.text import build_tokenizer
    from trainer.model.text import bert_config

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(docs), generator=g).tolist()
    n_val = max(1, int(len(docs) * holdout))
    unit = cfg.model.text_unit
    val, _ = examples([docs[i] for i in perm[:n_val]], unit)
    tr, _ = examples([docs[i] for i in perm[n_val:]], unit)
    if not tr or not val:
        raise ValueError(f"corpus too small: {len(docs)} documents give {len(tr)} training and {len(val)} "
                         "held-out examples; both must be > 0")
    seen = set(tr)
    tok = build_tokenizer(tr, vocab_size)
    bert = BertForMaskedLM(bert_config(cfg.model, len(tok)))
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    opt = torch.optim.AdamW(bert.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(      # linear warmup, then cosine to 0
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))

    def batch_of(items):
        enc = tok(items, truncation=True, max_length=max_tokens)
        return collate([{"input_ids": i, "attention_mask": a} for i, a in zip(enc["input_ids"], enc["attention_mask"])])

    def step_loss(b):
        return bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])

    def masked_accuracy() -> tuple[float, float, int]:
        with torch.random.fork_rng():            # the same masks each time, training's RNG untouched
            torch.manual_seed(seed + 1)
            bert.eval()
            hit = n = 0
            loss = 0.0
            with torch.no_grad():
                for i in range(0, len(val), 256):
                    b = batch_of(val[i:i + 256])
                    o = step_loss(b)
                    sel = b["labels"] != -100
                    hit += int((o.logits.argmax(-1)[sel] == b["labels"][sel]).sum())
                    n += int(sel.sum())
                    loss += float(o.loss) * int(sel.sum())
            bert.train()
        if n == 0:
            raise ValueError(f"no token of the {len(val)} held-out examples was masked: the corpus is too small")
        return hit / n, loss / n, n

    acc0, _, _ = masked_accuracy()
    t0, order, pos = time.time(), torch.randperm(len(tr), generator=g).tolist(), 0
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(tr), generator=g).tolist(), 0
        loss = step_loss(batch_of([tr[i] for i in order[pos:pos + batch]])).loss
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bert.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"[text_mlm] step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    acc, val_loss, n_masked = masked_accuracy()
    out.mkdir(parents=True, exist_ok=True)
    bert.bert.save_pretrained(str(out))          # the encoder only, as a BertModel folder (like MedCPT's)
    tok.save_pretrained(str(out))
    return {"documents_train": len(docs) - n_val, "documents_heldout": n_val, "examples_train": len(tr),
            "examples_heldout": len(val), "heldout_examples_seen_in_train": sum(v in seen for v in val),
            "heldout_masked_tokens": n_masked, "vocab": len(tok), "steps": steps, "seconds": round(time.time() - t0, 1),
            "heldout_masked_accuracy_init": round(acc0, 4), "heldout_masked_accuracy": round(acc, 4),
            "heldout_mlm_loss": round(val_loss, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.text_mlm", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--out", required=True, help="folder to write (model.text_encoder loads it)")
    p.add_argument("--corpus", action="append", default=[], help=".csv or .txt corpus file (repeatable)")
    p.add_argument("--column", default="report_text", help="report column of .csv corpora")
    p.add_argument("--no-train-reports", action="store_true", help="do not add data.shards' train reports")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--vocab-size", type=int, default=None, help="default: model.vocab_size of the flavour")
    p.add_argument("--seed", type=int, default=0)
    a, cfg = parse_config_cli(p, argv)
    if cfg.model.text_encoder:
        raise SystemExit(f"model.text_encoder={cfg.model.text_encoder} is set: text_mlm trains a text tower "
                         "from scratch, with the flavour's text_* sizes")
    sources = {}
    if not a.no_train_reports:
        from data_service.shards import iter_split

        sources[f"{cfg.data.shards} (train)"] = [s["report"] for s in iter_split(cfg.data.shards, "train",
                                                                                 decode_ct=False)]
    for c in a.corpus:
        if c in sources:
            raise SystemExit(f"--corpus {c} is given twice")
        sources[c] = read_corpus(c, a.column)
    if not sources:
        raise SystemExit("no corpus: give --corpus, or drop --no-train-reports")
    docs, counts = [], {}
    for name, got in sources.items():
        ex, rejected = examples(got, cfg.model.text_unit)
        counts[name] = {"documents": len(got), "rejected_empty": rejected, "examples": len(ex)}
        print(f"[text_mlm] {name}: {len(got)} documents -> {len(ex)} examples ({rejected} empty, rejected)")
        docs += [d for d in got if (d or "").strip()]
    d = cfg.data
    max_tokens = d.max_sentence_tokens if cfg.model.text_unit == "sentence" else d.max_text_tokens
    out = Path(a.out)
    stats = train_mlm(docs, cfg, out, a.steps, a.batch_size, a.lr, a.seed, a.vocab_size or cfg.model.vocab_size,
                      max_tokens)
    stats["corpus"] = counts
    (out / "text_mlm.json").write_text(json.dumps(stats, indent=1))
    print(f"[text_mlm] held-out masked-token accuracy {stats['heldout_masked_accuracy_init']:.3f} -> "
          f"{stats['heldout_masked_accuracy']:.3f}; wrote {out} (use --set model.text_encoder={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
