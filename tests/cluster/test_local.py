"""`cluster.local up` -> `ray job submit` a short pretraining -> MLflow has it -> `down` stops it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster import local
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_job_submit_against_local_head(phantom, tmp_path):
    sd = tmp_path / "cluster"
    st = local.up(sd, num_cpus=8, mlflow_port=5055, dashboard_port=8275, ray_port=6391, object_store_mb=400)
    try:
        assert st["mlflow_uri"].startswith("http://127.0.0.1:") and st["dashboard"].startswith("http://127.0.0.1:")
        assert local.status(sd) == 0
        # security: a job submitted without the token (or with a wrong one) is refused
        import urllib.error
        import urllib.request

        body = json.dumps({"entrypoint": "echo should-not-run"}).encode()
        for headers, code in (({}, 401), ({"Authorization": "Bearer wrong-token"}, 403)):
            req = urllib.request.Request(st["dashboard"] + "/api/jobs/", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == code
        # the dashboard (and its job server) and MLflow listen on loopback only
        listening = _listeners()
        for url in (st["dashboard"], st["mlflow_uri"]):
            port = int(url.rsplit(":", 1)[1])
            assert listening.get(port) and listening[port] <= {"127.0.0.1"}, (port, listening.get(port))
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        out = tmp_path / "runs"
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", st["dashboard"],
               "--working-dir", str(REPO), "--", "python", "-m", "trainer.pretrain", "--config", "configs/debug.yaml",
               "--set", f"data.shards={phantom / 'shards'}", "--set", f"train.output_dir={out}",
               "--set", "train.run_name=job", "--set", "train.steps=2", "--set", "train.batch_size=2",
               "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
               "--set", "eval.enabled=true", "--set", "eval.tasks=[retrieval]", "--set", "eval.poll_seconds=2"]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr)
        summary = json.loads((out / "job/summary.json").read_text())
        assert summary["error"] is None and summary["checkpoints"] == ["step_0000002"]
        # the job driver inherited MLFLOW_TRACKING_URI from the head: metrics are in MLflow
        from mlflow.tracking import MlflowClient

        assert summary["mlflow_uri"] == st["mlflow_uri"]
        hist = MlflowClient(st["mlflow_uri"]).get_metric_history(summary["mlflow_run_id"], "loss/loss")
        assert [m.step for m in hist] == [1, 2]
        # the evaluator actor scored the checkpoint during the job, into the ledger and MLflow
        ledger = [json.loads(x) for x in (out / "job/eval_ledger.jsonl").read_text().splitlines()]
        assert [(r["checkpoint"], r["task"], r["error"]) for r in ledger] == [("step_0000002", "retrieval", None)]
        r1 = MlflowClient(st["mlflow_uri"]).get_metric_history(summary["mlflow_run_id"], "retrieval/i2t_R_at_1")
        assert [m.step for m in r1] == [2]
        hist = MlflowClient(st["mlflow_uri"]).get_metric_history(summary["mlflow_run_id"], "health/image_cosine")
        assert [m.step for m in hist] == [1, 2]                   # representation health is logged too
    finally:
        raylets = _raylets(st)
        local.down(sd)
    assert local.status(sd) == 1
    import psutil

    assert raylets
    left = [p for p in psutil.process_iter(["name"]) if _belongs(p, st, raylets)]
    assert not left, [p.info["name"] for p in left]             # DashboardAgent, RuntimeEnvAgent ... too


def _raylets(st) -> set[int]:
    """The cluster's raylets and everything under them, found by the temp dir in the raylets' command
    lines (independently of ``local._ray_procs``), before `down`."""
    import psutil

    out = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and any(st["ray_temp_dir"] in a for a in (p.info["cmdline"] or [])):
            out |= {p.pid} | {c.pid for c in p.children(recursive=True)}
    return out


def _belongs(p, st, started: set[int]) -> bool:
    """Started by the cluster: our marker in its environment, or a raylet or one of its descendants
    (Ray's agents: on a fresh install they had no marker and outlived `down`, busy)."""
    import psutil

    try:
        if p.status() == psutil.STATUS_ZOMBIE:       # dead, only not yet reaped: nothing runs
            return False
        return p.pid in started or p.environ().get(local.MARKER) == st["marker"]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _listeners() -> dict[int, set[str]]:
    import psutil

    out: dict[int, set[str]] = {}
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN:
            out.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return out
