"""What a local cluster left running and what it listens on, read from the process and socket tables
(psutil), independently of ``cluster.local``'s own bookkeeping."""
from __future__ import annotations

import ipaddress

import psutil

from cluster import local


def raylets(st: dict) -> set[int]:
    """The cluster's raylets and everything under them, found by the temp dir in the raylets' command
    lines (independently of ``local._ray_procs``), before `down`."""
    out = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and any(st["ray_temp_dir"] in a for a in (p.info["cmdline"] or [])):
            try:
                out |= {p.pid} | {c.pid for c in p.children(recursive=True)}
            except psutil.Error:
                pass
    return out


def belongs(p, st: dict, started: set[int]) -> bool:
    """Started by the cluster: our marker in its environment, or a raylet or one of its descendants
    (Ray's agents: on a fresh install they had no marker and outlived `down`, busy)."""
    try:
        if p.status() == psutil.STATUS_ZOMBIE:       # dead, only not yet reaped: nothing runs
            return False
        return p.pid in started or p.environ().get(local.MARKER) == st["marker"]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def left_after_down(st: dict, started: set[int]) -> list[str]:
    return [p.info["name"] for p in psutil.process_iter(["name"]) if belongs(p, st, started)]


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (``::ffff:127.0.0.1``, a dual-stack socket's)."""
    a = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    return a.is_loopback


def listeners(pids: set[int] | None = None) -> list[tuple[str, int, int, str]]:
    """Every listening TCP socket (ip, port, pid, process name), of ``pids`` only if given."""
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status != psutil.CONN_LISTEN or (pids is not None and c.pid not in pids):
            continue
        try:
            name = psutil.Process(c.pid).name() if c.pid else "?"
        except psutil.Error:
            name = "?"
        out.append((c.laddr.ip, c.laddr.port, c.pid, name))
    return out


def cluster_pids(st: dict) -> set[int]:
    """The processes of the cluster: Ray's (``local._ray_procs``), MLflow's and the object store's,
    with their children."""
    pids = {p.pid for p in local._ray_procs(st)} | raylets(st)
    for key in ("mlflow_pid", "s3_pid"):
        if st.get(key):
            try:
                p = psutil.Process(st[key])
                pids |= {p.pid} | {c.pid for c in p.children(recursive=True)}
            except psutil.Error:
                pass
    return pids
