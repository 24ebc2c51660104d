"""A local Ray started by the project stays on loopback (Ray would otherwise swap
127.0.0.1 for the machine's outward address)."""
from __future__ import annotations


def test_local_ray_is_bound_to_loopback(ray_local):
    nodes = ray_local.nodes()
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"

    @ray_local.remote
    def where():
        import ray

        return ray.util.get_node_ip_address()

    assert ray_local.get(where.remote()) == "127.0.0.1"
