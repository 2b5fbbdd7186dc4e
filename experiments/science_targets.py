"""`make science-targets`: are issue #9's targets met over the seeds `make science` has run?

    python -m experiments.science_targets [--out runs] [--prompts single] [--min-seeds 3] [--check]

Reads every ``{out}/science-s{seed}.json`` (written by ``experiments.science``) and prints:
- per planted finding, the zero-shot AUC of CLIP-only and CLIP+TMA at each seed, their mean and
  standard deviation over the seeds, and TMA - CLIP per seed with its paired bootstrap 95% CI.
  The CI covers the test studies only; the spread over seeds is the training run's own variation,
  which one seed's CI does not show (a finding can move by 0.1 between two seeds of the same run);
- the targets, each met or not, with the numbers behind it:
  1. CLIP-only mean AUC over the 8 planted findings >= 0.85 at every seed;
  2. CLIP+TMA mean >= 0.88 at every seed, and every planted finding >= 0.75 at every seed;
  3. CLIP+TMA better than CLIP-only on each small local finding by more than the CI (the paired
     CI's lower bound above 0) at every seed;
  all over at least ``--min-seeds`` seeds of the same phantom set and settings.
``--check`` exits 1 when a target is not met (2 when the reports cannot be read or do not agree).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from experiments.science import PLANTED, SMALL

CLIP_MEAN, TMA_MEAN, TMA_EACH = 0.85, 0.88, 0.75


def load(out: Path) -> dict[int, dict]:
    """``{seed: report}`` from ``out/science-s*.json``; ValueError naming the file when one is not a
    complete two-variant report, or when the reports come from different phantom sets."""
    reports = {}
    for p in sorted(out.glob("science-s*.json")):
        m = re.fullmatch(r"science-s(\d+)\.json", p.name)
        if not m:
            continue
        try:
            r = json.loads(p.read_text())
            per = r["summary"]["single"]["per_label"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{p}: not a experiments.science report ({type(e).__name__}: {e})") from None
        missing = [f"{f}/{v}" for f in PLANTED for v in ("clip", "tma", "delta") if v not in per.get(f, {})]
        if missing:
            raise ValueError(f"{p}: needs both variants scored (CLIP-only and CLIP+TMA); missing {missing[:3]}")
        reports[int(m.group(1))] = r
    sets = {(r.get("data_seed"), r.get("n")) for r in reports.values()}
    if len(sets) > 1:
        raise ValueError(f"{out}: the reports come from different phantom sets (data_seed, n): {sorted(sets, key=str)}")
    return reports


def evaluate(reports: dict[int, dict], prompts: str = "single", min_seeds: int = 3) -> tuple[str, dict[str, bool]]:
    """The per-label table over seeds and ``{target: met}``."""
    seeds = sorted(reports)
    per = {s: reports[s]["summary"][prompts]["per_label"] for s in seeds}
    lines = [f"zero-shot AUC on held-out phantoms, {prompts} prompts, seeds {seeds}",
             f"{'finding':30s} {'CLIP per seed':>22s} {'mean ± sd':>14s}   {'CLIP+TMA per seed':>22s} {'mean ± sd':>14s}   "
             "TMA - CLIP per seed [paired 95% CI]"]

    def row(vals: list[float]) -> str:
        return f"{' '.join(f'{x:.3f}' for x in vals):>22s} {np.mean(vals):6.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f}"

    for f in PLANTED:
        c, t = [per[s][f]["clip"][0] for s in seeds], [per[s][f]["tma"][0] for s in seeds]
        d = "  ".join(f"{per[s][f]['delta'][0]:+.3f} [{per[s][f]['delta'][1]:+.3f}, {per[s][f]['delta'][2]:+.3f}]" for s in seeds)
        lines.append(f"{f:30s} {row(c)}   {row(t)}   {d}")
    means = {v: [float(np.mean([per[s][f][v][0] for f in PLANTED])) for s in seeds] for v in ("clip", "tma")}
    lines.append(f"{'mean (8 planted)':30s} {row(means['clip'])}   {row(means['tma'])}")

    worst = {s: min(PLANTED, key=lambda f: per[s][f]["tma"][0]) for s in seeds}
    small_lo = {f: [per[s][f]["delta"][1] for s in seeds] for f in SMALL}
    targets = [  # (target, met, the numbers behind it)
        (f"at least {min_seeds} seeds", len(seeds) >= min_seeds, f"{len(seeds)} found"),
        (f"CLIP-only mean >= {CLIP_MEAN} at every seed", all(m >= CLIP_MEAN for m in means["clip"]),
         " ".join(f"{m:.3f}" for m in means["clip"])),
        (f"CLIP+TMA mean >= {TMA_MEAN} at every seed", all(m >= TMA_MEAN for m in means["tma"]),
         " ".join(f"{m:.3f}" for m in means["tma"])),
        (f"CLIP+TMA every planted finding >= {TMA_EACH} at every seed",
         all(per[s][worst[s]]["tma"][0] >= TMA_EACH for s in seeds),
         "lowest: " + ", ".join(f"s{s} {worst[s]} {per[s][worst[s]]['tma'][0]:.3f}" for s in seeds)),
        *((f"CLIP+TMA beats CLIP-only on {f} beyond the CI at every seed", all(lo > 0 for lo in small_lo[f]),
           "CI lower bounds " + " ".join(f"{lo:+.3f}" for lo in small_lo[f])) for f in SMALL),
    ]
    met = {k: ok for k, ok, _ in targets}
    lines.append("\ntargets (issue #9)")
    lines += [f"  [{'met' if ok else 'NOT met'}] {k}: {why}" for k, ok, why in targets]
    sets = {tuple(reports[s].get("overrides", [])) for s in seeds}
    if len(sets) > 1:
        lines.append("\nnote: the seeds' runs used different --set overrides: "
                     + "; ".join(f"s{s}: {reports[s].get('overrides')}" for s in seeds))
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs", help="the folder holding science-s{seed}.json (experiments.science --out)")
    p.add_argument("--prompts", choices=["single", "ensemble"], default="single")
    p.add_argument("--min-seeds", type=int, default=3)
    p.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    a = p.parse_args(argv)
    try:
        reports = load(Path(a.out))
    except ValueError as e:
        print(f"science_targets: {e}", file=sys.stderr)
        return 2
    if not reports:
        print(f"science_targets: no science-s*.json under {a.out} (run `make science` first)", file=sys.stderr)
        return 2
    text, met = evaluate(reports, a.prompts, a.min_seeds)
    print(text)
    return 1 if a.check and not all(met.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
