"""Score checkpoints on downstream tasks and log them to the training run in MLflow (the CLI of
``evaluators.scoring``).

    python -m evaluators.score --checkpoint PATH --data SHARDS [--tasks all|zeroshot,retrieval,...] [--out r.json]
    python -m evaluators.score --run-dir RUN --data SHARDS --mlflow-uri URI   # every checkpoint
    python -m evaluators.score --checkpoint PATH --data ct=SHARDS --data ext=s3://bucket/ext   # + external

The protocol of each task is in ``evaluators/tasks/`` (zero-shot: thresholds on ``valid``, AUC
with a bootstrap 95% CI on ``test``). With several ``--data``, the first is the internal dataset and
every other is scored by the same protocol on its own splits, as ``external/NAME/<key>``; a dataset
that cannot be read stops the command before any scoring, and a task failing on an external dataset
is reported (``errors`` in the JSON) while the rest is scored.
"""
from __future__ import annotations

import argparse
import json
import sys

from common import log, storage
from common.metric_names import split_external
from evaluators.scoring import add_cli_args, parse_cli_args, score_datasets
from trainer.checkpoint import list_checkpoints


def _headline(key: str) -> bool:
    """Summary metrics only: not the per-label AUCs and CIs, not the per-class Dice."""
    return "/auc/" not in key and "_ci_" not in key and "/dice/" not in key


def _summary(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if _headline(k))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluators.score", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a checkpoint folder (with export/) or an export folder")
    g.add_argument("--run-dir", help="score every step_* checkpoint of a training run")
    add_cli_args(p, "ingested shards (train, valid and test splits); repeatable: the first is the internal "
                    "set, every other NAME=SHARDS an external one (scored as external/NAME/...)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: eval.bootstrap)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. eval.seg_steps=100 (repeatable)")
    p.add_argument("--mlflow-uri", default=None, help="log metrics and artifacts to the checkpoint's training run")
    p.add_argument("--out", default=None, help="JSON output (default: scores.json beside the checkpoints)")
    log.add_level_arg(p)
    a = p.parse_args(argv)
    log.configure(a.log_level)
    tasks, datasets = parse_cli_args(a)
    ckpts = [storage.normalize(a.checkpoint)] if a.checkpoint else list_checkpoints(a.run_dir)
    if not ckpts:
        raise SystemExit(f"{a.run_dir}: no step_* checkpoints")
    from evaluators.actor import eval_dir, publish_dir
    from evaluators.artifacts import log_result, write_artifacts

    results = []
    for c in ckpts:
        per_dataset, errors = score_datasets(c, datasets, tasks, a.bootstrap, a.overrides)
        art = eval_dir(storage.parent(c), storage.name(c))
        for r in per_dataset:
            write_artifacts(r, art)                                       # step_X/eval/ (a URI: uploaded)
        publish_dir(art, storage.join(c, "eval"))
        if a.mlflow_uri and per_dataset[0]["mlflow_run_id"]:
            for r in per_dataset:                                         # the folder once, with the last
                log_result(a.mlflow_uri, r, art if r is per_dataset[-1] else None)
        r = per_dataset[0]
        metrics = {k: v for d in per_dataset for k, v in d["metrics"].items()}
        results.append({"checkpoint": r["checkpoint"], "step": r["step"], "mlflow_run_id": r["mlflow_run_id"],
                        "datasets": datasets, "metrics": metrics, "errors": errors, "artifacts": str(art)})
        print(f"step {r['step']}: {_summary(metrics)}", flush=True)
        for job, msg in errors.items():
            print(f"step {r['step']}: {job} FAILED: {msg}", flush=True)
    _print_table(results)
    out = a.out or storage.join(storage.parent(ckpts[-1]), "scores.json")
    storage.write_text(out, json.dumps(results, indent=1))
    print(f"scores -> {out}")
    return 0


def _print_table(results: list[dict]) -> None:
    keys = sorted({k for r in results for k in r["metrics"] if _headline(k)},
                  key=lambda k: (split_external(k)[0] is not None, k))    # internal first, then each external
    w = max(len(k) for k in keys) if keys else 10
    print("\n" + "metric".ljust(w) + "".join(f"  step {r['step']!s:>6}" for r in results))
    for k in keys:
        print(k.ljust(w) + "".join(f"  {r['metrics'].get(k, float('nan')):>11.4f}" for r in results))


if __name__ == "__main__":
    sys.exit(main())
