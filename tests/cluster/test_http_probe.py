"""`cluster.local`'s readiness probe in a fresh interpreter: `make demo` once waited 300 s on a live
MLflow server because `_http_ok` used `urllib.request` without importing it (the tests' own imports
had hidden that)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PROBE = r"""
import socket, sys, threading
from cluster import local

srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4)
port = srv.getsockname()[1]

def serve(status):
    c, _ = srv.accept(); c.recv(4096)
    c.sendall(f"HTTP/1.0 {status}\r\nContent-Length: 2\r\n\r\nOK".encode()); c.close()

for status in ("200 OK", "401 Unauthorized", "503 Service Unavailable"):
    t = threading.Thread(target=serve, args=(status,)); t.start()
    print(status.split()[0], local._http_ok(f"http://127.0.0.1:{port}/health"))
    t.join()
srv.close()
print("closed", local._http_ok(f"http://127.0.0.1:{port}/health", timeout=1))
"""


def test_http_probe_in_a_fresh_interpreter():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["200 True", "401 True", "503 False", "closed False"], r.stdout
