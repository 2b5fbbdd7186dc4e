"""The benchmarks run end to end on tiny inputs and print what RESULTS.md quotes (no timing is
asserted: speed targets are read from the printed ratios, never checked by a unit test)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ingest_benchmark_runs_both_sides(capsys):
    from benchmarks import ingest

    assert ingest.main(["--config", str(REPO / "configs/debug.yaml"), "--n", "4", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ours\s+4 volumes", out, re.M), out          # every phantom was ingested
    assert re.search(r"^monai\s+4 volumes", out, re.M), out
    assert re.search(r"ingest, debug\.yaml: ratio x\d+\.\d\d", out), out


def test_stream_benchmark_runs_both_sides(capsys):
    from benchmarks import stream

    assert stream.main(["--config", str(REPO / "configs/debug.yaml"), "--n", "5", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"^ours\s+(\d+) volumes", out, re.M).group(1))
    assert n > 0 and n % 2 == 0, out                                # reps x the train split
    assert re.search(r"stream, 2 views, debug\.yaml: ours [\d.]+ vs MONAI [\d.]+ volumes/s per core, ratio x\d+\.\d\d",
                     out), out
