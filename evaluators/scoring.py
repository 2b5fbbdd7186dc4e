"""Score one checkpoint on the downstream tasks: what the CLI, the evaluator actor and the sweep's
validation all call (``Scoring``), and one scorer per task (``SCORERS``, keyed like ``TASKS``).

Several datasets (``eval.datasets``): the first is the internal one (today's keys); ``Scoring.on``
scores the same loaded checkpoint on another with every key under ``external/<name>/``, by the same
protocol on that dataset's own splits (docs/design.md, "External validation")."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import storage
from common.config import load_config
from common.metric_names import external_key
from evaluators.config import INTERNAL, TASKS
from evaluators.tasks import features


class Scoring:
    """One loaded checkpoint to score task by task: the export is loaded once, and each split is
    embedded once however many tasks use it (with the feature map too when report generation is
    among ``tasks``). ``overrides`` (``eval.seg_steps=100`` ...) change the checkpoint's own config;
    ``n_boot`` replaces ``eval.bootstrap``; ``device``: default a GPU when one is visible.
    ``dataset``: None for the internal dataset, else its name (the keys go under ``external/<name>/``)."""

    def __init__(self, path: str | Path, shards: str, n_boot: int | None = None,
                 overrides: list[str] | None = None, device: str | None = None, tasks: list[str] | None = None,
                 dataset: str | None = None):
        from trainer.export import load_export

        self.path, self.shards, self.dataset = path, shards, dataset
        self.model, self.tok, cfg, self.info = load_export(path)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if overrides:
            cfg = load_config(None, overrides, extra=cfg.to_dict())
        if n_boot is not None:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, bootstrap=n_boot))
        self.cfg = cfg
        self.memory = "reportgen" in (tasks or TASKS)
        self._splits: dict[str, dict] = {}

    def on(self, shards: str, dataset: str | None) -> "Scoring":
        """The same loaded checkpoint scored on ``shards`` (external dataset ``dataset``; None: internal),
        with its own split cache."""
        other = copy.copy(self)
        other.shards, other.dataset, other._splits = shards, dataset, {}
        return other

    def key(self, k: str) -> str:
        """Task key ``k`` as this dataset reports it."""
        return external_key(self.dataset, k) if self.dataset else k

    def embed(self, split: str) -> dict:
        """{img, txt, labels, keys, reports[, memory]} of ``split`` (computed once)."""
        if split not in self._splits:
            self._splits[split] = features.embed_split(self.model, self.tok, self.cfg, self.shards, split,
                                                       memory=self.memory)
        return self._splits[split]

    def labelled(self, split: str) -> dict:
        e = self.embed(split)
        if np.isnan(e["labels"]).any():
            raise ValueError(f"{self.shards}: split {split!r} has studies without the 18 labels")
        return e

    def score(self, tasks: list[str], errors: dict[str, str] | None = None) -> dict:
        """-> {checkpoint, step, mlflow_run_id, dataset, shards, metrics, extras} for ``tasks``. With
        ``errors``, a task that raises is recorded there (task -> message) and the others still run."""
        metrics: dict[str, float] = {}
        extras: dict = {}
        for t in check_tasks(tasks):
            if errors is None:
                metrics.update(SCORERS[t](self, extras))
                continue
            try:
                metrics.update(SCORERS[t](self, extras))
            except Exception as e:  # noqa: BLE001 - one task of a dataset failing leaves the rest scored
                errors[t] = f"{type(e).__name__}: {e}"[:500]
        return {"checkpoint": str(self.path), "step": self.info.get("step"),
                "mlflow_run_id": self.info.get("mlflow_run_id"), "dataset": self.dataset, "shards": str(self.shards),
                "metrics": {self.key(k): float(v) for k, v in metrics.items()}, "extras": extras}


# ------------------------------------------------------------------------------------------ tasks
def score_zeroshot(sc: Scoring, extras: dict) -> dict[str, float]:
    from evaluators.tasks.zeroshot import prompt_embeddings, zeroshot_probs
    from evaluators.tasks.zeroshot import score_zeroshot as protocol

    e = sc.cfg.eval
    prompts = prompt_embeddings(sc.model, sc.tok, sc.cfg, ensemble=e.prompts == "ensemble")
    scale = float(sc.model.logit_scale.detach().exp().clamp(max=100))
    thr, test = sc.labelled(e.split_threshold), sc.labelled(e.split_test)
    try:
        out, extras["zeroshot_table"], extras["zeroshot_roc"] = protocol(
            zeroshot_probs(thr["img"], prompts, scale), thr["labels"], zeroshot_probs(test["img"], prompts, scale),
            test["labels"], e.bootstrap, sc.cfg.train.seed)
    except ValueError as err:
        raise ValueError(f"{sc.shards}: {err} ({e.split_threshold} / {e.split_test})") from err
    out.update(centroid_readout(thr, test, scale, e.split_threshold))
    if e.centroid_reports > 0:
        tr = features.embed_reports(sc.model, sc.tok, sc.cfg, sc.shards, "train", e.centroid_reports)
        out.update(centroid_readout(tr, test, scale, "train"))
    return out


def centroid_readout(ref: dict, test: dict, scale: float, name: str) -> dict[str, float]:
    """Zero-shot with the prompts replaced by report centroids of split ``name`` (``ref``: its
    report embeddings ``txt`` and ``labels``): per label, the mean report embedding of the studies
    with it and of those without -> ``zeroshot/report_centroid/{name}/*``. With the *train*
    reports (the wording the text tower learnt), the gap to the prompts' AUC is what the prompts'
    wording loses: a text tower that cannot compose an unseen sentence. With held-out reports it
    also measures unseen report wording. A low centroid AUC means image and report do not agree
    on that finding at all. Labels without both classes in either split are skipped."""
    from sklearn.metrics import roc_auc_score

    from common.labels import FINDINGS
    from evaluators.tasks.zeroshot import two_classes, zeroshot_probs

    txt, y = torch.nn.functional.normalize(ref["txt"].float(), dim=-1), ref["labels"]
    have = [k for k in range(y.shape[1]) if two_classes(y[:, k]) and two_classes(test["labels"][:, k])]
    if not have:
        return {}
    cent = torch.stack([torch.stack([txt[torch.from_numpy(y[:, k] == 1)].mean(0), txt[torch.from_numpy(y[:, k] == 0)].mean(0)])
                        for k in have])
    p = zeroshot_probs(test["img"], torch.nn.functional.normalize(cent, dim=-1), scale)
    out = {f"zeroshot/report_centroid/{name}/auc/{FINDINGS[k]}": float(roc_auc_score(test["labels"][:, k], p[:, i]))
           for i, k in enumerate(have)}
    out[f"zeroshot/report_centroid/{name}/mean_auc"] = float(np.mean(list(out.values())))
    return out


def score_retrieval(sc: Scoring, extras: dict) -> dict[str, float]:
    from evaluators.tasks.retrieval import recall_at_k

    e = sc.embed(sc.cfg.eval.split_test)
    return {f"retrieval/{k}": v for k, v in recall_at_k(e["img"], e["txt"]).items()}


def score_probe(sc: Scoring, extras: dict) -> dict[str, float]:
    """Logistic regression per label on frozen embeddings, train -> test: the image embeddings
    (``probe/*``) and, beside them, the report embeddings (``probe/report/*``): a text tower that
    forgets the findings shows here even when the image side looks fine."""
    from evaluators.tasks.probe import linear_probe_auc

    tr, te = sc.labelled("train"), sc.labelled(sc.cfg.eval.split_test)
    out: dict[str, float] = {}
    extras["probe_table"] = []
    for tower, key, prefix in (("image", "img", "probe"), ("report", "txt", "probe/report")):
        aucs = linear_probe_auc(tr[key].numpy(), tr["labels"], te[key].numpy(), te["labels"])
        if not aucs:
            raise ValueError(f"{sc.shards}: no label has both classes in train and test")
        extras["probe_table"] += [{"embedding": tower, "label": k, "auc": v} for k, v in aucs.items()]
        out.update({f"{prefix}/auc/{k}": v for k, v in aucs.items()})
        out[f"{prefix}/mean_auc"] = float(np.mean(list(aucs.values())))
    return out


def score_reportgen(sc: Scoring, extras: dict) -> dict[str, float]:
    from evaluators.tasks.reportgen import caption_metrics, train_and_generate

    cfg = sc.cfg
    tr, te = sc.embed("train"), sc.embed(cfg.eval.split_test)
    hyps, loss = train_and_generate(tr["memory"], tr["reports"], te["memory"], sc.tok, cfg.data.max_text_tokens,
                                    cfg.eval.reportgen_steps, cfg.train.seed, cfg.eval.reportgen_lr,
                                    device=features.model_device(sc.model))
    extras["reportgen_samples"] = [{"key": k, "reference": r, "generated": h}
                                   for k, r, h in zip(te["keys"], te["reports"], hyps)]
    out = {f"reportgen/{k}": v for k, v in caption_metrics(te["reports"], hyps).items()}
    out["reportgen/train_loss"] = loss
    return out


def score_segmentation(sc: Scoring, extras: dict) -> dict[str, float]:
    from data_service.preprocess import to_model_input
    from evaluators.tasks.segmentation import check_masks, finetune
    from trainer.model.image import ImageEncoder

    cfg, e = sc.cfg, sc.cfg.eval
    classes = list(e.seg_classes)
    tr = features.load_volumes(sc.shards, "train", masks=True)
    te = features.load_volumes(sc.shards, e.split_test, masks=True)
    for d in (tr, te):
        check_masks(d["y"], d["keys"], len(classes))
    kw = dict(n_classes=len(classes), steps=e.seg_steps, seed=cfg.train.seed, lr=e.seg_lr, roi=list(e.seg_roi),
              prep=lambda hu: to_model_input(hu, cfg.data), device=features.model_device(sc.model))
    dice, loss = finetune(copy.deepcopy(sc.model.image), tr["hu"], tr["y"], te["hu"], te["y"], **kw)
    torch.manual_seed(cfg.train.seed + 1)
    dice0, loss0 = finetune(ImageEncoder(cfg.model), tr["hu"], tr["y"], te["hu"], te["y"], **kw)
    out, table = {}, []
    for c, d, d0 in zip(classes, dice, dice0):
        table.append({"class": c, "dice_pretrained": float(d), "dice_random_init": float(d0)})
        if np.isfinite(d):
            out[f"segmentation/dice/{c}"], out[f"segmentation/random_init/dice/{c}"] = float(d), float(d0)
    if not out:
        raise ValueError(f"{sc.shards}: no class of eval.seg_classes {classes} occurs in the test masks")
    extras["segmentation_table"] = table
    mean, mean0 = float(np.nanmean(dice)), float(np.nanmean(dice0))
    out.update({"segmentation/mean_dice": mean, "segmentation/random_init/mean_dice": mean0,
                "segmentation/gain_vs_random": mean - mean0, "segmentation/train_loss": loss,
                "segmentation/random_init/train_loss": loss0, "segmentation/steps": float(e.seg_steps)})
    return out


# ------------------------------------------------------------------ the restoration picture
PICTURE = "restore"           # its ledger job and metric prefix (``restore/error``: MLflow task/restore/error)
PICTURE_PNG = "restore.png"   # in the checkpoint's eval/ folder (MLflow: eval/step_X/restore.png)
PICTURE_SEED = 0              # the corruption's seed: every checkpoint restores the same corruption


def picture_study(shards: str, split: str) -> dict:
    """The study the restoration picture shows: the first of ``split`` in shard order (the same at
    every checkpoint of a run); ValueError when the split is empty."""
    from data_service.shards import iter_split

    for s in iter_split(shards, split):
        return s
    raise ValueError(f"{shards}: split {split!r} has no study for the restoration picture")


def restore_picture(sc: Scoring, out_dir: str | Path) -> dict:
    """A checkpoint trained with ``restore.enabled``: ``restore.png`` in ``out_dir`` (one view of a
    held-out study of the internal dataset's ``eval.split_test``, its corruption at ``PICTURE_SEED``
    and the restoration, ``trainer.model.restore.restoration_figure``) -> a result like ``score``'s
    with ``restore/error`` and ``restore/corrupted_fraction``. ValueError when the checkpoint has no
    restoration decoder. One encoder and decoder pass on one volume: light beside any task."""
    from trainer.model.restore import restoration_figure

    if not sc.cfg.restore.enabled:
        raise ValueError(f"{sc.path}: restore.enabled=false, no restoration picture")
    s = picture_study(sc.shards, sc.cfg.eval.split_test)
    step = sc.info.get("step")
    metrics = restoration_figure(sc.model, sc.tok, sc.cfg, np.array(s["ct"]), s["report"], Path(out_dir) / PICTURE_PNG,
                                 seed=PICTURE_SEED, title=f"step {step}, {sc.cfg.eval.split_test} study {s['key']}")
    return {"checkpoint": str(sc.path), "step": step, "mlflow_run_id": sc.info.get("mlflow_run_id"),
            "dataset": None, "shards": str(sc.shards), "metrics": {k: float(v) for k, v in metrics.items()},
            "extras": {}}


SCORERS: dict[str, Callable[[Scoring, dict], dict[str, float]]] = {
    "zeroshot": score_zeroshot, "retrieval": score_retrieval, "probe": score_probe,
    "reportgen": score_reportgen, "segmentation": score_segmentation}
assert tuple(SCORERS) == TASKS, "evaluators.config.TASKS and SCORERS must name the same tasks"


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in SCORERS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; available: {list(TASKS)}")
    return tasks


def parse_tasks(text: str) -> list[str]:
    """``all`` or a comma list -> checked task names (the CLIs' ``--tasks``)."""
    return check_tasks(list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()])


def score_checkpoint(path: str | Path, shards: str, tasks: list[str], n_boot: int | None = None,
                     overrides: list[str] | None = None, device: str | None = None) -> dict:
    """Load an export and score it on ``tasks`` (see ``Scoring``)."""
    return Scoring(path, shards, n_boot, overrides, device, tasks).score(tasks)


def as_datasets(shards: str | Path | dict[str, str]) -> dict[str, str]:
    """A bare shard location -> ``{internal: shards}``; a mapping (``eval.datasets``) as it is."""
    return {k: str(v) for k, v in shards.items()} if isinstance(shards, dict) else {INTERNAL: str(shards)}


def add_cli_args(p, data_help: str) -> None:
    """The scoring CLIs' shared ``--data`` (repeatable, ``[NAME=]SHARDS``) and ``--tasks``."""
    p.add_argument("--data", required=True, action="append", metavar="[NAME=]SHARDS", help=data_help)
    p.add_argument("--tasks", default="all", help=f"comma list or 'all' ({','.join(TASKS)})")


def parse_cli_args(a, best_metric: str | None = None) -> tuple[list[str], dict[str, str]]:
    """``add_cli_args``'s values -> (tasks, datasets), every dataset readable and ``best_metric`` one
    of them, before any scoring: SystemExit naming the bad value otherwise."""
    from evaluators.config import check_best_metric, parse_datasets

    try:
        tasks = parse_tasks(a.tasks)
        datasets = parse_datasets(a.data)
        if best_metric is not None:
            check_best_metric("--best-metric", best_metric, list(datasets)[1:])
        check_datasets(datasets)
    except ValueError as e:                 # ConfigError is one
        raise SystemExit(str(e)) from e
    return tasks, datasets


def check_datasets(datasets: dict[str, str]) -> None:
    """Every dataset readable (its ``manifest.json``), before any scoring: ValueError naming the
    dataset and its location otherwise."""
    import json

    from data_service.shards import load_manifest

    for i, (name, shards) in enumerate(datasets.items()):
        what = "internal dataset" if i == 0 else "external dataset"
        try:
            man = load_manifest(shards)
            if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
                raise ValueError("manifest.json has no 'shards' list")
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{what} {name!r} at {storage.normalize(shards)}: cannot read its shards "
                             f"({type(e).__name__}: {e})") from e


def score_datasets(path: str | Path, datasets: dict[str, str], tasks: list[str], n_boot: int | None = None,
                   overrides: list[str] | None = None, device: str | None = None) -> tuple[list[dict], dict[str, str]]:
    """One checkpoint (loaded once) on every dataset: (one result per dataset, errors). The first
    dataset is the internal one and raises as ``score_checkpoint`` does; on the others a failing
    task is recorded in errors (``external/<name>/<task>`` -> message) and the rest still run."""
    (_, first), *rest = datasets.items()
    base = Scoring(path, first, n_boot, overrides, device, tasks)
    results, errors = [base.score(tasks)], {}
    for name, shards in rest:
        errs: dict[str, str] = {}
        results.append(base.on(shards, name).score(tasks, errs))
        errors.update({external_key(name, t): f"external dataset {name!r} ({shards}): {m}" for t, m in errs.items()})
    return results, errors
