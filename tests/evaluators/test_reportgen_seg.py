"""Report generation and segmentation: metrics against hand-computed cases, the decoder and the
UNet learn what they are shown, real organ masks (TotalSegmentator) go through ingest into Dice."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from evaluators.tasks.reportgen import ReportDecoder, caption_metrics, clean_report, train_and_generate
from evaluators.tasks.segmentation import ResNetUNet, dice_per_class, finetune
from tests.conftest import REPO

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR (pycocoevalcap) needs a Java runtime")


def test_clean_report():
    assert clean_report("Findings: Heart is ENLARGED, 3.5 mm nodule.\nNo effusion.") == \
        "findings : heart is enlarged , 3.5 mm nodule . no effusion ."


@needs_java
def test_caption_metrics_hand_case():
    # hyp "the cat the cat" vs ref "the cat sat on the mat":
    # 1-grams clipped: the 2/2, cat 1/2 -> 3/4; 2-grams: "the cat" 1 (clipped), "cat the" 0 -> 1/3
    # brevity penalty exp(1 - 6/4); BLEU-1 = BP * 3/4, BLEU-2 = BP * sqrt(3/4 * 1/3) = BP / 2
    m = caption_metrics(["The cat sat on the mat"], ["the cat the cat"])
    bp = math.exp(1 - 6 / 4)
    assert m["bleu1"] == pytest.approx(bp * 0.75, rel=1e-6)
    assert m["bleu2"] == pytest.approx(bp * 0.5, rel=1e-6)
    # ROUGE-L (beta 1.2): LCS("heart enlarged", "a heart is enlarged .") = 2; P = 1, R = 2/5
    r = caption_metrics(["A heart is enlarged."], ["heart enlarged"], meteor=False)["rouge_l"]
    p_, r_ = 1.0, 0.4
    assert r == pytest.approx((1 + 1.2 ** 2) * p_ * r_ / (r_ + 1.2 ** 2 * p_), rel=1e-6)
    same = caption_metrics(["No pleural effusion."], ["no pleural effusion ."])
    assert same["meteor"] == pytest.approx(1.0, abs=1e-6) and same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert caption_metrics(["No pleural effusion."], ["cardiomegaly"])["meteor"] == 0.0
    with pytest.raises(ValueError, match="as many hypotheses"):
        caption_metrics(["a", "b"], ["a"])


def test_decoder_writes_the_report_its_image_shows():
    """Two kinds of image memory, two reports: after training, unseen memories of each kind get
    their own report back word for word (the decoder reads the image, not a prior)."""
    from common.text import build_tokenizer

    reports = ["Cardiomegaly is present. No pleural effusion.", "Left pleural effusion is present. Heart normal."]
    tok = build_tokenizer(reports * 3, 200)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 1, 16, generator=g) * 3

    def memories(kinds):
        return torch.stack([centers[k].expand(5, 16) + 0.1 * torch.randn(5, 16, generator=g) for k in kinds])

    kinds = [i % 2 for i in range(16)]
    texts, loss = train_and_generate(memories(kinds), [reports[k] for k in kinds], memories([0, 1, 1, 0]),
                                     tok, max_len=24, steps=150, seed=0)
    assert loss < 0.05
    want = [reports[k] for k in (0, 1, 1, 0)]
    assert [clean_report(t) for t in texts] == [clean_report(w) for w in want]
    assert caption_metrics(want, texts, meteor=False)["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_decoder_stops_at_max_len():
    dec = ReportDecoder(vocab=10, feat_dim=4, max_len=6)
    seqs = dec.generate(torch.zeros(3, 2, 4), bos=1, eos=2)
    assert len(seqs) == 3 and all(len(s) <= 5 and 2 not in s for s in seqs)


def test_dice_hand_case():
    # class 1: volume A 2*1/(2+1), volume B 1 -> mean 5/6; class 2: 0 then 1 -> 1/2; class 3 never present
    a_pred, ref = torch.tensor([[[1, 1, 0, 0]]]), torch.tensor([[[1, 0, 0, 2]]])
    d = dice_per_class([a_pred, ref], [ref, ref], 3)
    assert d[0] == pytest.approx(5 / 6) and d[1] == pytest.approx(0.5) and np.isnan(d[2])
    with pytest.raises(ValueError, match="differ"):
        dice_per_class([torch.zeros(2, 2, 2)], [torch.zeros(2, 2, 3)], 1)


@pytest.mark.parametrize("preset", ["debug", "small_bottleneck"])
def test_unet_keeps_odd_input_shapes(debug_cfg, preset):
    import dataclasses

    from trainer.model.image import ImageEncoder

    m = debug_cfg.model
    if preset == "small_bottleneck":      # the paper's block type and max-pool stem, narrow
        m = dataclasses.replace(m, image_block="bottleneck", image_widths=[8, 8, 8, 8], conv1_size=7,
                                no_max_pool=False)
    net = ResNetUNet(ImageEncoder(m), n_classes=3)
    x = torch.randn(1, 1, 37, 45, 21)
    assert net(x).shape == (1, 4, 37, 45, 21)


def _totalseg_folder(realdata, tmp_path, with_mask_on_test=True):
    """The real TotalSegmentator CT twice (a train and a test study), its mask remapped to
    1 liver, 2 spleen, 3 kidneys (TotalSegmentator ids 5, 1, 2+3; other organs background)."""
    import nibabel as nib

    seg = nib.load(str(realdata / "totalseg/example_seg.nii.gz"))
    lab = np.asarray(seg.dataobj)
    out = np.zeros(lab.shape, np.uint8)
    out[lab == 5], out[lab == 1], out[np.isin(lab, [2, 3])] = 1, 2, 3
    root = tmp_path / "folder"
    root.mkdir()
    nib.save(nib.Nifti1Image(out, seg.affine), str(root / "organs.nii.gz"))
    ct = realdata / "totalseg/example_ct_sm.nii.gz"
    rows = ["id,image,report,split,mask",
            f"a,{ct},Liver and spleen are unremarkable.,train,organs.nii.gz",
            f"b,{ct},Liver and spleen are unremarkable.,test,{'organs.nii.gz' if with_mask_on_test else ''}"]
    (root / "reports.csv").write_text("\n".join(rows) + "\n")
    return root


def _seg_cfg():
    from common.config import load_config

    # the CT is 122x101x30 voxels of 3 mm: 4x4x3 mm on a 96x96x32 grid keeps all of it
    return load_config(REPO / "configs/debug.yaml", ["data.spacing=[4,4,3]", "data.size=[96,96,32]",
                                                     "eval.seg_classes=[liver,spleen,kidney]"])


def test_segmentation_learns_real_organs(realdata, tmp_path):
    from data_service import ingest
    from data_service.preprocess import to_model_input
    from evaluators.tasks.features import load_volumes
    from trainer.model.image import ImageEncoder

    cfg = _seg_cfg()
    shards = tmp_path / "shards"
    ingest.run("folder", str(_totalseg_folder(realdata, tmp_path)), str(shards), cfg.data, workers=1,
               progress=False)
    tr, te = load_volumes(str(shards), "train", masks=True), load_volumes(str(shards), "test", masks=True)
    y = tr["y"][0].long()
    assert tr["hu"].shape == (1, 1, 96, 96, 32) and set(torch.unique(y).tolist()) == {0, 1, 2, 3}
    # RAS after ingest (i grows toward the patient's right): the liver at high i, the spleen at low i
    ii = torch.arange(96)[:, None, None].expand(96, 96, 32)
    assert ii[y[0] == 1].float().mean() > ii[y[0] == 2].float().mean() + 20
    torch.manual_seed(0)
    dice, loss = finetune(ImageEncoder(cfg.model), tr["hu"], tr["y"], te["hu"], te["y"], n_classes=3, steps=40,
                          seed=0, lr=3e-3, batch=1, prep=lambda hu: to_model_input(hu, cfg.data))
    assert dice[0] > 0.6, dice        # the liver, the largest organ, is learnt (same volume held out)
    assert np.isfinite(dice).all() and np.isfinite(loss)


def test_segmentation_needs_masks(realdata, tmp_path):
    from data_service import ingest
    from evaluators.tasks.features import load_volumes

    cfg = _seg_cfg()
    shards = tmp_path / "shards"
    ingest.run("folder", str(_totalseg_folder(realdata, tmp_path, with_mask_on_test=False)), str(shards),
               cfg.data, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"sample 'b' in split 'test' has no mask member"):
        load_volumes(str(shards), "test", masks=True)
    with pytest.raises(ValueError, match=r"split 'valid' has no samples"):
        load_volumes(str(shards), "valid")
