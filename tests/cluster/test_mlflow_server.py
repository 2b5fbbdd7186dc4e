"""`cluster.local.start_mlflow`: the tracking server without MLflow 3's GenAI job runner (its huey
consumers were 8 more processes and 1.2 GB, and slowed the server's start on a loaded machine)."""
from __future__ import annotations

import os
import signal

import pytest


@pytest.mark.timeout(300)
def test_mlflow_server_starts_without_its_job_runner(tmp_path):
    import psutil

    from cluster.local import HOST, _free_port, _wait, start_mlflow

    port = _free_port()
    proc = start_mlflow(tmp_path, port)
    try:
        _wait(f"http://{HOST}:{port}/health", 240, "MLflow server")
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        cmds = [" ".join(psutil.Process(p).cmdline()) for p in tree if psutil.pid_exists(p)]
        assert not [c for c in cmds if "huey" in c or "jobs" in c], cmds
        assert len(cmds) <= 3, cmds                                 # mlflow, uvicorn (and its worker)
        assert psutil.Process(proc.pid).environ()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
