"""MLflow names of the metrics: the headline group sorts first on the run page, the loss next,
details and bookkeeping after (the page's rule: one section per prefix before the last '/', sorted)."""
from __future__ import annotations

from common.metric_names import GROUPS, HEADLINE, TASK_PREFIXES, mlflow_name
from evaluators.config import TASKS

# what the trainer, the evaluators and a sweep trial log (a sample of each kind)
KEYS = ["loss/loss", "loss/clip", "health/image_cosine", "health/collapsed_image", "data/corrupt_skipped",
        "data/steps_per_epoch", "tracking/dropped_metrics", "lr", "samples_per_s", "zeroshot/mean_auc",
        "zeroshot/mean_acc", "zeroshot/auc/Emphysema", "zeroshot/auc_ci_lo/Emphysema",
        "zeroshot/report_centroid/train/mean_auc", "retrieval/i2t_R@1", "retrieval/t2i_R@5", "probe/mean_auc",
        "probe/auc/Emphysema", "probe/report/auc/Emphysema", "reportgen/bleu4", "reportgen/train_loss",
        "segmentation/mean_dice", "segmentation/random_init/mean_dice", "segmentation/dice/lung",
        "restore/error", "restore/corrupted_fraction", "valid/zeroshot/mean_auc", "external/radchest/zeroshot/mean_auc", "external/radchest/zeroshot/auc/Emphysema"]


def sections(names: list[str]) -> list[str]:
    """The run page's sections in its order: prefixes sorted, then 'Model metrics' (no prefix)."""
    named = sorted({n.rsplit("/", 1)[0] for n in names if "/" in n})
    return named + (["Model metrics"] if any("/" not in n for n in names) else [])


def test_names():
    assert mlflow_name("zeroshot/mean_auc") == "eval/zeroshot_mean_auc"
    assert mlflow_name("retrieval/i2t_R@5") == "eval/retrieval_i2t_R_at_5"
    assert mlflow_name("retrieval/i2t_R@1") == "task/retrieval/i2t_R_at_1"
    assert mlflow_name("zeroshot/auc/Emphysema") == "task/zeroshot/auc/Emphysema"
    assert mlflow_name("valid/probe/report/mean_auc") == "eval/valid/probe_report_mean_auc"
    assert mlflow_name("external/radchest/zeroshot/mean_auc") == "external/radchest/zeroshot_mean_auc"
    assert mlflow_name("health/image_cosine") == "train/health/image_cosine"
    assert mlflow_name("loss/loss") == "loss/loss" and mlflow_name("lr") == "lr"
    assert all(mlflow_name(mlflow_name(k)) == mlflow_name(k) for k in KEYS)     # a name in a group stays
    assert TASK_PREFIXES == (*TASKS, "restore") and {k.split("/")[0] for k in HEADLINE} <= set(TASKS)


def test_restoration_picture_metrics_are_task_details():
    """The evaluator's restoration picture (evaluators.scoring.restore_picture) logs ``restore/*``
    beside the tasks' details, not at the top level nor among the training loss terms."""
    assert mlflow_name("restore/error") == "task/restore/error"
    assert mlflow_name("restore/corrupted_fraction") == "task/restore/corrupted_fraction"
    assert mlflow_name("loss/restore") == "loss/restore"                  # the training term stays a loss


def test_headline_first_then_loss_then_details_then_bookkeeping():
    order = sections([mlflow_name(k) for k in KEYS])
    assert order[:4] == ["eval", "eval/valid", "external/radchest", "loss"], order
    groups = [s.split("/")[0] for s in order[:-1]]
    assert groups == sorted(groups, key=GROUPS.index), order     # each group in one block, in GROUPS order
    assert order[-1] == "Model metrics"
    assert all(n == n.lower() for n in order[:-1])           # sort() and localeCompare agree on these
