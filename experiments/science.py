"""`make science`: does pretraining learn? CLIP-only vs CLIP+TMA (and the restoration variants) on phantoms, through the real trainer.

    python -m experiments.science [--seed 0] [--n 1200] [--data-seed 0] [--steps N] [--out runs]
    python -m experiments.science --generator synth --external synth_ext [--external-data-seed S]   # + external
    python -m experiments.science --variants clip,tma,clip_restore,tma_restore [--segmentation]

1. phantoms (``data_service.synth``, held-out reports in the second wording bank) and ingest with
   ``configs/phantom.yaml``, once per data seed (``data/phantom-d{data_seed}/``);
   then the text tower's pretraining, once (``python -m trainer.text_mlm``: masked-language
   modelling on the train reports and 800 real CT-RATE reports, ``--text-corpus``; the paper's
   MedCPT is not available offline), into ``{out}/text-mlm-{key}/``, which both runs load as
   ``model.text_encoder`` (``--text-mlm-steps 0``: a from-scratch text tower, as before);
2. ``python -m trainer.pretrain`` once per variant (``--variants``, default ``clip,tma``; ``VARIANTS``
   below), the same command users run (Ray Train, 2 DeepSpeed workers): CLIP only
   (``tma.enabled=false``) into ``{out}/phantom-clip/s{seed}/``, CLIP+TMA into
   ``{out}/phantom-tma/s{seed}/``, CLIP+restore into ``{out}/phantom-clip_restore/s{seed}/`` ...,
   same seed, same data order;
3. every variant's last checkpoint scored by the evaluators (``evaluators.scoring.Scoring``):
   zero-shot on held-out phantoms with CT-RATE's prompts and with the prompt ensemble, linear probes
   of the image and of the report embeddings, retrieval (with ``--segmentation`` also the
   segmentation task: pretrained against random-init Dice); the per-label table with bootstrap 95%
   CIs, and per variant the paired bootstrap CI of its AUC difference to CLIP-only per label
   (``delta``: TMA - CLIP, as before; ``delta_<variant>`` for the others).
4. with ``--external GENERATOR``: a second phantom set from ``data_service.<GENERATOR>`` (same CLI and
   CT-RATE layout; ``--external-data-seed``, default the data seed, or the next one when it is the
   training generator) is ingested the same way, and both checkpoints are scored on it too, by the
   evaluators' external protocol (its own valid/test/train splits): the same tables for it, and the
   in-distribution and external figures side by side. ``make science EXTERNAL=synth_ext`` runs it both
   ways round (train on synth, score synth + synth_ext; train on synth_ext, score synth_ext + synth).
Results: ``{out}/science-s{seed}.json`` (training on ``synth``; ``science-{generator}-s{seed}.json``
on another generator) and the printed table.

The restoration variants (``RESTORE``) use 16 mm blocks: ``restore.block_size=[4,4,2]`` voxels at the
preset's 4 x 4 x 8 mm grid (80 x 80 x 40), the size of the larger planted nodules and plaques (the
default [16, 16, 4] is 64 x 64 x 32 mm here: a fifth of the field of view per block), and a decoder
of width 32 (half the default) for CPU speed; ``restore.weight=1.0``, the rest ``restore``'s defaults.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from common.config import parse_override
from data_service.synth import PLANTED
from experiments import shell
from experiments.shell import REPO
from trainer.checkpoint import list_checkpoints

CONFIG = REPO / "configs" / "phantom.yaml"
SMALL = ("Lung nodule", "Arterial wall calcification")
# The text tower's MLM corpus besides the train reports: 800 real chest-CT reports (CT-CLIP, CC BY-NC-SA
# 4.0), beside the repo. Measured: with it zero-shot 0.729 -> 0.793; the train reports alone 0.731.
TEXT_CORPUS = REPO.parent / "shared" / "realdata" / "ctclip_reports" / "train.csv"
TEXT_KEYS = ("model.flavour", "model.text_", "model.vocab_size", "data.max_")  # overrides that shape the tower
MLM_VOCAB = 3000   # WordPiece words for the MLM tower: the real-report corpus has more words than the flavour's 1000
GENERATORS = ("synth", "synth_ext")   # phantom generators: data_service.<name>, one CLI (--out --n --seed ...)
# restore.* of the restoration variants (module doc): 16 mm blocks on the phantom grid, a narrow decoder
RESTORE = ("restore.enabled=true", "restore.weight=1.0", "restore.block_size=[4,4,2]", "restore.width=32")
VARIANTS: dict[str, tuple[str, ...]] = {           # name -> its overrides (before --set: --set wins)
    "clip": ("tma.enabled=false",),
    "tma": ("tma.enabled=true",),
    "clip_restore": ("tma.enabled=false", *RESTORE),
    "tma_restore": ("tma.enabled=true", *RESTORE),
}
LABEL = {"clip": "CLIP", "tma": "CLIP+TMA", "clip_restore": "CLIP+restore", "tma_restore": "CLIP+TMA+restore"}
DEFAULT_VARIANTS = ("clip", "tma")
BASELINE = "clip"                                   # every other variant is compared against it
SEGMENTATION = ("segmentation/mean_dice", "segmentation/random_init/mean_dice", "segmentation/gain_vs_random")
SIDE_BY_SIDE = ("zeroshot/mean_auc", "zeroshot/mean_f1", "probe/mean_auc", "probe/report/mean_auc",
                "retrieval/i2t_R@1", "retrieval/t2i_R@1", "retrieval/i2t_R@10")



def sh(cmd: list[str]) -> None:
    shell.sh(cmd, "science", {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})


def set_name(generator: str) -> str:
    """The folder stem of a generator's phantom sets and runs (``phantom`` for ``synth``, as before)."""
    return "phantom" if generator == "synth" else generator


def check_generator(generator: str) -> None:
    if importlib.util.find_spec(f"data_service.{generator}") is None:
        raise SystemExit(f"science: phantom generator data_service.{generator} not found "
                         f"(--generator/--external: one of {list(GENERATORS)} that is installed)")


def prepare_data(root: Path, n: int, data_seed: int, generator: str = "synth") -> Path:
    raw, shards = root / "raw", root / "shards"
    py = sys.executable
    if not (raw / "metadata").is_dir():
        sh([py, "-m", f"data_service.{generator}", "--out", str(raw), "--n", str(n), "--seed", str(data_seed),
            "--valid-fraction", "0.3333", "--workers", str(os.cpu_count() or 1)])
    sh([py, "-m", "data_service.ingest", "--source", "ctrate", "--input", str(raw), "--out", str(shards),
        "--config", str(CONFIG), "--no-progress"])
    return shards


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_mlm(shards: Path, out: Path, steps: int, corpora: list[str], overrides: list[str]) -> Path:
    """The text tower's masked-language pretraining (``trainer.text_mlm``, seed 0) on the train
    reports of ``shards`` and ``corpora``: the stand-in for the paper's pretrained MedCPT, so it is
    made once and shared by every seed and both variants. ``overrides`` (the runs' ``--set``) reach
    it too, so that e.g. ``model.text_unit`` or the text sizes agree with the runs. Its folder,
    ``{out}/text-mlm-{key}``, is keyed by the phantom set, the preset's and the corpora's contents,
    the overrides that shape the text tower (``TEXT_KEYS``) and the steps, so a changed input never
    reuses a stale tower and an image-side override does not make another."""
    paths = [Path(c).resolve() for c in corpora]
    for c in paths:
        if not c.is_file():
            raise SystemExit(f"science: text corpus not found: {c} (give another with --text-corpus, or "
                             "--text-mlm-steps 0 to train the text tower from scratch)")
    shaping = [o for o in overrides if parse_override(o)[0].startswith(TEXT_KEYS)]
    key = hashlib.sha256(json.dumps([str(shards), _sha(CONFIG), [(str(c), _sha(c)) for c in paths], shaping,
                                     steps, MLM_VOCAB]).encode()).hexdigest()[:10]
    folder = out / f"text-mlm-{key}"
    if not (folder / "text_mlm.json").is_file():
        cmd = [sys.executable, "-m", "trainer.text_mlm", "--config", str(CONFIG), "--set", f"data.shards={shards}",
               "--out", str(folder), "--steps", str(steps), "--seed", "0", "--vocab-size", str(MLM_VOCAB)]
        for o in overrides:
            cmd += ["--set", o]
        for c in paths:
            cmd += ["--corpus", str(c)]
        sh(cmd)
    return folder


def parse_variants(text: str) -> list[str]:
    """``--variants``: a comma list of ``VARIANTS`` names -> the names in ``VARIANTS``' order."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if bad := [v for v in names if v not in VARIANTS]:
        raise SystemExit(f"science: --variants: unknown variant(s) {bad}; available: {list(VARIANTS)}")
    if not names:
        raise SystemExit(f"science: --variants: name at least one of {list(VARIANTS)}")
    return [v for v in VARIANTS if v in names]


def delta_key(variant: str) -> str:
    """Where a variant's paired difference to CLIP-only sits in the per-label summary (``delta`` for
    CLIP+TMA, as ``experiments.science_targets`` reads it)."""
    return "delta" if variant == "tma" else f"delta_{variant}"


def train(variant: str, shards: Path, out: Path, seed: int, extra: list[str], stem: str = "phantom") -> Path:
    sets = list(VARIANTS[variant])
    cmd = [sys.executable, "-m", "trainer.pretrain", "--config", str(CONFIG), "--set", f"data.shards={shards}",
           "--set", f"train.output_dir={out / f'{stem}-{variant}'}", "--set", f"train.run_name=s{seed}",
           "--set", f"train.seed={seed}"]
    for s in sets + extra:
        cmd += ["--set", s]
    t = time.time()
    sh(cmd)
    run_dir = out / f"{stem}-{variant}" / f"s{seed}"
    (run_dir / "science_train_seconds").write_text(f"{time.time() - t:.0f}\n")
    return run_dir


def last_export(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that has its ``export/``, or None."""
    done = list_checkpoints(run_dir, exported=True)
    return Path(done[-1]) if done else None


def score(ck: Path, shards: Path, segmentation: bool = False) -> dict:
    """Checkpoint ``ck`` (``last_export``): zero-shot (single and ensemble prompts), probes, retrieval
    (with ``segmentation`` also the segmentation task: fine-tuned pretrained and random-init Dice),
    and the raw test-split probabilities for the paired comparison."""
    from evaluators.scoring import Scoring
    from evaluators.tasks.zeroshot import prompt_embeddings, zeroshot_probs

    tasks = ["zeroshot", "probe", "retrieval"] + (["segmentation"] if segmentation else [])
    sc = Scoring(ck, str(shards), tasks=tasks)
    res = {"checkpoint": str(ck), "metrics": sc.score(tasks[:3])["metrics"]}
    if segmentation:
        t = time.time()
        res["metrics"].update(sc.score(["segmentation"])["metrics"])
        res["segmentation_seconds"] = round(time.time() - t, 1)
    test = sc.labelled(sc.cfg.eval.split_test)
    scale = float(sc.model.logit_scale.detach().exp().clamp(max=100))
    for name, ens in (("single", False), ("ensemble", True)):
        prompts = prompt_embeddings(sc.model, sc.tok, sc.cfg, ensemble=ens)
        res[f"probs_{name}"] = zeroshot_probs(test["img"], prompts, scale).tolist()
        res[f"report_probs_{name}"] = zeroshot_probs(test["txt"], prompts, scale).tolist()
    ens = Scoring(ck, str(shards), overrides=["eval.prompts=ensemble"], tasks=["zeroshot"]).score(["zeroshot"])
    res["metrics_ensemble"] = ens["metrics"]
    res["labels"] = test["labels"].tolist()
    return res


def paired_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """AUC(b) - AUC(a) on the same test studies, with a stratified paired bootstrap 95% CI."""
    from evaluators.tasks.zeroshot import auc_rows, bootstrap_indices

    d = auc_rows(y, b) - auc_rows(y, a)
    r = bootstrap_indices(y, n_boot, seed)
    lo, hi = np.percentile(auc_rows(y[r], b[r]) - auc_rows(y[r], a[r]), [2.5, 97.5])
    return float(d), float(lo), float(hi)


def table(res: dict, n_boot: int, seed: int, where: str = "held-out phantoms") -> tuple[str, dict]:
    """The per-label tables for the variants in ``res`` (any of ``VARIANTS``; with CLIP-only among
    them, every other variant's paired delta against it), scored on ``where``."""
    from sklearn.metrics import roc_auc_score

    from common.labels import FINDINGS
    from evaluators.tasks.zeroshot import auc_with_ci

    vs = [v for v in VARIANTS if v in res]
    cmp = [v for v in vs if v != BASELINE] if BASELINE in vs else []      # compared against CLIP-only
    name = LABEL
    head = {v: "delta" if v == "tma" else f"delta {v}" for v in cmp}
    why = "; ".join(f"{head[v]} = {name[v].removeprefix('CLIP+')} - CLIP" for v in cmp)
    w = max([8] + [len(name[v]) for v in vs])
    y = np.array(res[vs[0]]["labels"])
    lines, summary = [], {}
    for prompts in ("single", "ensemble"):
        lines.append(f"\nzero-shot AUC on {where} ({prompts} prompts; {len(y)} test studies; "
                     f"95% bootstrap CI" + (f"; {why}, paired bootstrap)" if cmp else ")"))
        lines.append(f"{'finding':30s} " + " ".join(f"{name[v]:>22s}" for v in vs)
                     + "".join(f" {head[v]:>24s}" for v in cmp))
        per = {}
        for f in PLANTED:
            k = FINDINGS.index(f)
            p = {v: np.array(res[v][f"probs_{prompts}"])[:, k] for v in vs}
            per[f] = {v: auc_with_ci(y[:, k], p[v], n_boot, seed)[:3] for v in vs}
            line = f"{f:30s} " + " ".join(f"{per[f][v][0]:6.3f} [{per[f][v][1]:.3f}, {per[f][v][2]:.3f}]" for v in vs)
            for v in cmp:
                d = per[f][delta_key(v)] = paired_delta(y[:, k], p[BASELINE], p[v], n_boot, seed)
                line += f" {d[0]:+6.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"
            lines.append(line)
        mean = {v: float(np.mean([per[f][v][0] for f in PLANTED])) for v in vs}
        lines.append(f"{'mean (8 planted)':30s} " + " ".join(f"{mean[v]:6.3f} {'':15s}" for v in vs))
        summary[prompts] = {"per_label": per, "mean": mean}
    lines.append("\nother scores (test split)              " + "  ".join(f"{name[v]:>{w}s}" for v in vs))
    keys = ["probe/mean_auc", "probe/report/mean_auc", "retrieval/i2t_R@1", "retrieval/t2i_R@1", "retrieval/i2t_R@10"]
    keys += [f"probe/auc/{f}" for f in SMALL]
    keys += [k for k in SEGMENTATION if any(k in res[v]["metrics"] for v in vs)]   # with --segmentation
    for key in keys:
        lines.append(f"{key:38s} " + "  ".join(f"{res[v]['metrics'].get(key, float('nan')):{w}.3f}" for v in vs))
    for prompts in ("single", "ensemble"):
        vals = [np.mean([roc_auc_score(y[:, FINDINGS.index(f)], np.array(res[v][f"report_probs_{prompts}"])[:, FINDINGS.index(f)])
                         for f in PLANTED]) for v in vs]
        lines.append(f"{'zero-shot on report embeddings (' + prompts + ')':38s} " + "  ".join(f"{x:{w}.3f}" for x in vals))
    # the prompts replaced by report centroids: train wording (what the prompts' wording loses) and
    # held-out wording (valid, the second bank)
    for split in ("train", "valid"):
        vals = [np.mean([res[v]["metrics"].get(f"zeroshot/report_centroid/{split}/auc/{f}", float("nan"))
                         for f in PLANTED]) for v in vs]
        lines.append(f"{'zero-shot, ' + split + ' report centroids':38s} " + "  ".join(f"{x:{w}.3f}" for x in vals))
    return "\n".join(lines), summary


def segmentation_summary(res: dict) -> dict | None:
    """Per variant the segmentation task's Dice, fine-tuned from the pretrained encoder and from a
    random init (``--segmentation``), or None when it was not scored."""
    out = {v: {"pretrained": r["metrics"]["segmentation/mean_dice"],
               "random_init": r["metrics"]["segmentation/random_init/mean_dice"],
               "gain_vs_random": r["metrics"].get("segmentation/gain_vs_random"),
               "seconds": r.get("segmentation_seconds")}
           for v, r in res.items() if "segmentation/mean_dice" in r["metrics"]}
    return out or None


def side_by_side(internal: dict, external: dict, summary: dict, ext_summary: dict,
                 names: tuple[str, str]) -> tuple[str, dict]:
    """In-distribution and external figures per variant, one row per headline (``internal`` and
    ``external``: ``score`` results by variant; the summaries: ``table``'s)."""
    vs = [v for v in VARIANTS if v in internal and v in external]
    label = LABEL
    rows: dict[str, dict] = {}
    for prompts in ("single", "ensemble"):
        rows[f"zero-shot mean AUC, 8 planted ({prompts})"] = {
            v: (summary[prompts]["mean"][v], ext_summary[prompts]["mean"][v]) for v in vs}
    for key in SIDE_BY_SIDE:
        rows[key] = {v: (internal[v]["metrics"].get(key, float("nan")), external[v]["metrics"].get(key, float("nan")))
                     for v in vs}
    w = max([22] + [len(label[v]) + 9 for v in vs])
    head = "".join(f"  {label[v] + ' ' + n:>{w}s}" for v in vs for n in ("in-dist", "external"))
    lines = [f"\nin-distribution ({names[0]}) and external ({names[1]}), test splits", f"{'':42s}{head}"]
    for row, vals in rows.items():
        lines.append(f"{row:42s}" + "".join(f"  {x:{w}.3f}" for v in vs for x in vals[v]))
    out = {row: {v: {"internal": a, "external": b} for v, (a, b) in vals.items()} for row, vals in rows.items()}
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.science", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="training seed (init, data order, augmentation)")
    p.add_argument("--data-seed", type=int, default=0, help="phantom set")
    p.add_argument("--n", type=int, default=1200, help="phantoms (a third held out: valid + test)")
    p.add_argument("--out", default="runs")
    p.add_argument("--data", default="data", help="where the phantom sets live")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for both runs")
    p.add_argument("--text-mlm-steps", type=int, default=6000,
                   help="pretrain the text tower with trainer.text_mlm for this many steps first (0: from scratch)")
    p.add_argument("--text-corpus", action="append", default=None, metavar="FILE",
                   help=f"report corpus (.csv/.txt) for the text tower's MLM, besides the train reports "
                        f"(repeatable; default {os.path.relpath(TEXT_CORPUS, REPO)}, real CT-RATE reports)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list of the variants to train and score, each compared against clip: "
                        f"{', '.join(f'{v} ({LABEL[v]})' for v in VARIANTS)}")
    p.add_argument("--only", choices=[*VARIANTS, "none"], default=None,
                   help="train one of --variants, or none (scores whichever has a checkpoint)")
    p.add_argument("--segmentation", action="store_true",
                   help="also score the segmentation task (pretrained vs random-init Dice) on every variant")
    p.add_argument("--generator", choices=GENERATORS, default="synth",
                   help="the phantom generator trained on (data_service.<generator>)")
    p.add_argument("--external", choices=GENERATORS, default=None,
                   help="also score both checkpoints on a set from this generator (external validation)")
    p.add_argument("--external-data-seed", type=int, default=None,
                   help="the external set's seed (default: --data-seed, or the next one for the training generator)")
    a = p.parse_args(argv)
    variants = parse_variants(a.variants)
    if a.only not in (None, "none", *variants):
        raise SystemExit(f"science: --only {a.only} is not among --variants {','.join(variants)}")
    for g in (a.generator, a.external):
        if g is not None:
            check_generator(g)
    ext_seed = a.external_data_seed if a.external_data_seed is not None else (
        a.data_seed + 1 if a.external == a.generator else a.data_seed)
    if a.external == a.generator and ext_seed == a.data_seed:
        raise SystemExit(f"science: the external set is the training set ({a.generator}, seed {ext_seed}); "
                         "give another --external-data-seed")
    t0 = time.time()
    out = (REPO / a.out).resolve()
    stem = set_name(a.generator)
    shards = prepare_data((REPO / a.data / f"{stem}-d{a.data_seed}-n{a.n}").resolve(), a.n, a.data_seed, a.generator)
    ext_shards = None
    if a.external:
        ext_shards = prepare_data((REPO / a.data / f"{set_name(a.external)}-d{ext_seed}-n{a.n}").resolve(), a.n,
                                  ext_seed, a.external)
    t_data = time.time() - t0
    overrides, tower = list(a.overrides), None
    if any(parse_override(o)[0] == "model.text_encoder" for o in overrides):
        print("science: model.text_encoder is set by --set: no text MLM stage", flush=True)
    elif a.text_mlm_steps > 0:
        corpora = [str(TEXT_CORPUS)] if a.text_corpus is None else a.text_corpus
        tower = text_mlm(shards, out, a.text_mlm_steps, corpora, list(a.overrides))
        overrides.append(f"model.text_encoder={tower}")
    t_text = time.time() - t0 - t_data
    runs = {}
    for v in variants:
        if a.only in (None, v):
            runs[v] = train(v, shards, out, a.seed, overrides, stem)
        else:
            runs[v] = out / f"{stem}-{v}" / f"s{a.seed}"
    t_train = time.time() - t0 - t_data - t_text
    seg = {"segmentation": True} if a.segmentation else {}
    res = {v: score(ck, shards, **seg) for v, d in runs.items() if (ck := last_export(d)) is not None}
    if not res:
        raise SystemExit(f"science: no exported checkpoint under {out}/{stem}-{{{','.join(variants)}}}/s{a.seed}")
    text, summary = table(res, a.bootstrap, a.seed)
    print(text)
    external = None
    if ext_shards is not None:
        res_ext = {v: score(Path(r["checkpoint"]), ext_shards) for v, r in res.items()}
        ext_text, ext_summary = table(res_ext, a.bootstrap, a.seed, f"external {a.external} phantoms (seed {ext_seed})")
        both_text, both = side_by_side(res, res_ext, summary, ext_summary, (a.generator, a.external))
        print(ext_text + "\n" + both_text)
        external = {"generator": a.external, "data_seed": ext_seed, "n": a.n, "shards": str(ext_shards),
                    "summary": ext_summary, "metrics": {v: r["metrics"] for v, r in res_ext.items()},
                    "metrics_ensemble": {v: r["metrics_ensemble"] for v, r in res_ext.items()},
                    "side_by_side": both}
    report = {"seed": a.seed, "data_seed": a.data_seed, "n": a.n, "generator": a.generator, "overrides": overrides,
              "variants": {v: list(VARIANTS[v]) for v in variants},
              "seconds": {"data": round(t_data), "text_mlm": round(t_text), "train_both": round(t_train), "total": round(time.time() - t0)},
              "text_mlm": None if tower is None else {"folder": str(tower),
                                                      **json.loads((tower / "text_mlm.json").read_text())},
              "summary": summary, "metrics": {v: r["metrics"] for v, r in res.items()},
              "metrics_ensemble": {v: r["metrics_ensemble"] for v, r in res.items()},
              "checkpoints": {v: r["checkpoint"] for v, r in res.items()}, "external": external,
              "segmentation": segmentation_summary(res)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"science-s{a.seed}.json" if a.generator == "synth" else f"science-{a.generator}-s{a.seed}.json")
    path.write_text(json.dumps(report, indent=1))
    print(f"\ndata {t_data:.0f} s, text MLM {t_text:.0f} s, {len(runs)} trainings {t_train:.0f} s, total {time.time() - t0:.0f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
