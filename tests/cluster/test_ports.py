"""Port picking for `ray start` (cluster.local): one `ray start` takes several ports at once and
refuses to start if any two are equal (CI once saw 46177 handed out twice by separate picks)."""
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
