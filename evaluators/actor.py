"""Continuous evaluation: a Ray actor scores each new checkpoint of a run, once per task.

    python -m evaluators.actor --run-dir RUN --data SHARDS [--tasks all] [--follow] [--registry-name t3d]
    python -m evaluators.actor --run-dir RUN --data ct=SHARDS --data ext=s3://bucket/ext   # + an external set

The ledger (``{run_dir}/eval_ledger.jsonl``, one line per checkpoint x task, an external dataset's
tasks as ``external/<name>/<task>``, a ``restore.enabled`` checkpoint's restoration picture as
``restore``) makes the work idempotent: a restarted evaluator skips what is recorded and redoes nothing. The actor has its own
CPUs (``eval.cpus``) and ``max_restarts=-1``: if it crashes, Ray restarts it and the watcher calls
it again, without touching the trainers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import log, storage
from common.metric_names import external_key
from trainer.checkpoint import export_of, list_checkpoints

logger = log.get(__name__)


class Ledger:
    """``eval_ledger.jsonl`` in the run folder (a local file or an object: ``common.storage``; one
    evaluator writes it)."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def records(self) -> list[dict[str, Any]]:
        if not storage.isfile(self.path):
            return []
        out = []
        for line in storage.read_text(self.path).splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:        # a torn last line from a crash: that work is redone
                continue
        return out

    def results(self) -> list[dict[str, Any]]:
        """One line per scored (checkpoint, task); 'logged' events are left out."""
        return [r for r in self.records() if "event" not in r]

    def done(self) -> set[tuple[str, str]]:
        return {(r["checkpoint"], r["task"]) for r in self.results()}

    def unlogged(self) -> list[dict[str, Any]]:
        """Results that did not reach MLflow (it was down) and have not been sent since."""
        sent = {(r["checkpoint"], r["task"]) for r in self.records() if r.get("event") == "logged"}
        return [r for r in self.results() if r.get("logged") is False and (r["checkpoint"], r["task"]) not in sent]

    def _append(self, rec: dict[str, Any]) -> None:
        storage.append_text(self.path, json.dumps({**rec, "time": time.time()}) + "\n")

    def record(self, checkpoint: str, task: str, step: int, metrics: dict[str, float],
               error: str | None = None, mlflow_run_id: str | None = None, logged: bool | None = None,
               dataset: str | None = None, shards: str | None = None) -> None:
        """``task``: the task, or ``external/<dataset>/<task>`` on an external dataset (whose name and
        location are recorded too; an internal line is as before)."""
        ext = {"dataset": dataset, "shards": shards} if dataset else {}
        self._append({"checkpoint": checkpoint, "task": task, "step": step, "metrics": metrics, "error": error,
                      "mlflow_run_id": mlflow_run_id, "logged": logged, **ext})

    def mark_logged(self, checkpoint: str, task: str) -> None:
        self._append({"checkpoint": checkpoint, "task": task, "event": "logged"})


def ready_checkpoints(run_dir: str | Path, every_n: int = 1) -> list[str]:
    """step_* folders (paths or URIs) whose export is complete (export.json is written after the weights)."""
    ck = list_checkpoints(run_dir, exported=True)
    return ck[every_n - 1::every_n] if every_n > 1 else ck


def eval_dir(run_dir: str | Path, checkpoint: str) -> Path:
    """The local folder of a checkpoint's evaluation artifacts: ``step_X/eval/`` itself for a local
    run, a folder in the cache (uploaded to ``step_X/eval/`` after each task) for a remote one."""
    return Path(storage.join(storage.local_state_dir(run_dir), checkpoint, "eval"))


def restore_enabled(ck: str) -> bool:
    """The checkpoint was trained with ``restore.enabled`` (its export's config.yaml; read without
    loading the weights, so a checkpoint whose tasks are all done is not loaded for nothing)."""
    import yaml

    from common.config import read_yaml

    try:
        cfg = read_yaml(storage.join(export_of(ck), "config.yaml"))
    except (OSError, ValueError, yaml.YAMLError):
        return False          # no readable config: load_export reports it when a task loads it
    return bool((cfg.get("restore") or {}).get("enabled", False))


def publish_dir(local: Path, dest: str) -> None:
    """Copy a local artifact folder to its place in a remote run folder (nothing to do when local)."""
    if storage.is_remote(dest):
        storage.upload_dir(local, dest)


def evaluate_pending(run_dir: str, shards: str | dict[str, str], tasks: list[str], mlflow_uri: str | None,
                     every_n: int = 1, best_metric: str | None = None, registry_name: str | None = None,
                     before_task: Callable[[Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Score every (checkpoint, task) not in the ledger, on every dataset; returns what was newly scored.

    ``shards``: one shard location, or ``eval.datasets`` (name -> shards; the first is the internal
    set, the others score as ``external/<name>/<task>``). On an external dataset any error is recorded
    as that (checkpoint, task)'s result and the other datasets carry on (a missing dataset is the
    CLIs' and ``EvalThread``'s ``check_datasets``, before any scoring).

    Each result goes to the ledger, to ``step_X/eval/`` (tables, ROC curves) and, with a tracking
    URI, to the checkpoint's MLflow run at its training step. A checkpoint trained with
    ``restore.enabled`` also gets, after its tasks, the restoration picture (``restore.png``, one
    held-out study of the internal test split at a fixed corruption seed, and ``restore/error``:
    ``scoring.restore_picture``), recorded as job ``restore``; a failure there is a ledger error. After new results, the metric-over-
    checkpoints plot is refreshed and the best checkpoint on ``best_metric`` registered.
    ``before_task(checkpoint, task)`` runs before each task (tests inject faults with it)."""
    from evaluators import scoring

    # fail fast when MLflow is down (its client otherwise retries for minutes); the ledger keeps it
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    ledger = Ledger(storage.join(run_dir, "eval_ledger.jsonl"))
    done, new, run_id = ledger.done(), [], None
    if mlflow_uri:
        run_id = send_unlogged(run_dir, ledger, mlflow_uri)

    datasets = list(scoring.as_datasets(shards).items())

    def failed(ck: str, job: str, e: Exception, ds: tuple[str, str] | None = None) -> None:
        where = f"external dataset {ds[0]!r} ({ds[1]}): " if ds else ""
        ledger.record(storage.name(ck), job, -1, {}, error=f"{type(e).__name__}: {where}{e}"[:500],
                      dataset=ds[0] if ds else None, shards=ds[1] if ds else None)
        new.append({"checkpoint": storage.name(ck), "task": job, "step": None, "error": f"{where}{e}"[:200]})

    for ck in ready_checkpoints(run_dir, every_n):
        base, name = None, storage.name(ck)      # loaded once, for this checkpoint's first pending task
        for i, (ds, ds_shards) in enumerate(datasets):
            external = i > 0
            sc = None                            # this dataset's view of the checkpoint (own split cache)
            for task in tasks:
                job = external_key(ds, task) if external else task
                if (name, job) in done:
                    continue
                if before_task is not None:
                    before_task(ck, job)
                try:
                    base = base or scoring.Scoring(ck, datasets[0][1], tasks=tasks)
                    sc = sc or (base.on(ds_shards, ds) if external else base)
                    r = sc.score([task])
                except Exception as e:
                    if external:                 # one bad external dataset never stops the others
                        failed(ck, job, e, (ds, ds_shards))
                        continue
                    if not isinstance(e, (ValueError, FileNotFoundError)):
                        raise
                    # a split/label/mask missing, or the checkpoint rotated away (train.keep_checkpoints):
                    # recorded with its reason, not retried forever
                    if isinstance(e, FileNotFoundError) and storage.exists(ck):
                        raise
                    failed(ck, job, e)
                    continue
                logged = _publish(run_dir, ck, name, r, mlflow_uri, job)
                if logged:
                    run_id = r["mlflow_run_id"]
                ledger.record(name, job, int(r["step"]), r["metrics"], mlflow_run_id=r["mlflow_run_id"],
                              logged=logged, dataset=ds if external else None,
                              shards=ds_shards if external else None)
                new.append({"checkpoint": name, "task": job, "step": r["step"]})
        if (name, scoring.PICTURE) not in done and restore_enabled(ck):
            if before_task is not None:
                before_task(ck, scoring.PICTURE)
            try:                                 # the picture, after the tasks: it never stops scoring
                base = base or scoring.Scoring(ck, datasets[0][1], tasks=tasks)
                r = scoring.restore_picture(base, eval_dir(run_dir, name))
            except Exception as e:  # noqa: BLE001 - recorded with its reason, like a failed task
                failed(ck, scoring.PICTURE, e)
                continue
            logged = _publish(run_dir, ck, name, r, mlflow_uri, scoring.PICTURE)
            if logged:
                run_id = r["mlflow_run_id"]
            ledger.record(name, scoring.PICTURE, int(r["step"]), r["metrics"], mlflow_run_id=r["mlflow_run_id"],
                          logged=logged)
            new.append({"checkpoint": name, "task": scoring.PICTURE, "step": r["step"]})
    if (new or run_id) and mlflow_uri and run_id:
        publish_run_summary(run_dir, ledger, mlflow_uri, run_id, best_metric, registry_name)
    return new


def _publish(run_dir: str, ck: str, name: str, r: dict, mlflow_uri: str | None, job: str) -> bool | None:
    """Artifacts to ``step_X/eval/``, metrics and artifacts to MLflow: True sent, False MLflow down
    (the ledger keeps it), None nothing to send to."""
    from evaluators.artifacts import log_result, write_artifacts

    art = write_artifacts(r, eval_dir(run_dir, name))
    publish_dir(art, storage.join(ck, "eval"))
    if not (mlflow_uri and r["mlflow_run_id"]):
        return None
    try:
        log_result(mlflow_uri, r, art)
        return True
    except Exception as e:  # noqa: BLE001 - MLflow down: the ledger keeps it; sent when it is back
        logger.warning(f"MLflow unreachable ({type(e).__name__}); {name} {job} kept for later")
        return False


def send_unlogged(run_dir: str, ledger: Ledger, uri: str) -> str | None:
    """Send the results MLflow missed while it was down (metrics at their steps, the checkpoint's
    artifact folder); stops at the first failure (still down). Returns a run id that was reached."""
    from evaluators.artifacts import log_result

    run_id = None
    for rec in ledger.unlogged():
        art = eval_dir(run_dir, rec["checkpoint"])
        try:
            log_result(uri, {"mlflow_run_id": rec["mlflow_run_id"], "step": rec["step"], "metrics": rec["metrics"]},
                       art if art.is_dir() else None)
        except Exception:  # noqa: BLE001 - still down: try again at the next poll
            return run_id
        ledger.mark_logged(rec["checkpoint"], rec["task"])
        run_id = rec["mlflow_run_id"]
        logger.info(f"sent {rec['checkpoint']} {rec['task']} to MLflow (it was down when scored)")
    return run_id


def publish_run_summary(run_dir: str, ledger: Ledger, uri: str, run_id: str, best_metric: str | None,
                        registry_name: str | None) -> None:
    """Metric-over-checkpoints PNG to ``eval/`` of the run; the best checkpoint to the registry; the
    run's description (``evaluators.run_note``). An MLflow hiccup here is printed, never raised: the
    scores are already in the ledger."""
    from mlflow.tracking import MlflowClient

    from evaluators.artifacts import plot_over_checkpoints, register_best
    from evaluators.run_note import refresh_run_note

    try:
        records = ledger.results()
        png = plot_over_checkpoints(records, storage.local_state_dir(run_dir) / "metrics_over_checkpoints.png")
        if png is not None and storage.is_remote(run_dir):
            storage.write_bytes(storage.join(run_dir, png.name), png.read_bytes())
        if png is not None:
            MlflowClient(uri).log_artifact(run_id, str(png), "eval")
        if best_metric and registry_name:
            reg = register_best(uri, run_id, run_dir, records, best_metric, registry_name)
            if reg:
                logger.info(f"registered {reg['name']} v{reg['version']}: {reg['checkpoint']} "
                      f"({best_metric}={reg[best_metric]:.4f}), alias 'best'")
        refresh_run_note(MlflowClient(uri), run_id, records, best_metric or "zeroshot/mean_auc", registry_name)
    except Exception as e:  # noqa: BLE001
        logger.warning(f"MLflow summary failed (scores are in the ledger): {type(e).__name__}: {e}")


def make_actor(cpus: float, gpus: float = 0.0):
    import ray

    @ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=0)
    class Evaluator:
        def poll(self, *args, **kw):
            return evaluate_pending(*args, **kw)

    return Evaluator.remote()


def watch(run_dir: str, shards: str | dict[str, str], tasks: list[str], mlflow_uri: str | None, cpus: float = 0.5,
          every_n: int = 1, follow: bool = False, poll_s: float = 10.0, max_crashes: int = 5,
          best_metric: str | None = None, registry_name: str | None = None, gpus: float = 0.0,
          before_task: Callable[[Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Call the actor until no work is left (or forever with ``follow``); survive its crashes.
    ``before_task`` runs inside the actor before each task (tests inject faults with it)."""
    import ray
    from ray.exceptions import RayActorError

    actor, scored, crashes = make_actor(cpus, gpus), [], 0
    while True:
        try:
            new = ray.get(actor.poll.remote(run_dir, shards, tasks, mlflow_uri, every_n, best_metric,
                                            registry_name, before_task))
        except RayActorError as e:
            crashes += 1
            logger.error(f"evaluator crashed ({crashes}/{max_crashes}); Ray restarts it: {str(e)[:200]}")
            if crashes >= max_crashes:
                raise
            time.sleep(1.0)
            continue
        for n in new:
            what = f"FAILED: {n['error']}" if n.get("error") else "scored"
            logger.info(f"{n['checkpoint']} (step {n['step']}) {n['task']}: {what}")
        scored += new
        if not follow and not new:
            return scored
        time.sleep(poll_s if follow else 0)


class EvalThread:
    """Runs ``watch`` beside a training job in the driver (what ``trainer.pretrain`` starts when
    ``eval.enabled``; ``eval.watcher`` names it) on every dataset of ``eval.datasets`` (default
    ``data.shards``). Once running it never raises into the trainer; a dataset that cannot be read
    stops the launch here, before training and scoring start (ValueError naming it and its location)."""

    before_task: Callable[[Path, str], None] | None = None     # tests subclass and set a fault here

    def __init__(self, run_dir: str, cfg, mlflow_uri: str | None):
        import threading

        from evaluators.config import eval_datasets
        from evaluators.scoring import check_datasets

        e = cfg.eval
        datasets = eval_datasets(cfg)
        check_datasets(datasets)
        self.args = (run_dir, datasets, list(e.tasks), mlflow_uri, e.cpus, e.every_n_checkpoints)
        self.kw = {"best_metric": e.best_metric, "registry_name": e.registry_name or cfg.train.run_name,
                   "gpus": e.gpus, "before_task": self.before_task}
        self.poll_s, self.stop = e.poll_seconds, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="t3d-evaluator")

    def _once(self) -> None:
        try:
            watch(*self.args, follow=False, **self.kw)
        except Exception as e:  # the evaluator must never take the training run down
            logger.error(f"evaluator error (training unaffected): {type(e).__name__}: {e}")

    def _run(self) -> None:
        while not self.stop.wait(self.poll_s):
            self._once()

    def start(self) -> "EvalThread":
        self.thread.start()
        return self

    def finish(self) -> None:
        """Stop polling, then score whatever checkpoints are left."""
        self.stop.set()
        self.thread.join()
        self._once()


def main(argv=None) -> int:
    from evaluators import scoring

    p = argparse.ArgumentParser(prog="python -m evaluators.actor", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    scoring.add_cli_args(p, "shards to score on (repeatable: the first is the internal set, every other "
                            "NAME=SHARDS an external one, scored as external/NAME/...)")
    p.add_argument("--every-n", type=int, default=1, help="score every n-th checkpoint")
    p.add_argument("--cpus", type=float, default=0.5)
    p.add_argument("--gpus", type=float, default=0.0, help="GPU share of the evaluator actor")
    p.add_argument("--follow", action="store_true", help="keep watching for new checkpoints")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--best-metric", default="zeroshot/mean_auc",
                   help="register the best checkpoint on this (an external one: external/NAME/zeroshot/mean_auc)")
    p.add_argument("--registry-name", default=None, help="MLflow registered model (default: no registration)")
    log.add_level_arg(p)
    a = p.parse_args(argv)
    log.configure(a.log_level)
    tasks, datasets = scoring.parse_cli_args(a, best_metric=a.best_metric)
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
    scored = watch(a.run_dir, datasets, tasks, a.mlflow_uri, a.cpus, a.every_n, a.follow,
                   best_metric=a.best_metric, registry_name=a.registry_name, gpus=a.gpus)
    logger.info(f"{len(scored)} new (checkpoint, task) results; ledger {storage.join(a.run_dir, 'eval_ledger.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
