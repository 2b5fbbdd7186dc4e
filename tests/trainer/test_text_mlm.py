"""Text-tower MLM pretraining (trainer.text_mlm): it learns, and model.text_encoder loads what it writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer import text_mlm

REPO = Path(__file__).resolve().parents[2]


def test_read_corpus_names_file_and_key(tmp_path):
    bad = tmp_path / "r.csv"
    bad.write_text("AccessionNo,text\n1,No effusion.\n")
    with pytest.raises(ValueError, match=r"r\.csv.*'report_text'"):
        text_mlm.read_corpus(bad)
    assert text_mlm.read_corpus(bad, column="text") == ["No effusion."]
    with pytest.raises(ValueError, match=r"\.json"):
        (tmp_path / "r.json").write_text("{}")
        text_mlm.read_corpus(tmp_path / "r.json")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_mlm.read_corpus(tmp_path / "missing.txt")


def test_empty_documents_are_counted_not_dropped():
    ex, rejected = text_mlm.examples(["No effusion. Heart is normal.", "", "  ", "One."], "sentence")
    assert ex == ["No effusion.", "Heart is normal.", "One."] and rejected == 2
    assert text_mlm.examples(["A. B.", ""], "report") == (["A. B."], 1)


def test_mlm_learns_and_model_text_encoder_loads_it(tmp_path):
    """A corpus whose masked words are predictable from context: held-out masked-token accuracy
    must rise well above its initial value (the sentence unit, as the phantom preset), and the T3D
    text tower built with
    model.text_encoder=<out> must hold exactly the trained encoder weights and its tokenizer."""
    from transformers import BertModel

    from trainer.model import build_model
    from trainer.pretrain import prepare_tokenizer

    g = torch.Generator().manual_seed(0)
    organs = ["heart", "liver", "spleen", "aorta", "trachea", "kidney", "thyroid", "pancreas"]
    states = ["normal", "enlarged", "calcified", "clear"]
    lines = []
    for _ in range(1500):
        o, s = organs[int(torch.randint(8, (1,), generator=g))], states[int(torch.randint(4, (1,), generator=g))]
        lines.append(f"The {o} is {s}. Finding: {o} {s}.")
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "mlm"
    assert text_mlm.main(["--config", str(REPO / "configs" / "debug.yaml"), "--no-train-reports",
                          "--corpus", str(tmp_path / "c.txt"), "--out", str(out), "--steps", "400",
                          "--batch-size", "32", "--lr", "2e-3", "--vocab-size", "200",
                          "--set", "model.text_unit=sentence"]) == 0
    stats = json.loads((out / "text_mlm.json").read_text())
    assert stats["corpus"][str(tmp_path / "c.txt")] == {"documents": 1501, "rejected_empty": 1, "examples": 3000}
    # whole documents are held out (75 = 5 % of the 1500 kept), each gives its two sentences
    assert (stats["documents_heldout"], stats["documents_train"]) == (75, 1425)
    assert (stats["examples_heldout"], stats["examples_train"]) == (150, 2850) and stats["heldout_masked_tokens"] > 0
    assert stats["heldout_masked_accuracy"] > stats["heldout_masked_accuracy_init"] + 0.3, stats

    from common.config import load_config

    cfg = load_config(REPO / "configs" / "debug.yaml", [f"model.text_encoder={out}"])
    tok_dir = prepare_tokenizer(cfg, tmp_path / "run")
    from common.text import load_tokenizer

    tok = load_tokenizer(tok_dir)
    assert len(tok) == stats["vocab"]
    m = build_model(cfg, len(tok))
    ref = BertModel.from_pretrained(str(out), add_pooling_layer=False).state_dict()
    mine = m.text.bert.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)


def test_text_mlm_refuses_a_preloaded_encoder(tmp_path):
    with pytest.raises(SystemExit, match="text_encoder"):
        text_mlm.main(["--config", str(REPO / "configs" / "debug.yaml"), "--out", str(tmp_path / "o"),
                       "--set", f"model.text_encoder={tmp_path}"])
