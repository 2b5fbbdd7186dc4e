"""Shared fixtures: the real data beside the repo, a small ingested phantom dataset."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = (REPO / ".." / "shared" / "realdata").resolve()
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")   # Triton kernels run on the CPU in tests (set before import)
# tests that need MLflow start their own server; never log to (or hang on) a developer's
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.hookimpl(tryfirst=True)        # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: ``-n 2 --dist loadgroup``) the slow end-to-end tests run one
    after another on one worker, in their file order, while the other tests share both workers: two
    Ray clusters training at once on 2 cores would each wait on the other's start-up."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("slow"))


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Every test session (each xdist worker) keeps the machine's cache of remote things and its
    checkpoint staging (``T3D_CACHE_DIR``) in its own folder, not in the user's ~/.cache/t3d."""
    if "T3D_CACHE_DIR" not in os.environ:
        os.environ["T3D_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "t3d-cache")
    yield


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA} (expected ../shared/realdata beside the repo)")
    return REALDATA


@pytest.fixture(scope="session")
def debug_cfg():
    from common.config import load_config

    return load_config(REPO / "configs" / "debug.yaml")


@pytest.fixture(scope="session")
def phantom(tmp_path_factory, debug_cfg):
    """10 phantom volumes (CT-RATE layout) ingested with the debug config."""
    from data_service import ingest, synth

    root = tmp_path_factory.mktemp("phantom")
    synth.generate(root / "raw", n=10, seed=3, valid_fraction=0.4)
    ingest.run("ctrate", str(root / "raw"), str(root / "shards"), debug_cfg.data, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def phantom24(tmp_path_factory, debug_cfg):
    """24 phantoms: enough valid and test studies for zero-shot thresholds and AUCs."""
    from data_service import ingest, synth
    from data_service.shards import iter_split

    root = tmp_path_factory.mktemp("phantom24")
    synth.generate(root / "raw", n=24, seed=5, valid_fraction=0.5)
    ingest.run("ctrate", str(root / "raw"), str(root / "shards"), debug_cfg.data, workers=2, progress=False)
    texts = [s["report"] for s in iter_split(root / "shards", "train", decode_ct=False)]
    return root / "shards", texts


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    from cluster.local import HOST, _free_port, _wait, start_mlflow

    port = _free_port()
    proc = start_mlflow(tmp_path_factory.mktemp("mlflow"), port)
    uri = f"http://{HOST}:{port}"
    try:
        _wait(uri + "/health", 300, "MLflow server")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real S3-compatible store (SeaweedFS, ``cluster.objectstore``) on 127.0.0.1, bucket ``t3d``."""
    from cluster import objectstore

    try:
        objectstore.weed_binary()
    except RuntimeError as e:
        pytest.skip(str(e))
    store = objectstore.start(tmp_path_factory.mktemp("objectstore"))
    try:
        yield store
    finally:
        objectstore.stop(store)


@pytest.fixture
def s3(s3_store, monkeypatch, tmp_path):
    """The store's standard AWS variables in this test's environment, and a cache of its own."""
    for k, v in s3_store.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("T3D_CACHE_DIR", str(tmp_path / "cache"))
    return s3_store
