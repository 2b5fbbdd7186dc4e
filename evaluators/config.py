"""The ``eval`` section: which downstream tasks score each checkpoint, on which datasets, and how."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from common.config import ConfigError, check_choice, check_range

TASKS = ("zeroshot", "retrieval", "probe", "reportgen", "segmentation")
"""Every evaluator task, in scoring order (evaluators.scoring.SCORERS has one scorer per name)."""

INTERNAL = "internal"       # the internal dataset's name when none is given (``data.shards``, a bare ``--data``)
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
"""A dataset name: it becomes the MLflow group ``external/<name>/``, and MLflow's run page sorts
groups the same way in both of its sorts only for lower-case ASCII (``common.metric_names``)."""


@dataclass
class EvalConfig:
    enabled: bool = False                       # evaluator actor alongside the training job
    watcher: str = "evaluators.actor:EvalThread"  # what trainer.pretrain starts when enabled (module:class)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    every_n_checkpoints: int = 1
    poll_seconds: float = 15.0
    split_threshold: str = "valid"
    split_test: str = "test"
    bootstrap: int = 200
    prompts: str = "single"                     # zero-shot prompts: "single" (CT-RATE's pair) | "ensemble"
    cpus: float = 0.5
    gpus: float = 0.0                           # the evaluator actor's GPU share (tasks use it when > 0)
    seg_steps: int = 30                         # fine-tuning steps, pretrained and random init alike
    seg_classes: list[str] = field(default_factory=lambda: ["lung", "heart", "aorta", "bone"])  # mask value i+1
    seg_roi: list[int] = field(default_factory=list)   # train on random crops, infer by sliding window; [] = whole
    seg_lr: float = 1e-3
    centroid_reports: int = 2000                # train reports (text only) for zeroshot/report_centroid/train; 0 = off
    reportgen_steps: int = 60
    reportgen_lr: float = 1e-3
    # name -> shards (path or URI), in order: the first is the internal set (today's metric keys), every
    # other is scored the same way under external/<name>/...; {} = data.shards alone
    datasets: dict[str, str] = field(default_factory=dict)
    best_metric: str = "zeroshot/mean_auc"       # higher is better; its best checkpoint is registered
    registry_name: str = ""                      # MLflow registered model ("" = train.run_name)

    def validate(self, root=None) -> "EvalConfig":
        for t in self.tasks:
            check_choice("eval.tasks", t, TASKS)
        check_choice("eval.prompts", self.prompts, ("single", "ensemble"))
        if self.seg_roi and len(self.seg_roi) != 3:
            raise ConfigError(f"eval.seg_roi: expected [] or 3 values, got {self.seg_roi!r}")
        if not self.seg_classes:
            raise ConfigError("eval.seg_classes: need at least one class name")
        check_range("eval.every_n_checkpoints", self.every_n_checkpoints, 1)
        check_range("eval.bootstrap", self.bootstrap, 0)
        check_range("eval.centroid_reports", self.centroid_reports, 0)
        check_datasets_config("eval.datasets", self.datasets)
        check_best_metric("eval.best_metric", self.best_metric, list(self.datasets)[1:])
        return self


def check_datasets_config(key: str, datasets: dict[str, str]) -> None:
    """Names usable as ``external/<name>/`` and a non-empty shard location each (ConfigError naming the key)."""
    for name, shards in datasets.items():
        if not DATASET_NAME.fullmatch(name):
            raise ConfigError(f"{key}: dataset name {name!r} must be lower-case letters, digits, '_' or '-' "
                              "(it names the MLflow group external/<name>/)")
        if not isinstance(shards, str) or not shards.strip():
            raise ConfigError(f"{key}.{name}: expected a shard folder or URI, got {shards!r}")


def check_best_metric(key: str, metric: str, external: list[str]) -> None:
    """An ``external/<name>/...`` metric must name one of the ``external`` datasets."""
    if metric.startswith("external/"):
        name = metric.split("/")[1]
        if name not in external or metric.count("/") < 3:
            raise ConfigError(f"{key}: {metric!r} is not an external/<dataset>/<task>/<metric> key of an "
                              f"external dataset of eval.datasets (external datasets: {external})")


def eval_datasets(cfg) -> dict[str, str]:
    """The datasets a run's checkpoints are scored on: ``eval.datasets``, else ``{internal: data.shards}``."""
    return dict(cfg.eval.datasets) or {INTERNAL: cfg.data.shards}


def parse_datasets(values: list[str]) -> dict[str, str]:
    """The CLIs' repeated ``--data``: ``NAME=SHARDS`` or a bare ``SHARDS`` (named ``internal``), in
    order; the first is the internal set. ValueError on a repeated name or a second unnamed one."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, shards = v.partition("=")
        if not sep or "/" in name or ":" in name:         # a bare path or URI: unnamed
            name, shards = INTERNAL, v
        if name in out:
            raise ValueError(f"--data {v!r}: dataset {name!r} given twice" +
                             ("; name every dataset but the first (--data NAME=SHARDS)" if name == INTERNAL else ""))
        out[name] = shards
    check_datasets_config("--data", out)
    return out
