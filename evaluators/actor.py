"""Continuous evaluation: a Ray actor scores each new checkpoint of a run, once per task.

    python -m evaluators.actor --run-dir RUN --data SHARDS [--tasks all] [--follow] [--registry-name t3d]

The ledger (``{run_dir}/eval_ledger.jsonl``, one line per checkpoint x task) makes the work
idempotent: a restarted evaluator skips what is recorded and redoes nothing. The actor has its own
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

from common import storage


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
               error: str | None = None, mlflow_run_id: str | None = None, logged: bool | None = None) -> None:
        self._append({"checkpoint": checkpoint, "task": task, "step": step, "metrics": metrics, "error": error,
                      "mlflow_run_id": mlflow_run_id, "logged": logged})

    def mark_logged(self, checkpoint: str, task: str) -> None:
        self._append({"checkpoint": checkpoint, "task": task, "event": "logged"})


def ready_checkpoints(run_dir: str | Path, every_n: int = 1) -> list[str]:
    """step_* folders (paths or URIs) whose export is complete (export.json is written after the weights)."""
    ck = [p for p in storage.glob(run_dir, "step_*") if storage.isfile(storage.join(p, "export", "export.json"))
          and storage.isfile(storage.join(p, "export", "model.safetensors"))]
    return ck[every_n - 1::every_n] if every_n > 1 else ck


def eval_dir(run_dir: str | Path, checkpoint: str) -> Path:
    """The local folder of a checkpoint's evaluation artifacts: ``step_X/eval/`` itself for a local
    run, a folder in the cache (uploaded to ``step_X/eval/`` after each task) for a remote one."""
    return Path(storage.join(storage.local_state_dir(run_dir), checkpoint, "eval"))


def publish_dir(local: Path, dest: str) -> None:
    """Copy a local artifact folder to its place in a remote run folder (nothing to do when local)."""
    if storage.is_remote(dest):
        storage.upload_dir(local, dest)


def evaluate_pending(run_dir: str, shards: str, tasks: list[str], mlflow_uri: str | None,
                     every_n: int = 1, best_metric: str | None = None, registry_name: str | None = None,
                     before_task: Callable[[Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Score every (checkpoint, task) not in the ledger; returns what was newly scored.

    Each result goes to the ledger, to ``step_X/eval/`` (tables, ROC curves) and, with a tracking
    URI, to the checkpoint's MLflow run at its training step. After new results, the metric-over-
    checkpoints plot is refreshed and the best checkpoint on ``best_metric`` registered.
    ``before_task(checkpoint, task)`` runs before each task (tests inject faults with it)."""
    from evaluators import scoring
    from evaluators.artifacts import log_result, write_artifacts

    # fail fast when MLflow is down (its client otherwise retries for minutes); the ledger keeps it
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    ledger = Ledger(storage.join(run_dir, "eval_ledger.jsonl"))
    done, new, run_id = ledger.done(), [], None
    if mlflow_uri:
        run_id = send_unlogged(run_dir, ledger, mlflow_uri)

    def failed(ck: str, task: str, e: Exception) -> None:
        ledger.record(storage.name(ck), task, -1, {}, error=f"{type(e).__name__}: {e}"[:500])
        new.append({"checkpoint": storage.name(ck), "task": task, "step": None, "error": str(e)[:200]})

    for ck in ready_checkpoints(run_dir, every_n):
        sc, name = None, storage.name(ck)      # loaded once, for this checkpoint's first pending task
        for task in [t for t in tasks if (name, t) not in done]:
            if before_task is not None:
                before_task(ck, task)
            try:
                sc = sc or scoring.Scoring(ck, shards, tasks=tasks)
                r = sc.score([task])
            except (ValueError, FileNotFoundError) as e:
                # a split/label/mask missing, or the checkpoint rotated away (train.keep_checkpoints):
                # recorded with its reason, not retried forever
                if isinstance(e, FileNotFoundError) and storage.exists(ck):
                    raise
                failed(ck, task, e)
                continue
            art = write_artifacts(r, eval_dir(run_dir, name))
            publish_dir(art, storage.join(ck, "eval"))
            logged = None
            if mlflow_uri and r["mlflow_run_id"]:
                try:
                    log_result(mlflow_uri, r, art)
                    logged, run_id = True, r["mlflow_run_id"]
                except Exception as e:  # noqa: BLE001 - MLflow down: the ledger keeps it; sent when it is back
                    logged = False
                    print(f"[eval] MLflow unreachable ({type(e).__name__}); {name} {task} kept for later", flush=True)
            ledger.record(name, task, int(r["step"]), r["metrics"], mlflow_run_id=r["mlflow_run_id"], logged=logged)
            new.append({"checkpoint": name, "task": task, "step": r["step"]})
    if (new or run_id) and mlflow_uri and run_id:
        publish_run_summary(run_dir, ledger, mlflow_uri, run_id, best_metric, registry_name)
    return new


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
        print(f"[eval] sent {rec['checkpoint']} {rec['task']} to MLflow (it was down when scored)", flush=True)
    return run_id


def publish_run_summary(run_dir: str, ledger: Ledger, uri: str, run_id: str, best_metric: str | None,
                        registry_name: str | None) -> None:
    """Metric-over-checkpoints PNG to ``eval/`` of the run; the best checkpoint to the registry.
    An MLflow hiccup here is printed, never raised: the scores are already in the ledger."""
    from mlflow.tracking import MlflowClient

    from evaluators.artifacts import plot_over_checkpoints, register_best

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
                print(f"[eval] registered {reg['name']} v{reg['version']}: {reg['checkpoint']} "
                      f"({best_metric}={reg[best_metric]:.4f}), alias 'best'", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"[eval] MLflow summary failed (scores are in the ledger): {type(e).__name__}: {e}", flush=True)


def make_actor(cpus: float, gpus: float = 0.0):
    import ray

    @ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=0)
    class Evaluator:
        def poll(self, *args, **kw):
            return evaluate_pending(*args, **kw)

    return Evaluator.remote()


def watch(run_dir: str, shards: str, tasks: list[str], mlflow_uri: str | None, cpus: float = 0.5,
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
            print(f"[eval] evaluator crashed ({crashes}/{max_crashes}); Ray restarts it: {str(e)[:200]}", flush=True)
            if crashes >= max_crashes:
                raise
            time.sleep(1.0)
            continue
        for n in new:
            what = f"FAILED: {n['error']}" if n.get("error") else "scored"
            print(f"[eval] {n['checkpoint']} (step {n['step']}) {n['task']}: {what}", flush=True)
        scored += new
        if not follow and not new:
            return scored
        time.sleep(poll_s if follow else 0)


class EvalThread:
    """Runs ``watch`` beside a training job in the driver (what ``trainer.pretrain`` starts when
    ``eval.enabled``; ``eval.watcher`` names it); never raises into the trainer."""

    before_task: Callable[[Path, str], None] | None = None     # tests subclass and set a fault here

    def __init__(self, run_dir: str, cfg, mlflow_uri: str | None):
        import threading

        e = cfg.eval
        self.args = (run_dir, cfg.data.shards, list(e.tasks), mlflow_uri, e.cpus, e.every_n_checkpoints)
        self.kw = {"best_metric": e.best_metric, "registry_name": e.registry_name or cfg.train.run_name,
                   "gpus": e.gpus, "before_task": self.before_task}
        self.poll_s, self.stop = e.poll_seconds, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="t3d-evaluator")

    def _once(self) -> None:
        try:
            watch(*self.args, follow=False, **self.kw)
        except Exception as e:  # the evaluator must never take the training run down
            print(f"[eval] evaluator error (training unaffected): {type(e).__name__}: {e}", flush=True)

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
    p = argparse.ArgumentParser(prog="python -m evaluators.actor", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--tasks", default="all", help="comma list or 'all'")
    p.add_argument("--every-n", type=int, default=1, help="score every n-th checkpoint")
    p.add_argument("--cpus", type=float, default=0.5)
    p.add_argument("--gpus", type=float, default=0.0, help="GPU share of the evaluator actor")
    p.add_argument("--follow", action="store_true", help="keep watching for new checkpoints")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--best-metric", default="zeroshot/mean_auc", help="register the best checkpoint on this")
    p.add_argument("--registry-name", default=None, help="MLflow registered model (default: no registration)")
    a = p.parse_args(argv)
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
    from evaluators.scoring import parse_tasks

    try:
        tasks = parse_tasks(a.tasks)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    scored = watch(a.run_dir, a.data, tasks, a.mlflow_uri, a.cpus, a.every_n, a.follow,
                   best_metric=a.best_metric, registry_name=a.registry_name, gpus=a.gpus)
    print(f"[eval] {len(scored)} new (checkpoint, task) results; ledger {storage.join(a.run_dir, 'eval_ledger.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
