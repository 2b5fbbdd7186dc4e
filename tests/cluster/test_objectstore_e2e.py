"""End to end on object storage, with faults: `cluster.local up --storage` (Ray, MLflow with its
artifacts in the bucket, SeaweedFS on loopback), phantoms ingested to s3://, `ray job submit`
pretraining with its output on s3://, one training worker killed after a checkpoint, the object
store stopped while a later checkpoint is being saved and started again, the evaluator actor
scoring from s3://; and no shard or checkpoint written to local disk outside the cache. Also the
local cluster itself: a job without the token (or with a wrong one) is refused, the training run's
metrics reach MLflow by step, and `down` leaves no process behind."""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import local, objectstore
from common import storage
from common.metric_names import mlflow_name
from tests.cluster import procs
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

HEAVY = ("*.tar", "model.safetensors", "*model_states.pt", "*optim_states.pt", "rng_rank*.pt", "buffers_rank*.pt")


def _sh(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _heavy_files(roots: list[Path], since: float, skip: list[Path]) -> list[str]:
    """Shard and checkpoint files written since ``since`` under ``roots``, outside ``skip``."""
    found = []
    for root in roots:
        for d, dirs, files in os.walk(root):
            # runtime_resources: Ray's copy of the job's working dir (the repo, with its test fixtures)
            dirs[:] = [x for x in dirs if not any(Path(d, x).resolve() == s.resolve() for s in skip)
                       and x not in (".venv", ".git", "pip", "runtime_resources")]
            for f in files:
                p = Path(d, f)
                try:
                    new = p.stat().st_mtime >= since
                except OSError:
                    continue
                if new and any(fnmatch.fnmatch(f, pat) for pat in HEAVY):
                    found.append(str(p))
    return found


@pytest.fixture
def short_cache():
    """The cluster's cache and TMPDIR, at a short path: Ray's dashboard binds a forkserver socket under
    TMPDIR, and a pytest-xdist worker's tmp_path is past AF_UNIX's 107 bytes from there."""
    d = Path(tempfile.mkdtemp(prefix="t3d-e2e-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_pretrain_on_object_storage_with_faults(tmp_path, monkeypatch, tmp_path_factory, short_cache):
    t0 = time.time()
    cache = short_cache
    (cache / "tmp").mkdir(parents=True)
    monkeypatch.setenv("T3D_CACHE_DIR", str(cache))        # the cluster's processes inherit both
    monkeypatch.setenv("TMPDIR", str(cache / "tmp"))
    sd = tmp_path / "cluster"
    st = local.up(sd, num_cpus=8, mlflow_port=5061, dashboard_port=8281, ray_port=6397, object_store_mb=400,
                  storage=True)
    store = objectstore.load(sd / "objectstore")
    env = {**os.environ, **store.env(), "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": st["mlflow_uri"]}
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    shards, out = store.uri("e2e", "shards"), store.uri("e2e", "runs")
    py, ray = sys.executable, str(Path(sys.executable).parent / "ray")
    try:
        _refuses_jobs_without_the_token(st["dashboard"])
        # one node: everything the cluster opened (Ray's servers and workers, MLflow, the store) is on loopback
        wide = [x for x in procs.listeners(procs.cluster_pids(st)) if not procs.is_loopback(x[0])]
        assert not wide, wide
        ports = {port for _, port, _, _ in procs.listeners(procs.cluster_pids(st))}
        assert {int(u.rsplit(":", 1)[1]) for u in (st["mlflow_uri"], st["dashboard"], store.endpoint)} <= ports, ports
        r = _sh([py, "-m", "data_service.synth", "--out", str(tmp_path / "raw"), "--n", "24", "--seed", "5"], env)
        assert r.returncode == 0, r.stderr[-2000:]
        r = _sh([py, "-m", "data_service.ingest", "--source", "ctrate", "--input", str(tmp_path / "raw"),
                 "--out", shards, "--config", "configs/debug.yaml", "--no-progress"], env)
        assert r.returncode == 0 and "rejected=0" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        sets = {"data.shards": shards, "train.output_dir": out, "train.run_name": "job", "train.steps": 8,
                "train.batch_size": 2, "train.checkpoint_every": 2, "train.log_every": 1, "ray.num_workers": 2,
                "ray.max_failures": 6, "tracking.mlflow_uri": st["mlflow_uri"], "eval.enabled": "true",
                "eval.tasks": "[retrieval]", "eval.poll_seconds": 5}
        cmd = [ray, "job", "submit", "--no-wait", "--submission-id", "s3-e2e", "--address", st["dashboard"],
               "--working-dir", str(REPO), "--", "python", "-m", "trainer.pretrain", "--config", "configs/debug.yaml"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        r = _sh(cmd, env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        run = storage.join(out, "job")
        deadline = time.time() + 900

        def logs() -> str:
            return _sh([ray, "job", "logs", "s3-e2e", "--address", st["dashboard"]], env).stdout

        def registered() -> list[str]:
            """Checkpoints Ray Train has registered (a restart loads the newest)."""
            try:
                snap = json.loads(storage.read_text(storage.join(run, "checkpoint_manager_snapshot.json")))
                return [c["checkpoint_dir_name"] for c in snap["checkpoint_results"]]
            except (OSError, ValueError, KeyError):
                return []

        # fault 1: a training worker killed once the step-2 checkpoint is registered
        while "step_0000002" not in registered():
            assert time.time() < deadline, logs()[-5000:]
            time.sleep(1)
        import psutil

        def is_train_worker(p) -> bool:
            try:
                return "RayTrainWorker" in " ".join(p.cmdline() or [p.name()])
            except psutil.Error:          # gone between the listing and the look (an idle worker exiting)
                return False

        workers = [p for p in local._ray_procs(st) if is_train_worker(p)]
        assert workers, "no Ray Train worker found"
        workers[-1].kill()
        while "this attempt resumes from" not in logs():
            assert time.time() < deadline, logs()[-5000:]
            time.sleep(2)
        # fault 2: the store stops while the next checkpoint is being staged and uploaded, then comes back
        scratch = cache / "scratch"
        stale = set(scratch.iterdir())            # a killed worker's staging folder stays (in the cache)
        while not any((d / "ds").exists() for d in scratch.iterdir() if d.is_dir() and d not in stale):
            assert time.time() < deadline, logs()[-5000:]
            time.sleep(0.2)
        objectstore.stop(store, grace=5)
        time.sleep(15)
        store = objectstore.start(sd / "objectstore")
        while True:
            s = _sh([ray, "job", "status", "s3-e2e", "--address", st["dashboard"]], env).stdout.lower()
            if any(w in s for w in ("succeeded", "failed", "stopped")):
                break
            assert time.time() < deadline + 300, s
            time.sleep(3)
        text = logs()
        (tmp_path / "job.log").write_text(text)
        assert "succeeded" in s, text[-6000:]
        assert text.count("this attempt resumes from s3://t3d/e2e/runs/job/step_") >= 2, text[-6000:]
        final = json.loads(storage.read_text(storage.join(run, "step_0000008", "state.json")))
        assert final["step"] == 8 and final["world"] == 2
        summary = json.loads(storage.read_text(storage.join(run, "summary.json")))
        assert summary["error"] is None and summary["checkpoints"][-1] == "step_0000008"
        from trainer.checkpoint import verify_checkpoint

        assert verify_checkpoint(storage.join(run, "step_0000008")) is None      # checksums, read in place
        # the evaluator scored checkpoints from s3://, its artifacts in the run and in MLflow's bucket
        ledger = [json.loads(x) for x in storage.read_text(storage.join(run, "eval_ledger.jsonl")).splitlines()]
        scored = {x["checkpoint"] for x in ledger if x.get("task") == "retrieval" and not x.get("error")}
        assert "step_0000008" in scored, ledger
        assert storage.isfile(storage.join(run, "step_0000008", "eval", "metrics.json"))
        arts = storage.walk_files(store.uri("mlartifacts"))
        assert any("eval/step_0000008/metrics.json" in a for a in arts), arts[:20]
        assert not (sd / "mlartifacts").exists()
        # the job driver inherited MLFLOW_TRACKING_URI from the head: the run's curves are there by step
        from mlflow.tracking import MlflowClient

        client = MlflowClient(st["mlflow_uri"])
        assert summary["mlflow_uri"] == st["mlflow_uri"]
        for name in ("loss/loss", "health/image_cosine"):        # representation health is logged too
            steps = {m.step for m in client.get_metric_history(summary["mlflow_run_id"], mlflow_name(name))}
            assert steps >= {3, 4, 5, 6, 7, 8}, (name, sorted(steps))
        # the one-shot CLIs on an s3:// checkpoint
        ck = storage.join(run, "step_0000008")
        r = _sh([py, "-m", "evaluators.score", "--checkpoint", ck, "--data", shards, "--tasks", "retrieval"], env)
        assert r.returncode == 0 and "retrieval/" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        assert storage.isfile(storage.join(run, "scores.json"))
        vol = sorted(p for p in (tmp_path / "raw").rglob("*.nii.gz") if "segmentations" not in p.parts)[0]
        r = _sh([py, "-m", "evaluators.embed", "--checkpoint", ck, "--volume", str(vol),
                 "--out", str(tmp_path / "emb.npy")], env)
        assert r.returncode == 0 and "checkpoint step 8" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        # nothing heavy on local disk outside the cache
        tmp = Path(tempfile.gettempdir())         # other tests' folders there are older than t0
        # other pytest-xdist workers' folders (their tests' own shards and checkpoints, their cache) are theirs
        mine = tmp_path_factory.getbasetemp()
        others = [p for p in mine.parent.iterdir() if p.is_dir() and p != mine] if os.environ.get("PYTEST_XDIST_WORKER") else []
        leaks = _heavy_files([REPO, tmp, Path.home() / ".cache" / "t3d"], t0, skip=[cache, sd / "objectstore", *others])
        assert not leaks, leaks
    finally:
        started = procs.raylets(st)
        local.down(sd)
    assert local.status(sd) == 1
    assert started and not procs.left_after_down(st, started)     # DashboardAgent, RuntimeEnvAgent ... too
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if any("weed" in a for a in (p.info["cmdline"] or []))
                and str(sd) in " ".join(p.info["cmdline"] or [])]


def _refuses_jobs_without_the_token(dashboard: str) -> None:
    import urllib.error
    import urllib.request

    body = json.dumps({"entrypoint": "echo should-not-run"}).encode()
    for headers, code in (({}, 401), ({"Authorization": "Bearer wrong-token"}, 403)):
        req = urllib.request.Request(dashboard + "/api/jobs/", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == code
