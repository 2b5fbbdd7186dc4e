"""The names metrics have in MLflow, and the groups MLflow's run page shows them in.

The code, the ledger, ``metrics.json``, the configs (``eval.best_metric``, ``sweep.metric``) and the
registry tags spell a metric by its task (``zeroshot/mean_auc``, ``probe/auc/Emphysema``,
``health/image_cosine``); ``mlflow_name`` is the one place that turns such a key into its MLflow
name. MLflow's "Model metrics" tab makes one section per prefix before the last ``/`` and sorts
the sections alphabetically (JavaScript ``sort()`` when the page opens, ``localeCompare`` when new
metrics arrive; both agree on lower-case ASCII names), so the group names below are chosen to sort
in this order:

    eval/                 the headline: one chart per task summary (zeroshot_mean_auc, probe_mean_auc, ...)
    eval/valid/           a sweep trial's validation scores (sweep.scorer)
    external/<dataset>/   the same headline on an external dataset, beside eval
    loss/                 the training loss terms
    task/                 every other task metric: per label, per class, CIs, fine-tuning losses
    train/                bookkeeping: train/data/*, train/health/*, train/tracking/*
    (no prefix)           lr, samples_per_s, ...: MLflow's own "Model metrics" section, last

Runs logged before these names keep theirs (MLflow is not rewritten).
"""
from __future__ import annotations

import re

EVAL, EXTERNAL, LOSS, TASK, TRAIN = "eval", "external", "loss", "task", "train"
GROUPS = (EVAL, EXTERNAL, LOSS, TASK, TRAIN)            # in the order MLflow's run page shows them
# evaluators.config.TASKS, then the restoration picture's metrics (evaluators.scoring.restore_picture)
TASK_PREFIXES = ("zeroshot", "retrieval", "probe", "reportgen", "segmentation", "restore")
BOOKKEEPING = ("data", "health", "tracking")

HEADLINE: dict[str, str] = {                            # task key -> its column in the run description
    "zeroshot/mean_auc": "zero-shot AUC",
    "zeroshot/mean_f1": "zero-shot F1",
    "probe/mean_auc": "probe AUC",
    "probe/report/mean_auc": "report probe AUC",
    "retrieval/i2t_R@5": "I→T R@5",
    "retrieval/t2i_R@5": "T→I R@5",
    "reportgen/bleu4": "BLEU-4",
    "reportgen/meteor": "METEOR",
    "reportgen/rouge_l": "ROUGE-L",
    "segmentation/mean_dice": "Dice",
    "segmentation/random_init/mean_dice": "Dice, random init",
    "segmentation/gain_vs_random": "Dice gain",
}
_SCOPED = re.compile(r"^(valid|external/[^/]+)/(.+)$")   # a split or an external dataset in front of a task key


def external_key(dataset: str, key: str) -> str:
    """Task key ``key`` scored on external dataset ``dataset`` (``eval.datasets``): ``external/<dataset>/<key>``."""
    return f"{EXTERNAL}/{dataset}/{key}"


def split_external(key: str) -> tuple[str | None, str]:
    """``external/<dataset>/<key>`` -> (dataset, key); any other key -> (None, key)."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] == EXTERNAL:
        return parts[1], parts[2]
    return None, key


def _flat(key: str) -> str:
    return key.replace("/", "_")


def mlflow_name(key: str) -> str:
    """``key`` as MLflow shows it (see the module doc); a name already in a group is kept."""
    m = _SCOPED.match(key)
    first = key.split("/", 1)[0]
    if m and m.group(2) in HEADLINE:
        scope = f"{EVAL}/valid" if m.group(1) == "valid" else m.group(1)
        name = f"{scope}/{_flat(m.group(2))}"
    elif m and m.group(2).split("/", 1)[0] in TASK_PREFIXES:
        name = f"{TASK}/{key}"
    elif first in GROUPS or "/" not in key:
        name = key
    elif key in HEADLINE:
        name = f"{EVAL}/{_flat(key)}"
    elif first in TASK_PREFIXES:
        name = f"{TASK}/{key}"
    else:
        name = f"{TRAIN}/{key}" if first in BOOKKEEPING else key
    return name.replace("@", "_at_")                   # MLflow refuses '@' in a metric name
