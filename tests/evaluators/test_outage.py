"""MLflow goes away during training and evaluation: nothing is lost, everything arrives when it is back."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.evaluators.test_tasks import _plain_export


class Server:
    """An MLflow server on loopback that can be stopped and started again on the same store and port."""

    def __init__(self, root):
        from cluster.local import HOST, _free_port

        self.root, self.port = root, _free_port()
        self.uri = f"http://{HOST}:{self.port}"
        self.proc = None

    def start(self):
        from cluster.local import _wait, start_mlflow

        self.proc = start_mlflow(self.root, self.port)
        _wait(self.uri + "/health", 300, "MLflow server")   # a loaded 2-core machine: minutes

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


def _until(cond, seconds=60):
    t = time.time()
    while not cond():
        assert time.time() - t < seconds, "timed out"
        time.sleep(0.2)


@pytest.mark.timeout(600)
def test_metrics_survive_an_mlflow_outage(tmp_path, phantom):
    from mlflow.tracking import MlflowClient

    from evaluators.actor import Ledger, evaluate_pending
    from trainer.tracking import Tracker

    server = Server(tmp_path / "mlflow")
    server.start()
    try:
        client = MlflowClient(server.uri)
        from trainer.dashboard import experiment_id  # get-or-create: a busy server's retry

        run_id = client.create_run(experiment_id(client, "outage")).info.run_id
        tracker = Tracker(server.uri, run_id, tmp_path / "spool.jsonl")
        tracker.log({"loss/loss": 3.0}, 1)
        _until(lambda: tracker.pending() == 0)
        server.stop()                                         # --- down
        t = time.time()
        for step in (2, 3, 4):
            tracker.log({"loss/loss": 3.0 - step / 10, "lr": 1e-3}, step)
        assert time.time() - t < 1.0                          # training never waits for MLflow
        _until(lambda: tracker.down_since is not None)
        assert tracker.pending() == 6
        _plain_export(tmp_path / "run", 7, info={"mlflow_run_id": run_id})
        new = evaluate_pending(str(tmp_path / "run"), str(phantom / "shards"), ["retrieval"], server.uri)
        assert [n["checkpoint"] for n in new] == ["step_0000007"]          # scored while MLflow was down
        assert [r["logged"] for r in Ledger(tmp_path / "run" / "eval_ledger.jsonl").results()] == [False]
        server.start()                                        # --- back
        tracker.log({"loss/loss": 2.5}, 5)
        _until(lambda: tracker.pending() == 0)
        assert tracker.close() == 0
        assert evaluate_pending(str(tmp_path / "run"), str(phantom / "shards"), ["retrieval"], server.uri) == []
        assert Ledger(tmp_path / "run" / "eval_ledger.jsonl").unlogged() == []
        hist = client.get_metric_history(run_id, "loss/loss")
        assert sorted((m.step, round(m.value, 3)) for m in hist) == [(1, 3.0), (2, 2.8), (3, 2.7), (4, 2.6), (5, 2.5)]
        assert [m.step for m in client.get_metric_history(run_id, "lr")] == [2, 3, 4]
        assert [m.step for m in client.get_metric_history(run_id, "task/retrieval/i2t_R_at_1")] == [7]
    finally:
        if server.proc and server.proc.poll() is None:
            server.stop()
