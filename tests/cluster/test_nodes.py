"""Two Ray nodes on one machine: a job spreads its workers over both, the second node is killed
mid-run, the run continues on the head alone (elastic, via a universal checkpoint) and finishes;
`down` leaves no process behind. And what a multi-node cluster listens on beyond loopback: only the
Ray servers named in ``ALL_INTERFACES``, each with its reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cluster import local
from tests.cluster import procs
from tests.conftest import REPO

# Ray 2.60 on a node whose IP is not loopback binds its gRPC servers to all interfaces (the fixes,
# ray-project/ray #55484 and #59852, were reverted before 2.60: #55962, #60012), and a loopback IP
# refuses a second node (cluster/local.py, LOOPBACK_ONLY). Token auth guards each of them.
ALL_INTERFACES = {
    "gcs_server": "the GCS: every node's raylet and every driver connect to it",
    "raylet": "node manager and object manager: the other nodes' raylets fetch objects from them",
    "ray::IDLE": "a worker's core-worker gRPC server: other nodes' workers call its actors and tasks",
    "ray::DashboardAgent": "the per-node agent (gRPC and metrics): the head's dashboard polls it",
    "ray::RuntimeEnvAgent": "the runtime-env agent, started by the raylet with the node IP",
    "python3": "a worker or agent before Ray renames it (the same servers as above)",
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _train_workers(st: dict, node: int) -> list:
    return [p for p in local.node_procs(st, node) if "RayTrainWorker" in " ".join(p.cmdline() or [p.name()])]


def test_second_node_lost_mid_run(phantom, tmp_path):
    sd, out = tmp_path / "cluster", tmp_path / "runs"
    st = local.up(sd, num_cpus=4, mlflow_port=5057, dashboard_port=8277, ray_port=6393, object_store_mb=400,
                  worker_slots=1, multinode=True)
    try:
        st = local.add_node(sd, num_cpus=2)
        assert [n["node"] for n in st["nodes"]] == [2]
        deadline = time.time() + 120
        while "/2.0 train_slot" not in _ray("status", "--address", st["ray_address"]).stdout:
            assert time.time() < deadline, "the second node's train_slot never showed in `ray status`"
            time.sleep(2)
        wide = [x for x in procs.listeners(procs.cluster_pids(st)) if not procs.is_loopback(x[0])]
        assert wide, "no Ray server on all interfaces: Ray binds loopback now; make multi-node loopback-only"
        assert {name for _, _, _, name in wide} <= set(ALL_INTERFACES), wide     # a new one: name it, or fix it
        for pid in (st["mlflow_pid"],):                                            # ours stay on loopback
            assert all(procs.is_loopback(ip) for ip, *_ in procs.listeners({pid})), procs.listeners({pid})
        sets = {"data.shards": phantom / "shards", "train.output_dir": out, "train.run_name": "job",
                "train.steps": 8, "train.batch_size": 2, "train.checkpoint_every": 2, "train.log_every": 1,
                "deepspeed.zero_stage": 2, "ray.num_workers": 2, "ray.min_workers": 1, "ray.max_failures": 3,
                "ray.worker_resources": "{train_slot: 1}", "ray.placement_strategy": "SPREAD"}
        cmd = ["job", "submit", "--no-wait", "--submission-id", "nodes-test", "--address", st["dashboard"],
               "--working-dir", str(REPO), "--", "python", "-m", "trainer.pretrain", "--config", "configs/debug.yaml"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        r = _ray(*cmd)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # one training worker on each node (one train_slot each); once a 2-worker checkpoint is
        # written, node 2 dies without warning
        deadline = time.time() + 600

        def latest_registered_world() -> int | None:
            """The world size of the newest checkpoint Ray Train has registered (what a restart loads)."""
            try:
                snap = json.loads((out / "job" / "checkpoint_manager_snapshot.json").read_text())
                name = snap["checkpoint_results"][-1]["checkpoint_dir_name"]
                return json.loads((out / "job" / name / "state.json").read_text())["world"]
            except (OSError, ValueError, KeyError, IndexError):
                return None                                # not yet, or being written

        while latest_registered_world() != 2:
            assert time.time() < deadline, _ray("job", "logs", "nodes-test", "--address", st["dashboard"]).stdout[-4000:]
            time.sleep(1)
        assert _train_workers(st, 2), "no training worker on node 2"
        assert local.kill_node(st, 2) > 0
        while True:
            s = _ray("job", "status", "nodes-test", "--address", st["dashboard"]).stdout.lower()
            if any(w in s for w in ("succeeded", "failed", "stopped")):
                break
            assert time.time() < deadline + 600, s
            time.sleep(3)
        logs = _ray("job", "logs", "nodes-test", "--address", st["dashboard"]).stdout
        (tmp_path / "job.log").write_text(logs)
        assert "succeeded" in s, logs[-5000:]
        assert "saved by 2 worker(s), resuming on 1" in logs, logs[-5000:]   # through the universal checkpoint
        final = json.loads((out / "job" / "step_0000008" / "state.json").read_text())
        assert final["step"] == 8 and final["world"] == 1
        summary = json.loads((out / "job" / "summary.json").read_text())
        assert summary["error"] is None and summary["checkpoints"][-1] == "step_0000008"
    finally:
        started = procs.raylets(st)
        local.down(sd)
    assert started and not procs.left_after_down(st, started)
