"""MLflow logging for the trainer's rank 0, which outlives a tracking server that goes away.

Metrics are queued and sent in batches; when the server does not answer, they stay queued (a
warning is printed once per outage) and go out, with their original steps and timestamps, on
the next successful send. The queue is bounded (``MAX_QUEUED``); what an outage longer than that
pushes out is counted and logged as ``tracking/dropped_metrics`` when the server is back.
"""
from __future__ import annotations

import math
import time
from collections import deque


class Tracker:
    MAX_QUEUED = 200_000

    def __init__(self, uri: str | None, run_id: str | None, client=None):
        self.run_id = run_id
        self.client = client
        if self.client is None and uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)
        self.queue: deque = deque()
        self.dropped = 0
        self.down_since: float | None = None

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                if len(self.queue) >= self.MAX_QUEUED:
                    self.queue.popleft()
                    self.dropped += 1
                self.queue.append(Metric(k, float(v), ts, int(step)))
        self.flush()

    def flush(self) -> bool:
        """Send what is queued; False (and everything kept) when the server does not answer."""
        if not self.enabled:
            return True
        from mlflow.entities import Metric

        try:
            while self.queue:
                chunk = [self.queue[i] for i in range(min(1000, len(self.queue)))]
                self.client.log_batch(self.run_id, metrics=chunk)
                for _ in chunk:
                    self.queue.popleft()
            if self.dropped:
                self.client.log_batch(self.run_id, metrics=[Metric("tracking/dropped_metrics", float(self.dropped),
                                                                   int(time.time() * 1000), 0)])
                self.dropped = 0
        except Exception as e:  # noqa: BLE001 - any failure of the server or the network
            if self.down_since is None:
                self.down_since = time.time()
                print(f"[t3d] MLflow unreachable ({type(e).__name__}: {str(e)[:120]}); "
                      f"queuing metrics until it is back", flush=True)
            return False
        if self.down_since is not None:
            print(f"[t3d] MLflow is back after {time.time() - self.down_since:.0f} s; queued metrics sent", flush=True)
            self.down_since = None
        return True
