"""The benchmarks run end to end on tiny inputs and print what RESULTS.md quotes (no timing is
asserted: speed targets are read from the printed ratios, never checked by a unit test)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_ingest_benchmark_runs_both_sides(capsys):
    from benchmarks import ingest

    assert ingest.main(["--config", str(REPO / "configs/debug.yaml"), "--n", "4", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ours\s+4 volumes", out, re.M), out          # every phantom was ingested
    assert re.search(r"^monai\s+4 volumes", out, re.M), out
    assert re.search(r"ingest, debug\.yaml: ratio x\d+\.\d\d", out), out


def test_stream_benchmark_runs_every_side(capsys):
    from benchmarks import stream

    assert stream.main(["--config", str(REPO / "configs/debug.yaml"), "--n", "5", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"^ours\s+(\d+) volumes", out, re.M).group(1))
    assert n > 0 and n % 2 == 0, out                                # reps x the train split
    assert re.search(r"stream, 2 views, debug\.yaml: ours [\d.]+ vs MONAI [\d.]+ volumes/s per core, ratio x\d+\.\d\d",
                     out), out
    assert re.search(r"views cut on the device, debug\.yaml: [\d.]+ volumes/s per loader core, x\d+\.\d\d the "
                     r"loader-cut stream, x\d+\.\d\d MONAI; the cut then costs the trainer [\d.]+ ms", out), out


def test_train_step_benchmark_counts_flops_per_stage(capsys):
    """The GPU throughput benchmark (benchmarks/gpu.sh) on the CPU at the debug grid: every run spec
    trains, and the printed MFU rests on a FLOP count that scales with the batch."""
    from benchmarks import train_step

    assert train_step.main(["--config", str(REPO / "configs/debug.yaml"), "--runs", "0", "2+b2",
                            "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^run\s+(\S+): batch (\d+) .* ([\d.]+) samples/s .* loss ([\d.]+)$", out, re.M)
    assert [(r[0], r[1]) for r in rows] == [("0", "4"), ("2+b2", "2")], out
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows), out
    flops = float(re.search(r"model FLOPs per sample \(fwd\+bwd\): ([\d.e+-]+) TFLOP", out).group(1))
    assert 1e-4 < flops < 1e-1, out                        # the debug model at 80x80x40: a few GFLOP
    assert train_step.main(["--config", str(REPO / "configs/debug.yaml"), "--runs", "9"]) == 1   # bad stage: reported


def test_supervised_ceiling_runs_on_shards(phantom, capsys):
    """The science diagnosis' supervised ceiling trains on the labels and prints an AUC per planted finding."""
    from benchmarks import supervised_ceiling

    assert supervised_ceiling.main(["--config", str(REPO / "configs/debug.yaml"), "--set",
                                    f"data.shards={phantom / 'shards'}", "--steps", "2", "--batch", "2",
                                    "--test-split", "valid"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(.+?)\s+AUC (nan|[01]\.\d{3})  \(positives (\d+)/(\d+)\)$", out, re.M)
    assert [r[0] for r in rows] == list(supervised_ceiling.PLANTED), out
    assert all(r[1] == "nan" or 0 < int(r[2]) < int(r[3]) for r in rows), out      # nan only without both classes
    # the simplest detector on a subset of the findings; an unknown finding is refused by name
    args = ["--config", str(REPO / "configs/debug.yaml"), "--set", f"data.shards={phantom / 'shards'}", "--steps", "2",
            "--batch", "2", "--test-split", "valid", "--net", "conv", "--conv-stride", "2"]
    assert supervised_ceiling.main([*args, "--labels", "Lung nodule,Cardiomegaly"]) == 0
    out = capsys.readouterr().out
    assert "one conv (stride 2, max pool)" in out, out
    assert re.findall(r"^(.+?)\s+AUC ", out, re.M) == ["Lung nodule", "Cardiomegaly", "mean (2 trained)"]
    assert re.search(r"training studies \(memorisation check\): Lung nodule (nan|[01]\.\d{3}), Cardiomegaly", out), out
    assert supervised_ceiling.main([*args, "--labels", "Cardiomegaly", "--augment", "--shift", "2"]) == 0
    assert "flips + shifts up to 2 voxels" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="Nodule"):
        supervised_ceiling.main([*args, "--labels", "Nodule"])


@pytest.mark.parametrize("mode, what", [("--restore", "image only"), ("--restore-text", "text-informed")])
def test_supervised_ceiling_restoration_only_then_a_linear_probe(phantom, capsys, mode, what):
    """Restoration alone (no labels, no contrastive term) pretrains the encoder, which is then frozen
    and probed linearly per finding, beside its random init."""
    from benchmarks import supervised_ceiling

    args = ["--config", str(REPO / "configs/debug.yaml"), "--set", f"data.shards={phantom / 'shards'}",
            "--set", "restore.block_size=[8,8,4]", "--set", "restore.width=32", "--steps", "2", "--batch", "2",
            "--test-split", "train", "--labels", "Lung nodule,Arterial wall calcification,Cardiomegaly"]
    assert supervised_ceiling.main([*args, mode]) == 0          # probed on train: classes to fit and score
    out = capsys.readouterr().out
    assert f"restoration only, {what}" in out and "then a frozen linear probe" in out, out
    assert "blocks [8, 8, 4] voxels" in out, out
    rows = re.findall(r"^(.+?)\s+AUC (nan|[01]\.\d{3})  \(positives (\d+)/(\d+); random init (nan|[01]\.\d{3})\)$",
                      out, re.M)
    assert [r[0] for r in rows] == ["Lung nodule", "Arterial wall calcification", "Cardiomegaly"], out
    assert any(r[1] != "nan" and r[4] != "nan" for r in rows), out      # the probe ran, on both encoders
    assert re.search(r"last restore loss \(mse\) \d\.\d{5}", out), out
    with pytest.raises(SystemExit, match="--net conv"):
        supervised_ceiling.main([*args, mode, "--net", "conv"])


def test_term_signal_trains_each_term_alone(phantom, capsys):
    """Each term trains alone and is printed beside log(B). With views that are the whole volume
    (scale 1, the volume's size, no flips, jitter or noise), the view<->report term sees exactly
    what the global term sees: same init, same batches, so the same losses step by step."""
    from benchmarks import term_signal
    from common.config import load_config
    from trainer.pretrain import prepare_tokenizer

    sets = [f"data.shards={phantom / 'shards'}"]
    args = ["--config", str(REPO / "configs/debug.yaml"), "--steps", "4", "--batch", "2", "--every", "2"]
    assert term_signal.main([*args, *sum((["--set", s] for s in sets), [])]) == 0
    out = capsys.readouterr().out
    assert "chance log(B) = 0.693" in out, out
    rows = dict(re.findall(r"^(\w+)\s+2: [\d.]+  4: [\d.]+  \| last/chance ([\d.]+)", out, re.M))
    assert sorted(rows) == sorted(term_signal.TERMS), out

    same = sets + ["data.views.scale=[1.0,1.0]", "data.views.size=[80,80,40]", "data.views.flip_prob=0",
                   "data.views.intensity_jitter=0", "data.views.noise_std=0"]
    cfg = load_config(REPO / "configs/debug.yaml", same)
    tok = prepare_tokenizer(cfg, phantom / "term-signal")
    clip = term_signal.run_term("clip", cfg, tok, 3, 2, 1)
    view = term_signal.run_term("view_clip", cfg, tok, 3, 2, 1)
    assert [s for s, _ in clip] == [1, 2, 3]
    assert [v for _, v in clip] == pytest.approx([v for _, v in view], rel=1e-4), (clip, view)
    with pytest.raises(SystemExit, match="nope"):
        term_signal.main([*args, "--terms", "clip,nope"])
