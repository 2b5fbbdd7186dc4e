"""Local cluster: a Ray head (token auth, everything on 127.0.0.1) and an MLflow tracking server,
optionally with an S3-compatible object store (``--storage``: SeaweedFS, ``cluster.objectstore``).

    python -m cluster.local up [--num-cpus 8] [--mlflow-port 5000] [--dashboard-port 8265] [--nodes 2] [--worker-slots 1]
                               [--storage]
    python -m cluster.local add-node [--node-cpus 4]
    python -m cluster.local status
    python -m cluster.local down

State lives in ``.cluster/`` (addresses, pids, MLflow's sqlite database and artifacts). Ray's
temp dir is private to this cluster, so ``down`` stops exactly the processes ``up`` started
(those whose command line names that temp dir) and the MLflow server it launched; any other Ray
on the machine is left alone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
# Ray 2.60 keeps a node on loopback only while this is "0": `ray start` then keeps
# --node-ip-address=127.0.0.1 (services.get_node_ip_address returns the loopback address instead of
# the machine's), and a node whose IP is loopback binds its GCS, raylet, agents and workers there.
# The same switch makes `ray start --address` refuse a second node, so a multi-node cluster
# (``up(..., multinode=True)``) runs without it and Ray binds those servers to all interfaces
# (docs/design.md, "Known limitations"). Every process that calls ray.init(address=...) on a
# loopback cluster needs it too: job drivers and workers inherit it from the head.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


SLOT = "train_slot"


def state_dir(base: str | None = None) -> Path:
    return Path(base or os.environ.get("T3D_CLUSTER_DIR") or REPO / ".cluster").resolve()


def ray_temp_dir(sd: Path) -> Path:
    # unix socket paths must stay short: a /tmp dir named after this state dir
    return Path("/tmp") / f"t3d-ray-{hashlib.sha256(str(sd).encode()).hexdigest()[:8]}"


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    # jobs run `python ...` with the head's PATH: make it this environment's interpreter
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when a server answers (an HTTP error such as 401 from token auth counts as up)."""
    import urllib.error
    import urllib.request  # not implied by urllib.error (a fresh `make demo` waited 300 s on a live server)

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:
        return False


def _wait(url: str, seconds: float, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds:
        if _http_ok(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {seconds:.0f} s")


def start_mlflow(sd: Path, port: int, env: dict[str, str] | None = None, artifacts: str | None = None) -> subprocess.Popen:
    """``mlflow server`` on loopback: sqlite backend, proxied artifacts (in ``sd/mlartifacts``, or
    ``artifacts``, e.g. ``s3://t3d/mlartifacts``, with the AWS variables in ``env``), log in
    ``sd/mlflow.log``. Returns at once; wait for ``/health`` before use. Stop it with
    ``os.killpg(proc.pid, SIGTERM)``."""
    if artifacts is None:
        (sd / "mlartifacts").mkdir(parents=True, exist_ok=True)
    log = open(sd / "mlflow.log", "ab")
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{sd / 'mlflow.db'}",
           "--artifacts-destination", artifacts or str(sd / "mlartifacts"), "--host", HOST, "--port", str(port),
           "--workers", "1"]
    env = dict(env or _env())
    # MLflow 3's GenAI job runner (online scoring, trace archival; huey consumers polling every
    # minute), which T3D never uses: with it 10 processes and 1.7 GB, without it 2 and 0.5 GB, and
    # /health in 12 s instead of 18 here (minutes on a loaded machine). Set it to true to keep it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def up(sd: Path, num_cpus: int, mlflow_port: int, dashboard_port: int, ray_port: int,
       object_store_mb: int, worker_slots: int = 0, storage: bool = False, multinode: bool = False) -> dict:
    """Head + MLflow. ``worker_slots`` > 0: every node advertises that many ``train_slot``
    resources (``ray.worker_resources={train_slot: 1}`` then places at most that many training
    workers per node, as GPUs would). ``storage``: an S3-compatible store first (SeaweedFS on
    loopback, bucket ``t3d``); Ray's processes and MLflow get its AWS variables from their
    environment, MLflow keeps its artifacts in ``s3://t3d/mlartifacts``, and ``sd/s3.env`` holds
    the variables for users to ``source``. ``multinode``: the head accepts more nodes (``add_node``),
    at the price of Ray's servers listening on all interfaces; otherwise all of it is on loopback."""
    sd.mkdir(parents=True, exist_ok=True)
    st_file = sd / "state.json"
    if st_file.is_file():
        st = json.loads(st_file.read_text())
        if _http_ok(st["mlflow_uri"] + "/health") and _ray_alive(st):
            print("cluster already up")
            return st
    check_ports_free({"MLflow (--mlflow-port)": mlflow_port, "the Ray dashboard (--dashboard-port)": dashboard_port,
                      "Ray's GCS (--ray-port)": ray_port})
    env = _env()
    env["MLFLOW_TRACKING_URI"] = f"http://{HOST}:{mlflow_port}"   # job drivers inherit the head's env
    env[MARKER] = str(sd)
    if not multinode:
        env.update(LOOPBACK_ONLY)
    store = None
    if storage:
        from cluster import objectstore

        store = objectstore.start(sd / "objectstore")
        env.update(store.env())
        objectstore.write_env(store, sd / "s3.env")
    subprocess.run([_bin("ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    tmp = ray_temp_dir(sd)
    # Ray's per-node agents default to fixed ports (52365, 10001, ...): a second Ray on the machine
    # (or one still shutting down) makes the raylet fail and jobs never run. Pick free ones.
    # All picked at once: five separate picks can return the same port (CI saw the client server and
    # the runtime-env agent both given 46177, and `ray start` refused).
    agent_ports = _port_flags(["dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
                               "metrics-export", "ray-client-server"], avoid={ray_port, dashboard_port, mlflow_port})
    cmd = [_bin("ray"), "start", "--head", f"--port={ray_port}", f"--node-ip-address={HOST}", *agent_ports,
           f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus}",
           f"--object-store-memory={object_store_mb * 2**20}", f"--temp-dir={tmp}", "--disable-usage-stats",
           "--include-dashboard=true", *([f"--resources={json.dumps({SLOT: worker_slots})}"] if worker_slots else [])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        # what `ray start` did start before it failed (a GCS on the port, say) goes too
        _stop_procs(_ray_procs({"ray_temp_dir": str(tmp), "marker": str(sd)}))
        if store is not None:
            objectstore.stop(store)
        raise RuntimeError(f"ray start failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    proc = start_mlflow(sd, mlflow_port, env, store.uri("mlartifacts") if store else None)
    st = {"ray_address": f"{HOST}:{ray_port}", "dashboard": f"http://{HOST}:{dashboard_port}",
          "mlflow_uri": f"http://{HOST}:{mlflow_port}", "mlflow_pid": proc.pid, "ray_temp_dir": str(tmp),
          "marker": str(sd), "worker_slots": worker_slots, "multinode": multinode,
          **({"s3_endpoint": store.endpoint, "s3_bucket": store.bucket, "s3_pid": store.pid,
              "s3_env": str(sd / "s3.env")} if store else {}),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    st_file.write_text(json.dumps(st, indent=1))
    try:
        _wait(st["mlflow_uri"] + "/health", 300, "MLflow server")   # slow to import on a busy machine
        _wait(st["dashboard"] + "/api/version", 60, "Ray dashboard")
        _wait_jobs(st, env, 120)
    except Exception:
        down(sd)            # never leave half a cluster behind
        raise
    return st


def add_node(sd: Path, num_cpus: int, object_store_mb: int = 512) -> dict:
    """Start one more Ray node on this machine, joined to the head (its own raylet, ports and
    resources, plus a custom resource ``node{i}``); recorded in the state file. Its processes carry
    ``T3D_NODE={i}``, so ``kill_node`` (tests) and ``down`` find them."""
    st_file = sd / "state.json"
    st = json.loads(st_file.read_text())
    if not st.get("multinode"):
        raise RuntimeError(f"{sd}: this cluster's head keeps Ray on loopback, which refuses more nodes; "
                           "start it with `python -m cluster.local up --nodes N` (or up(..., multinode=True))")
    idx = len(st.get("nodes", [])) + 2                         # the head is node 1
    env = _env()
    env["MLFLOW_TRACKING_URI"] = st["mlflow_uri"]
    env[MARKER], env["T3D_NODE"] = st["marker"], str(idx)
    env.update(storage_env(st))
    lo = _worker_port_base(int(st["ray_address"].rsplit(":", 1)[1]), idx)
    cmd = [_bin("ray"), "start", f"--address={st['ray_address']}", f"--node-ip-address={HOST}",
           f"--num-cpus={num_cpus}",
           f"--resources={json.dumps({f'node{idx}': 1, **({SLOT: st['worker_slots']} if st.get('worker_slots') else {})})}",
           f"--object-store-memory={object_store_mb * 2**20}",
           *_port_flags(["node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
                         "runtime-env-agent", "metrics-export"]),
           f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}", "--disable-usage-stats"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ray start (node {idx}) failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    st.setdefault("nodes", []).append({"node": idx, "num_cpus": num_cpus})
    st_file.write_text(json.dumps(st, indent=1))
    return st


def node_procs(st: dict, idx: int):
    """The processes of node ``idx`` (``add_node``)."""
    return [p for p in _ray_procs(st) if _env_of(p).get("T3D_NODE") == str(idx)]


def kill_node(st: dict, idx: int) -> int:
    """SIGKILL every process of node ``idx``, as a machine lost without warning; returns how many."""
    procs = node_procs(st, idx)
    for p in procs:
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    return len(procs)


def _env_of(p) -> dict:
    import psutil

    try:
        return p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def _free_port() -> int:
    return _free_ports(1)[0]


class PortInUse(RuntimeError):
    """A port the cluster needs is taken by another process."""


def check_ports_free(ports: dict[str, int]) -> None:
    """Before anything starts: PortInUse naming every port of ``ports`` (what it is for -> port)
    that something already listens on at HOST, and how to choose another."""
    import socket

    busy = []
    for what, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers do: TIME_WAIT is no listener
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(f"{HOST}:{port} for {what}")
    if busy:
        raise PortInUse("cannot start the local cluster: " + "; ".join(busy) + " already in use by another "
                        "process (another Ray, e.g. a `python -m trainer.pretrain` without RAY_ADDRESS, or a "
                        "second cluster). Stop it, or pick other ports: python -m cluster.local up --mlflow-port "
                        "P --dashboard-port P --ray-port P")


def _free_ports(n: int, avoid: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct free ports on HOST, none in ``avoid``. Every socket stays bound until all are
    picked, so the kernel cannot hand out the same port twice (separate picks can)."""
    import socket

    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            if len(socks) > n + 64:
                raise RuntimeError(f"could not find {n} free ports on {HOST} outside {sorted(avoid)}")
            s = socket.socket()
            socks.append(s)
            s.bind((HOST, 0))
            port = s.getsockname()[1]
            if port not in avoid:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


def _port_flags(names: list[str], avoid: set[int] | frozenset[int] = frozenset()) -> list[str]:
    """``--{name}-port=P`` for each of ``names`` (a `ray start`'s flags), the ports picked together."""
    return [f"--{n}-port={q}" for n, q in zip(names, _free_ports(len(names), avoid))]


def _worker_port_base(head_port: int, idx: int) -> int:
    """First of 100 worker ports for added node ``idx``: in 20000-32699, below Linux's ephemeral
    range (32768+, where `_free_ports` picks), so they never meet the agents' ports; the nodes of one
    cluster (one head port) get different blocks."""
    return 20000 + ((head_port + idx) % 127) * 100


def _wait_jobs(st: dict, env: dict, seconds: float) -> None:
    """The dashboard answers before its job agent registers ("No available agent to submit job"):
    submit a no-op job until one is accepted, so that `up` returns only when jobs can run."""
    t0, last = time.time(), ""
    while time.time() - t0 < seconds:
        r = subprocess.run([_bin("ray"), "job", "submit", "--address", st["dashboard"], "--", "true"],
                           env=env, capture_output=True, text=True)
        if r.returncode == 0:
            return
        last = (r.stdout + r.stderr)[-300:]
        time.sleep(2)
    raise RuntimeError(f"Ray job server at {st['dashboard']} did not accept a job within {seconds:.0f} s: {last}")


MARKER = "T3D_CLUSTER"
"""Environment variable every process of a local cluster inherits (set on `ray start`): Ray renames
its agents (``ray::DashboardAgent``), so their command lines no longer name the temp dir."""


def _ray_procs(st: dict):
    """Every process of the cluster: command line naming its temp dir, or our marker in its
    environment. Ray's agents (ray::DashboardAgent, ray::RuntimeEnvAgent) and workers are renamed
    and, on a fresh install, started without our marker (they outlived `down` and kept a core busy):
    so also the raylets' descendants and any process of one of our nodes (RAY_NODE_ID)."""
    import psutil

    tmp, marker = st.get("ray_temp_dir"), st.get("marker")
    procs, envs, out = {}, {}, {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        procs[p.pid], envs[p.pid] = p, _env_of(p)                # each environment read once
        if (tmp and any(tmp in a for a in (p.info["cmdline"] or []))) or \
                (marker and envs[p.pid].get(MARKER) == marker):
            out[p.pid] = p
    for p in list(out.values()):
        try:
            out.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    nodes = {envs.get(pid, {}).get("RAY_NODE_ID") for pid in out} - {None, ""}
    out.update({pid: procs[pid] for pid, env in envs.items() if nodes and env.get("RAY_NODE_ID") in nodes})
    return list(out.values())


def _ray_alive(st: dict) -> bool:
    return _http_ok(st["dashboard"] + "/api/version")


def down(sd: Path) -> None:
    st_file = sd / "state.json"
    if not st_file.is_file():
        print(f"no cluster state in {sd}: nothing to stop")
        return
    st = json.loads(st_file.read_text())
    pid = st.get("mlflow_pid")
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    procs = _ray_procs(st)
    _stop_procs(procs)
    store = _store(st)
    if store is not None:
        from cluster import objectstore

        objectstore.stop(store)
    st_file.unlink()
    print(f"stopped MLflow (pid {pid}), {len(procs)} Ray processes of {st['ray_temp_dir']}"
          + (f" and the object store at {st['s3_endpoint']}" if store else ""))


def _stop_procs(procs: list) -> None:
    """SIGTERM, then SIGKILL what ignored it for 15 s (a busy agent), and wait until it is gone."""
    import psutil

    stuck = procs
    for signal_them in (psutil.Process.terminate, psutil.Process.kill):
        for p in stuck:
            try:
                signal_them(p)
            except psutil.NoSuchProcess:
                pass
        _, stuck = psutil.wait_procs(stuck, timeout=15)
    if stuck:
        print(f"WARNING: {len(stuck)} Ray processes still there after SIGKILL: {[p.pid for p in stuck]}")


def _store(st: dict):
    if not st.get("s3_endpoint"):
        return None
    from cluster import objectstore

    return objectstore.load(Path(st["marker"]) / "objectstore")


def storage_env(st: dict) -> dict[str, str]:
    """The object store's AWS variables when the cluster was started with ``--storage``, else {}."""
    store = _store(st)
    return store.env() if store else {}


def status(sd: Path) -> int:
    st_file = sd / "state.json"
    if not st_file.is_file():
        print("down")
        return 1
    st = json.loads(st_file.read_text())
    ok_r, ok_m = _ray_alive(st), _http_ok(st["mlflow_uri"] + "/health")
    print(f"ray dashboard {st['dashboard']}: {'up' if ok_r else 'DOWN'}")
    print(f"mlflow        {st['mlflow_uri']}: {'up' if ok_m else 'DOWN'}")
    ok_s = True
    if st.get("s3_endpoint"):
        ok_s = _http_ok(st["s3_endpoint"])          # 403 to an anonymous request: up
        print(f"object store  {st['s3_endpoint']} (bucket {st['s3_bucket']}): {'up' if ok_s else 'DOWN'}")
    return 0 if ok_r and ok_m and ok_s else 1


def print_usage(st: dict) -> None:
    s3 = (f"Object store:  {st['s3_endpoint']}   bucket s3://{st['s3_bucket']}   (credentials: source {st['s3_env']})\n"
          if st.get("s3_endpoint") else "")
    loop = "" if st.get("multinode") else " " + " ".join(f"{k}={v}" for k, v in LOOPBACK_ONLY.items())
    print(f"""
Ray head:      {st['ray_address']}   (token auth: RAY_AUTH_MODE=token, token in ~/.ray/auth_token)
Ray dashboard: {st['dashboard']}
MLflow:        {st['mlflow_uri']}
{s3}
Submit a job:
  export RAY_AUTH_MODE=token MLFLOW_TRACKING_URI={st['mlflow_uri']}{loop}
  ray job submit --address {st['dashboard']} --working-dir . -- \\
      python -m trainer.pretrain --config configs/debug.yaml --set data.shards=$PWD/demo/shards
""")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["up", "down", "status", "add-node"])
    p.add_argument("--dir", default=None, help="state folder (default .cluster/ in the repo)")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the head (more than cores: "
                   "Ray Data only budgets CPUs that Train did not reserve)")
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--ray-port", type=int, default=6380)
    p.add_argument("--object-store-mb", type=int, default=1024)
    p.add_argument("--nodes", type=int, default=1, help="Ray nodes on this machine (the head + nodes-1 more)")
    p.add_argument("--multi-node", action="store_true", help="a head that accepts nodes later (add-node); "
                   "Ray's servers then listen on all interfaces (implied by --nodes > 1)")
    p.add_argument("--node-cpus", type=int, default=4, help="logical CPUs of each extra node")
    p.add_argument("--storage", action="store_true", help="also an S3-compatible object store on loopback "
                   "(SeaweedFS; MLflow artifacts go there; credentials in .cluster/s3.env)")
    p.add_argument("--worker-slots", type=int, default=0, help=f"'{SLOT}' resources per node (0: none); "
                   f"with ray.worker_resources={{{SLOT}: 1}} they bound the training workers per node")
    a = p.parse_args(argv)
    sd = state_dir(a.dir)
    if a.action == "up":
        try:
            st = up(sd, a.num_cpus, a.mlflow_port, a.dashboard_port, a.ray_port, a.object_store_mb, a.worker_slots,
                    a.storage, multinode=a.nodes > 1 or a.multi_node)
        except PortInUse as e:
            raise SystemExit(str(e)) from e
        for _ in range(len(st.get("nodes", [])) + 1, a.nodes):
            st = add_node(sd, a.node_cpus)
        print_usage(st)
        return 0
    if a.action == "add-node":
        st = add_node(sd, a.node_cpus)
        print(f"node {st['nodes'][-1]['node']} joined {st['ray_address']} with {a.node_cpus} CPUs")
        return 0
    if a.action == "down":
        down(sd)
        return 0
    return status(sd)


if __name__ == "__main__":
    sys.exit(main())
