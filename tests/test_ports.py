"""Ports planned for processes that bind them later are never ones a connection can take.

CI once failed because a test's engine port, chosen by ``bind(0)`` from the kernel's
ephemeral range, was taken by another service's outgoing connection before the engine
bound it. These tests hold ``llmesh.ports`` to what prevents that.
"""

from __future__ import annotations

import socket

import pytest

from llmesh import ports


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_ports_come_from_below_the_ephemeral_range_and_are_free():
    low, _ = ports.ephemeral_range()
    chosen = ports.free_ports(50)
    assert all(ports.LOWEST <= p < low for p in chosen), chosen
    assert all(_bindable(p) for p in chosen)


def test_no_port_is_handed_out_twice_by_one_process():
    chosen = [ports.free_port() for _ in range(300)] + ports.free_ports(100)
    assert len(set(chosen)) == len(chosen)


def test_outgoing_connections_never_take_a_planned_port():
    """The race itself: many connections opened after planning take none of the planned ports."""
    planned = set(ports.free_ports(20))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(200)]
        try:
            local = {c.getsockname()[1] for c in clients}
        finally:
            for c in clients:
                c.close()
    assert not planned & local


def test_a_base_leaves_every_offset_free_and_avoids_what_it_is_told():
    offsets = [0, 1, 2, 10, 11]
    taken = ports.free_ports(3)
    base = ports.free_port_base(offsets, avoid=taken)
    block = [base + off for off in offsets]
    assert all(_bindable(p) for p in block)
    assert max(block) < ports.ephemeral_range()[0]
    assert not set(block) & set(taken)


class _Scripted:
    """Stands in for the module's random source: offers the given ports in turn."""

    def __init__(self, offers: list[int]) -> None:
        self.offers = iter(offers)

    def choice(self, _pool: range) -> int:
        return next(self.offers)


def test_a_port_held_by_a_listener_is_skipped(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", ports.free_port()))
        held.listen(1)
        busy, free = held.getsockname()[1], ports.free_port()
        monkeypatch.setattr(ports, "_recent", ports.collections.deque(maxlen=4096))
        monkeypatch.setattr(ports, "_rng", _Scripted([busy, free]))
        assert ports.free_port() == free


def test_with_no_room_below_the_ephemeral_range_the_kernel_chooses(tmp_path, monkeypatch):
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text(f"{ports.LOWEST + 100}\t60999\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_FILE", narrow)
    assert ports.ephemeral_range() == (ports.LOWEST + 100, 60999)
    port = ports.free_port()
    assert _bindable(port)


def test_no_free_block_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no free block"):
        ports.free_port_base([0, 70000], attempts=3)
