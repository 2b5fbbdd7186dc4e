"""MLflow logging for the trainer's rank 0 that never blocks training and outlives a tracking
server that goes away.

``log`` only queues (with the original step and time); a background thread sends the queue in
batches. When the server does not answer, the metrics stay queued (a warning is printed once per
outage) and go out when it is back. ``close`` waits a bounded time for the queue to drain; what is
still unsent then (the server is down at the end of the run) is spooled to a file in the run
folder and sent by the next ``Tracker`` of that run: a resume, or ``send_spool``, which the driver
(``trainer.pretrain.fit``) calls once the workers are done, so a run that is never resumed (a sweep
trial, a finished run) still gets its last metrics whenever the server answers then. The queue is bounded
(``MAX_QUEUED``): what an outage longer than that pushes out is counted and logged as
``tracking/dropped_metrics`` once the server is back.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from pathlib import Path

from common import log
from common.metric_names import mlflow_name

logger = log.get(__name__)

# MLflow retries a failed request 7 times with exponential backoff (minutes): in the processes that
# log through a Tracker, fail fast instead and let the queue retry.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
SPOOL = "mlflow_spool.jsonl"        # in the run folder: what rank 0 could not send


class Tracker:
    MAX_QUEUED = 200_000
    RETRY_S = 2.0

    def __init__(self, uri: str | None, run_id: str | None, spool: str | Path | None = None, client=None):
        self.run_id, self.client = run_id, client
        if self.client is None and uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)
        self.spool = Path(spool) if spool else None
        self.queue: deque = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.dropped = 0
        self.down_since: float | None = None
        self.thread = None
        if self.enabled:
            self._load_spool()
            self.thread = threading.Thread(target=self._run, daemon=True, name="t3d-mlflow")
            self.thread.start()

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue the finite metrics at ``step`` under their MLflow names (``mlflow_name``); returns at once."""
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        with self.lock:
            for k, v in metrics.items():
                if v is not None and math.isfinite(float(v)):
                    if len(self.queue) >= self.MAX_QUEUED:
                        self.queue.popleft()
                        self.dropped += 1
                    self.queue.append((mlflow_name(k), float(v), ts, int(step)))
        self.wake.set()

    def pending(self) -> int:
        with self.lock:
            return len(self.queue)

    def close(self, timeout: float = 30.0) -> int:
        """Stop the sender after at most ``timeout`` s of trying; spool what is left. Returns its count."""
        if not self.enabled:
            return 0
        deadline = time.time() + timeout
        while self.pending() and time.time() < deadline:
            self.wake.set()
            time.sleep(0.1)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=max(1.0, deadline - time.time()))
        left = self.pending()
        if left and self.spool is not None:
            with self.lock, open(self.spool, "a") as f:
                for m in self.queue:
                    f.write(json.dumps(m) + "\n")
            logger.warning(f"MLflow still unreachable: {left} metrics spooled to {self.spool}; "
                  "a resumed run sends them")
        return left

    # -------------------------------------------------------------------------------- sender
    def _load_spool(self) -> None:
        if self.spool is not None and self.spool.is_file():
            rows = [tuple(json.loads(x)) for x in self.spool.read_text().splitlines() if x.strip()]
            self.queue.extend(rows)
            self.spool.unlink()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(self.RETRY_S)
            self.wake.clear()
            self._send()

    def _send(self) -> bool:
        from mlflow.entities import Metric

        try:
            while True:
                with self.lock:
                    chunk = [self.queue[i] for i in range(min(1000, len(self.queue)))]
                if not chunk:
                    break
                self.client.log_batch(self.run_id, metrics=[Metric(*m) for m in chunk])
                with self.lock:
                    for _ in chunk:
                        self.queue.popleft()
            if self.dropped:
                dropped = Metric(mlflow_name("tracking/dropped_metrics"), float(self.dropped), int(time.time() * 1000), 0)
                self.client.log_batch(self.run_id, metrics=[dropped])
                self.dropped = 0
        except Exception as e:  # noqa: BLE001 - any failure of the server or the network
            if self.down_since is None:
                self.down_since = time.time()
                logger.warning(f"MLflow unreachable ({type(e).__name__}: {str(e)[:120]}); "
                      f"queuing metrics until it is back")
            return False
        if self.down_since is not None:
            logger.info(f"MLflow is back after {time.time() - self.down_since:.0f} s; queued metrics sent")
            self.down_since = None
        return True


def send_spool(uri: str | None, run_id: str | None, spool: str | Path, timeout: float = 60.0, client=None) -> int:
    """Send the metrics a run's workers spooled (``Tracker.close`` could not send them) to ``run_id``,
    trying for at most ``timeout`` s; what is still unsent stays spooled. Returns that count (0, and
    the spool untouched, when there is no spool or no tracking)."""
    if not Path(spool).is_file() or not ((uri and run_id) or client):
        return 0
    t = Tracker(uri, run_id, spool, client=client)
    n = t.pending()
    left = t.close(timeout)
    if n and not left:
        logger.info(f"sent {n} spooled metrics to MLflow run {run_id}")
    return left


def register_checkpoint(uri: str, run_id: str, export: str | Path, name: str, tags: dict[str, str],
                        artifact_path: str, alias: str = "best") -> str | None:
    """Upload an export folder to ``run_id`` (``artifact_path``) and register it as a new version of
    model ``name`` with ``alias``, unless the alias already points at a version with the same
    ``tags['step']`` of the same run. Returns the new version, or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.create_registered_model(name, description=f"T3D checkpoints ({alias}: {tags.get('metric', '')})")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    try:
        cur = client.get_model_version_by_alias(name, alias)
        if cur.tags.get("step") == tags.get("step") and cur.run_id == run_id:
            return None
    except MlflowException:
        pass                                  # no alias yet
    client.log_artifacts(run_id, str(export), artifact_path)
    mv = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, mv.version)
    return mv.version
