"""Port picking for `ray start` (cluster.local): one `ray start` takes several ports at once and
refuses to start if any two are equal (CI once saw 46177 handed out twice by separate picks)."""
import socket

import pytest

from cluster import local
from cluster.local import _free_ports, _worker_port_base


def test_free_ports_are_distinct_and_avoid_the_fixed_ones():
    taken = set(_free_ports(8))
    for _ in range(20):
        ports = _free_ports(12, avoid=taken)
        assert len(set(ports)) == 12, ports
        assert not set(ports) & taken, (ports, taken)


def test_added_nodes_get_disjoint_worker_blocks_below_the_ephemeral_range():
    blocks = [_worker_port_base(6380, idx) for idx in range(2, 10)]
    assert len(set(blocks)) == len(blocks), blocks
    assert all(20000 <= b and b + 99 < 32768 for b in blocks), blocks


def test_a_taken_port_stops_up_before_anything_starts(tmp_path):
    """Another process listening on the dashboard's port: `up` names it and what it is for, and
    starts nothing (no state, no Ray, no MLflow)."""
    mlflow, dash, gcs = _free_ports(3)
    with socket.socket() as s:
        s.bind((local.HOST, dash))
        s.listen()
        with pytest.raises(local.PortInUse, match=rf"127.0.0.1:{dash} for the Ray dashboard \(--dashboard-port\)"):
            local.up(tmp_path / "sd", 2, mlflow, dash, gcs, 200)
        with pytest.raises(SystemExit, match=f"127.0.0.1:{dash}"):
            local.main(["up", "--dir", str(tmp_path / "sd"), "--mlflow-port", str(mlflow), "--dashboard-port",
                        str(dash), "--ray-port", str(gcs)])
    assert not (tmp_path / "sd" / "state.json").exists()
    local.check_ports_free({"x": dash})          # free again once the listener is gone
