"""The ``eval`` section: which downstream tasks score each checkpoint, and how."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ConfigError, check_choice, check_range

TASKS = ("zeroshot", "retrieval", "probe", "reportgen", "segmentation")
"""Every evaluator task, in scoring order (evaluators.scoring.SCORERS has one scorer per name)."""


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
        return self
