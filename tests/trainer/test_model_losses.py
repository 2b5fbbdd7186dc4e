"""Model shapes, gradient flow, and the behaviour of every loss term."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from common.config import load_config
from tests.conftest import REPO
from trainer.config import TMAConfig
from trainer.losses import (
    T3DLoss,
    clip_loss,
    consistency_loss,
    local_alignment_loss,
    sentence_loss,
    token_region_similarity,
)
from trainer.losses.dist import ranks_agree
from trainer.losses.tma import sinkhorn
from trainer.model import build_model
from trainer.model.t3d import count_parameters, pack_tokens


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs/debug.yaml")


def _batch(cfg, b=3, v=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.model.vocab_size, (b, 12), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    ids[0, 7] = 3
    return {"image": torch.rand(b, 1, *cfg.data.size, generator=g),
            "views": torch.rand(b, v, 1, *cfg.data.views.size, generator=g),
            "input_ids": ids, "attention_mask": mask}


def test_forward_shapes(cfg):
    torch.manual_seed(0)
    m = build_model(cfg)
    out = m(**_batch(cfg))
    e, dl = cfg.model.embed_dim, cfg.model.local_dim
    assert out["img"].shape == (3, e) and out["txt"].shape == (3, e)
    assert out["view_regions"].shape[:2] == (3, 2) and out["view_regions"].shape[-1] == dl
    assert out["view_regions"].shape[2] == 3 * 3 * 2     # 40x40x20 view, 4 stride-2 stages: 20->10->5->3->2
    assert out["view_scores"].shape == (3, 2, cfg.tma.prototypes)
    assert torch.allclose(out["img"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["token_mask"][0].sum() == 6                # CLS, SEP and padding excluded


@pytest.mark.parametrize("term", ["clip", "local", "consistency"])
def test_gradient_flows_for_each_term(cfg, term):
    torch.manual_seed(0)
    m = build_model(cfg)
    c = TMAConfig(**{**cfg.tma.__dict__, "w_clip": 0.0, "w_local": 0.0, "w_consistency": 0.0})
    setattr(c, f"w_{term}", 1.0)
    m.tcfg = c
    loss, logs = T3DLoss(c)(m(**_batch(cfg)))
    assert set(k for k in logs if k in ("clip", "local", "consistency")) == {term}
    loss.backward()
    g_img = m.image.net.conv1.weight.grad
    g_txt = m.text.bert.embeddings.word_embeddings.weight.grad
    assert g_img is not None and g_img.abs().sum() > 0, f"{term}: no gradient to the image encoder"
    if term != "consistency":  # consistency only touches the text through attention weights
        assert g_txt is not None and g_txt.abs().sum() > 0, f"{term}: no gradient to the text encoder"
    else:
        assert m.prototypes.grad is not None and m.prototypes.grad.abs().sum() > 0


@pytest.mark.parametrize("term", ["local", "consistency"])
def test_text_grad_false_stops_tma_at_the_text_tower(cfg, term):
    """tma.text_grad=false: the TMA terms still train the image tower and the token head, never the
    text tower; the clip term still trains the text tower."""
    torch.manual_seed(0)
    m = build_model(load_config(REPO / "configs/debug.yaml", ["tma.text_grad=false"]))
    c = TMAConfig(**{**m.tcfg.__dict__, "w_clip": 0.0, "w_local": 0.0, "w_consistency": 0.0, f"w_{term}": 1.0})
    m.tcfg = c
    T3DLoss(c)(m(**_batch(cfg)))[0].backward()
    assert m.image.net.conv1.weight.grad.abs().sum() > 0
    assert m.txt_local.weight.grad.abs().sum() > 0, f"{term}: the token head must still learn"
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.text.parameters()), f"{term} reached the text tower"
    m.zero_grad()
    m.tcfg = TMAConfig(**{**c.__dict__, "w_clip": 1.0, f"w_{term}": 0.0})
    T3DLoss(m.tcfg)(m(**_batch(cfg)))[0].backward()
    assert m.text.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_clip_low_when_aligned_logb_when_shuffled():
    torch.manual_seed(0)
    b = 16
    x = F.normalize(torch.randn(b, 32), dim=-1)
    assert clip_loss(x, x, torch.tensor(100.0)) < 1e-3
    y = F.normalize(torch.randn(b, 32), dim=-1)
    shuffled = clip_loss(x, y, torch.tensor(1.0))
    assert abs(float(shuffled) - math.log(b)) < 0.15


def test_pack_tokens_keeps_every_valid_token_and_the_local_loss():
    torch.manual_seed(0)
    tok = F.normalize(torch.randn(3, 7, 8), dim=-1)
    mask = torch.tensor([[0, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]]).float()
    packed, pm = pack_tokens(tok, mask)
    assert pm.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(packed[0, :2], tok[0, [1, 3]])
    torch.testing.assert_close(packed[2, 0], tok[2, 6])
    reg = F.normalize(torch.randn(3, 2, 5, 8), dim=-1)
    for pool in ("mean", "lse"):
        c = TMAConfig(token_pool=pool, kernel="torch")
        torch.testing.assert_close(local_alignment_loss(reg, packed, pm, c), local_alignment_loss(reg, tok, mask, c))


def test_sentence_loss_low_when_sentences_match_and_ignores_absent_ones():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 32), dim=-1)
    sents = F.normalize(img[:, None] + 0.05 * torch.randn(6, 4, 32), dim=-1)   # each study's sentences near it
    smask = torch.ones(6, 4, dtype=torch.bool)
    smask[0, 2:] = smask[3, 1:] = False
    scale = torch.tensor(50.0)
    aligned = sentence_loss(img, sents, smask, scale)
    shuffled = sentence_loss(img[torch.tensor([1, 2, 3, 4, 5, 0])], sents, smask, scale)
    assert aligned < 0.1 * shuffled
    # the volume -> sentence side is multi-positive: at best log(own sentences), and absent
    # sentences are neither positives nor negatives, whatever their embedding
    garbage = sents.clone()
    garbage[~smask] = F.normalize(torch.randn(int((~smask).sum()), 32), dim=-1)
    torch.testing.assert_close(sentence_loss(img, garbage, smask, scale), aligned)
    with pytest.raises(ValueError, match="disagree"):
        sentence_loss(img[:5], sents, smask, scale)


def test_sentence_term_trains_both_towers_and_needs_the_sentence_unit():
    from common.config import ConfigError
    from common.text import build_tokenizer, encode_reports

    with pytest.raises(ConfigError, match="w_sentence"):
        load_config(REPO / "configs/debug.yaml", ["tma.w_sentence=1.0"])
    cfg = load_config(REPO / "configs/debug.yaml", ["model.text_unit=sentence", "tma.w_sentence=1.0",
                                                    "tma.w_clip=0", "tma.enabled=false"])
    reports = ["No pleural effusion. Heart size is normal.", "A 6 mm nodule is seen.", "Cardiomegaly. No nodule."]
    tok = build_tokenizer(reports, 200)
    enc = encode_reports(tok, reports, "sentence", max_sentences=4, max_sentence_tokens=16)
    torch.manual_seed(0)
    m = build_model(cfg, len(tok))
    out = m(torch.rand(3, 1, *cfg.data.size), enc["input_ids"], enc["attention_mask"])
    assert out["sentences"].shape == (3, enc["input_ids"].shape[1], cfg.model.embed_dim) == (3, 2, cfg.model.embed_dim)
    assert out["sentence_mask"].sum(1).tolist() == [2, 1, 2]
    loss, logs = T3DLoss(cfg.tma)(out)
    assert set(logs) == {"sentence", "loss", "temperature"}
    loss.backward()
    assert m.image.net.conv1.weight.grad.abs().sum() > 0
    assert m.text.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_negated_sentences_are_hard_negatives_of_their_own_volume_only():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 16), dim=-1)
    sents = F.normalize(img[:, None] + 0.3 * torch.randn(4, 3, 16), dim=-1)
    smask = torch.ones(4, 3, dtype=torch.bool)
    scale = torch.tensor(20.0)
    base = sentence_loss(img, sents, smask, scale)
    # a flipped statement far from its volume costs ~nothing; one near it (the tower cannot tell
    # the polarity) costs, and so the gradient teaches the difference
    far = F.normalize(-img[:, None].expand(-1, 3, -1).clone(), dim=-1)
    near = sents.clone()
    nmask = torch.ones(4, 3, dtype=torch.bool)
    assert abs(float(sentence_loss(img, sents, smask, scale, far, nmask)) - float(base)) < 1e-3
    assert sentence_loss(img, sents, smask, scale, near, nmask) > base + 0.2
    # a negation is a negative for its own volume only: another volume's close statement does not count
    other = near[torch.tensor([1, 2, 3, 0])]
    mixed = sentence_loss(img, sents, smask, scale, other, nmask)
    assert mixed < sentence_loss(img, sents, smask, scale, near, nmask)
    # masked negations are ignored, whatever their embedding
    torch.testing.assert_close(sentence_loss(img, sents, smask, scale, near, torch.zeros_like(nmask)), base)
    with pytest.raises(ValueError, match="negations"):
        sentence_loss(img, sents, smask, scale, near[:3], nmask[:3])


def test_negate_sentence_flips_polarity_of_real_report_sentences(realdata):
    """On real CT-RATE report sentences (nobody here wrote them) every flip changes whether a
    negation cue is present, and keeps the sentence's other words."""
    import csv
    import re

    from common.text import negate_sentence, split_sentences

    cue = re.compile(r"\b(no|not|without)\b", re.I)
    rows = list(csv.DictReader(open(realdata / "ctclip_reports/train.csv", encoding="utf-8")))[:60]
    sents = [s for r in rows for s in split_sentences(r["report_text"])]
    assert len(sents) > 300
    for s in sents:
        n = negate_sentence(s)
        assert bool(cue.search(n)) != bool(cue.search(s)), (s, n)
        words = set(re.findall(r"[a-z]+", s.lower())) - {"no", "not", "without", "with", "a", "an"}
        assert words <= set(re.findall(r"[a-z]+", n.lower())) | {"evidence", "of"}, (s, n)
    assert negate_sentence("Pleural effusion-thickening was not observed.") == "Pleural effusion-thickening was observed."
    assert negate_sentence("Diffuse emphysema.") == "No diffuse emphysema."
    assert negate_sentence("There is a 9 mm nodule.") == "There is no 9 mm nodule."


def test_negated_sentences_reach_the_loss_through_the_model():
    from common.config import ConfigError
    from common.text import build_tokenizer, encode_reports

    with pytest.raises(ConfigError, match="negated_sentences"):
        load_config(REPO / "configs/debug.yaml", ["data.augment.negated_sentences=true"])
    cfg = load_config(REPO / "configs/debug.yaml", ["model.text_unit=sentence", "tma.w_sentence=1.0", "tma.w_clip=0",
                                                    "tma.enabled=false", "data.augment.negated_sentences=true"])
    reports = ["No pleural effusion. Heart size is normal.", "A 6 mm nodule is seen.", "Cardiomegaly. No nodule."]
    tok = build_tokenizer(reports + ["not"], 200)
    enc = encode_reports(tok, reports, "sentence", max_sentences=4, max_sentence_tokens=16, negations=True)
    assert enc["neg_input_ids"].shape[:2] == enc["input_ids"].shape[:2]
    assert tok.decode(enc["neg_input_ids"][1, 0], skip_special_tokens=True) == "a 6 mm nodule is not seen."
    torch.manual_seed(0)
    m = build_model(cfg, len(tok))
    img = torch.rand(3, 1, *cfg.data.size)
    out = m(img, enc["input_ids"], enc["attention_mask"], None, (enc["neg_input_ids"], enc["neg_attention_mask"]))
    assert out["negations"].shape == out["sentences"].shape
    assert torch.equal(out["negation_mask"], out["sentence_mask"])
    with_neg, _ = T3DLoss(cfg.tma)(out)
    out.pop("negations")
    without, _ = T3DLoss(cfg.tma)(out)
    assert with_neg > without                      # the negatives enter the softmax


def test_input_windows_add_exact_hu_channels():
    from common.config import ConfigError
    from trainer.model.image import ImageEncoder, InputWindows

    w = InputWindows([[-160.0, 240.0], [300.0, 1000.0]], [-1000.0, 1000.0])
    hu = torch.tensor([-1000.0, -850.0, 40.0, 700.0, 900.0, 1000.0])
    x = ((hu + 1000) / 2000).view(1, 1, -1)
    y = w(x)[0]
    torch.testing.assert_close(y[0], x[0, 0])
    torch.testing.assert_close(y[1], ((hu + 160) / 400).clamp(0, 1))
    torch.testing.assert_close(y[2], ((hu - 300) / 700).clamp(0, 1))
    cfg = load_config(REPO / "configs/debug.yaml", ["model.input_windows=[[-160,240],[300,1000]]"])
    assert cfg.model.input_range == cfg.data.hu_window
    enc = ImageEncoder(cfg.model)
    assert enc.net.conv1.in_channels == 3
    g, local, grid = enc(torch.rand(2, 1, *cfg.data.size))
    assert g.shape[0] == 2
    with pytest.raises(ConfigError, match="input_windows"):
        load_config(REPO / "configs/debug.yaml", ["model.input_windows=[[300,2000]]"])


def test_local_alignment_low_when_tokens_match_regions():
    torch.manual_seed(0)
    b, n, l, d = 8, 20, 6, 32
    regions = F.normalize(torch.randn(b, 1, n, d), dim=-1)
    tokens = regions[:, 0, :l].clone()                    # each report names regions of its own image
    mask = torch.ones(b, l)
    c = TMAConfig(attn_temperature=0.05, local_temperature=0.05)
    aligned = local_alignment_loss(regions, tokens, mask, c)
    shuffled = local_alignment_loss(regions, tokens[torch.randperm(b)], mask, c)
    rand = local_alignment_loss(regions, F.normalize(torch.randn(b, l, d), dim=-1), mask, c)
    assert aligned < 0.05
    assert shuffled > 1.0 and abs(float(rand) - math.log(b)) < 0.5


def test_token_pooling_respects_mask():
    torch.manual_seed(0)
    r = F.normalize(torch.randn(2, 10, 16), dim=-1)
    t = F.normalize(torch.randn(3, 5, 16), dim=-1)
    m = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    s = token_region_similarity(r, t, m, 0.1)
    t2 = t.clone()
    t2[0, 2:] = F.normalize(torch.randn(3, 16), dim=-1)  # masked tokens change: no effect
    assert torch.allclose(s, token_region_similarity(r, t2, m, 0.1), atol=1e-6)
    for pool in ("mean", "lse"):
        assert token_region_similarity(r, t, m, 0.1, pool=pool).shape == (2, 3)


def test_consistency_invariant_to_view_order_and_guarded():
    torch.manual_seed(0)
    scores = torch.tanh(torch.randn(16, 3, 8))
    c = TMAConfig()
    a, _ = consistency_loss(scores, c)
    b, _ = consistency_loss(scores[:, [2, 0, 1]], c)
    assert torch.allclose(a, b, atol=1e-6)
    # collapse guard: Sinkhorn spreads even a collapsed batch over all prototypes
    collapsed = torch.zeros(16, 8)
    collapsed[:, 0] = 1.0
    q = sinkhorn(collapsed + 0.01 * torch.randn(16, 8), c.sinkhorn_epsilon, 10)
    assert torch.allclose(q.sum(1), torch.ones(16), atol=1e-4)
    assert q.sum(0).min() > 16 / 8 * 0.5
    with pytest.raises(ValueError, match="2 views"):
        consistency_loss(scores[:, :1], c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_nan_at_low_precision_boundaries(dtype):
    torch.manual_seed(0)
    x = F.normalize(torch.randn(8, 16), dim=-1).to(dtype)
    assert torch.isfinite(clip_loss(x, x, torch.tensor(100.0, dtype=dtype)))         # max logit scale
    assert torch.isfinite(clip_loss(x, torch.zeros_like(x), torch.tensor(100.0)))    # degenerate text
    r = F.normalize(torch.randn(4, 1, 6, 16), dim=-1).to(dtype)
    t = F.normalize(torch.randn(4, 5, 16), dim=-1).to(dtype)
    m = torch.zeros(4, 5)
    m[0, 0] = 1                                                                       # nearly empty reports
    c = TMAConfig(attn_temperature=0.01, local_temperature=0.01)
    for pool in ("mean", "lse"):
        c.token_pool = pool
        assert torch.isfinite(local_alignment_loss(r, t, m, c))
    extreme = torch.tensor([1.0, -1.0]).repeat(8, 2, 4).to(dtype)                    # saturated cosines
    loss, ent = consistency_loss(extreme, TMAConfig(sinkhorn_epsilon=0.01, student_temperature=0.01))
    assert torch.isfinite(loss) and torch.isfinite(ent)


@pytest.mark.parametrize("pool", ["mean", "max", "gem"])
def test_image_pool_keeps_a_local_finding(pool):
    """``model.image_pool``: one region of 75 lighting up moves the pooled feature by 1/75 of the bump
    under mean pooling, by all of it under max, and in between under GeM; the encoder uses it."""
    from trainer.model.image import pool_regions

    torch.manual_seed(0)
    base = torch.rand(2, 75, 8)
    bump = base.clone()
    bump[:, 7] += 3.0
    shift = (pool_regions(bump, pool) - pool_regions(base, pool)).mean().item()
    lo, hi = {"mean": (3 / 75 - 1e-5, 3 / 75 + 1e-5), "max": (2.0, 3.0), "gem": (0.3, 2.0)}[pool]
    assert lo <= shift <= hi, (pool, shift)
    cfg = load_config(REPO / "configs/debug.yaml", [f"model.image_pool={pool}"])
    model = build_model(cfg, 64).eval()
    g, local, _ = model.image(torch.randn(2, 1, 40, 40, 20))
    assert torch.allclose(g, pool_regions(local, pool))
    with pytest.raises(Exception, match="model.image_pool"):
        load_config(REPO / "configs/debug.yaml", ["model.image_pool=avg"])


def test_batchnorm_with_bf16_params_and_fp32_buffers():
    """DeepSpeed's bf16 casts parameters but keeps buffers fp32: BatchNorm's running statistics
    then stay fp32 (the paper preset failed on an H200 with 'Expected running_mean to have type
    BFloat16'). The encoder must run and update its statistics as the fp32 model does."""
    import copy

    cfg = load_config(REPO / "configs/debug.yaml", ["model.image_norm=batch"])
    torch.manual_seed(0)
    ref = build_model(cfg, 64).train()
    low = copy.deepcopy(ref)
    for p in low.parameters():
        p.data = p.data.to(torch.bfloat16)
    x = torch.randn(2, 1, 40, 40, 20)
    g_ref = ref.image(x)[0]
    g_low = low.image(x.to(torch.bfloat16))[0]
    assert g_low.dtype == torch.bfloat16
    assert torch.allclose(g_low.float(), g_ref, atol=0.05, rtol=0.05), (g_low.float() - g_ref).abs().max()
    bn_ref, bn_low = ref.image.net.bn1, low.image.net.bn1
    assert bn_low.running_mean.dtype == torch.float32 and int(bn_low.num_batches_tracked) == 1
    assert torch.allclose(bn_low.running_var, bn_ref.running_var, rtol=0.02)
    assert not torch.equal(bn_low.running_mean, torch.zeros_like(bn_low.running_mean))
    g_low.float().sum().backward()
    assert bn_low.weight.grad is not None and bn_low.weight.grad.dtype == torch.bfloat16


def test_paper_scale_parameter_count():
    cfg = load_config(REPO / "configs/t3d.yaml")
    with torch.device("meta"):
        m = build_model(cfg)
    n = count_parameters(m)
    assert 45e6 < n["image"] < 48e6        # MONAI 3D ResNet-50, 1 channel, no fc: 46.2M
    assert 108e6 < n["text"] < 111e6       # BERT-base without pooler: 109.5M


# ------------------------------------------------------------------- 2 processes == 1 process
def _embeddings(seed, b):
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(2 * b) % 5 + 1                            # valid tokens a report: ranks' longest differ
    mask = (torch.arange(5)[None] < n[:, None]).float()
    return (torch.randn(2 * b, 10, generator=g), torch.randn(2 * b, 4, 8, generator=g),
            torch.randn(2 * b, 5, 8, generator=g), mask)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.a = torch.nn.Linear(10, 6)
        self.b = torch.nn.Linear(10, 6)
        self.r = torch.nn.Linear(8, 8)
        self.t = torch.nn.Linear(8, 8)
        self.s = torch.nn.Linear(8, 6)

    def loss(self, feats, regions, tokens, token_mask):
        img = F.normalize(self.a(feats), dim=-1)
        txt = F.normalize(self.b(feats.flip(-1)), dim=-1)
        reg = F.normalize(self.r(regions), dim=-1).unsqueeze(1)
        tok = F.normalize(self.t(tokens), dim=-1)
        tok, mask = pack_tokens(tok, token_mask)                # packed: the ranks' token counts differ
        sents = F.normalize(self.s(tokens), dim=-1)             # 5 "sentences" a report, some absent
        smask = tokens[..., 0] > -0.5
        smask[:, 0] = True
        return (clip_loss(img, txt, torch.tensor(10.0)) + local_alignment_loss(reg, tok, mask, TMAConfig())
                + sentence_loss(img, sents, smask, torch.tensor(10.0)))


def _worker(rank, world, b, path, init):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    m = _Tiny()
    f, r, t, tm = _embeddings(0, b)
    sl = slice(rank * b, (rank + 1) * b)
    loss = m.loss(f[sl], r[sl], t[sl], tm[sl])
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters()])
    dist.all_reduce(grads)
    grads /= world
    lt = loss.detach().clone()
    dist.all_reduce(lt)
    agree = (ranks_agree(b, 3), ranks_agree(b, rank))      # the sentence term's shape check
    if rank == 0:
        torch.save({"loss": lt / world, "grads": grads, "agree": agree}, path)
    dist.barrier()                 # nobody tears gloo down while a peer still uses it
    dist.destroy_process_group()
    # CI once saw a rank abort at interpreter exit ("terminate called without an active exception")
    # in a gloo thread's destructor, after all results were written; skip C++ teardown.
    os._exit(0)


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_rank_double_batch(tmp_path):
    import torch.multiprocessing as mp

    b = 4
    path = str(tmp_path / "dist.pt")
    init = f"file://{tempfile.mktemp(dir=tmp_path)}"
    mp.spawn(_worker, args=(2, b, path, init), nprocs=2, join=True)
    got = torch.load(path)
    m = _Tiny()
    f, r, t, tm = _embeddings(0, b)
    ref = m.loss(f, r, t, tm)
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert torch.allclose(got["loss"], ref.detach(), atol=1e-5), (got["loss"], ref)
    assert torch.allclose(got["grads"], ref_grads, atol=1e-5), (got["grads"] - ref_grads).abs().max()
    assert got["agree"] == (True, False)


def test_tokenizer_from_reports_is_reproducible(realdata):
    """Built from real CT-RATE report texts: same texts -> same vocabulary and ids, in any order."""
    import csv

    from common.text import build_tokenizer

    rows = list(csv.DictReader(open(realdata / "ctclip_reports/train.csv", encoding="utf-8")))[:200]
    texts = [r["report_text"] for r in rows]
    a, b = build_tokenizer(texts, 2000), build_tokenizer(texts[::-1], 2000)
    assert a.get_vocab() == b.get_vocab() and 1000 < len(a) <= 2000
    enc = a(["Bilateral pleural effusion is not present."])["input_ids"][0]
    assert a.convert_ids_to_tokens(enc)[1:4] == ["bilateral", "pleural", "effusion"]
    assert a.convert_ids_to_tokens(a("xyzzyq")["input_ids"])[1] == "x"   # unseen word -> characters


def test_sentence_unit_is_the_mean_of_its_sentences():
    """model.text_unit=sentence: a report's embedding is the normalized mean of its sentences'
    projected embeddings, each sentence encoded on its own (and its own prompt is one sentence)."""
    from common.text import build_tokenizer, encode_reports, split_sentences

    cfg = load_config(REPO / "configs/debug.yaml", ["model.text_unit=sentence"])
    reports = ["Findings: Heart size is normal. No pleural effusion.\nImpression: Cardiomegaly; emphysema.",
               "Findings: A 6 mm nodule is seen."]
    assert split_sentences(reports[0]) == ["Heart size is normal.", "No pleural effusion.", "Cardiomegaly;",
                                           "emphysema."]
    tok = build_tokenizer(reports, 200)
    enc = encode_reports(tok, reports, "sentence", max_sentences=3, max_sentence_tokens=16)
    assert enc["input_ids"].shape[:2] == (2, 3)                      # cut at max_sentences
    assert enc["attention_mask"][1, 1:].sum() == 0                   # report 2 has one sentence
    torch.manual_seed(0)
    m = build_model(cfg, len(tok)).eval()
    with torch.no_grad():
        txt, tokens, tmask = m.encode_text(enc["input_ids"], enc["attention_mask"])
        alone = []
        for s in split_sentences(reports[0])[:3]:
            e = tok([s], return_tensors="pt")
            pooled, _ = m.text(e["input_ids"], e["attention_mask"])
            alone.append(m.txt_proj(pooled)[0])
    torch.testing.assert_close(txt[0], F.normalize(torch.stack(alone).mean(0), dim=-1), atol=1e-5, rtol=1e-5)
    n_content = [(enc["attention_mask"][b].sum(-1).clamp_min(2) - 2) * (enc["attention_mask"][b, :, 0] > 0)
                 for b in range(2)]
    assert tokens.shape[:2] == tmask.shape == (2, 3 * enc["input_ids"].shape[2])
    assert [int(tmask[b].sum()) for b in range(2)] == [int(n.sum()) for n in n_content]
    with pytest.raises(ValueError, match="at least one sentence"):
        m.encode_text(enc["input_ids"], torch.zeros_like(enc["attention_mask"]))
