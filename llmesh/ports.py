"""Free ports for processes that bind them later: tests, benchmarks, the tensor-parallel group.

A port the kernel hands out for ``bind(0)`` comes from its ephemeral range, the same range
every outgoing connection takes its local port from. Between choosing such a port and the
service binding it (seconds, while a model loads), any connection of any process may take
it, and the service fails with "address already in use". CI met exactly that. Ports are
therefore drawn below the ephemeral range, where no connection is given a port unasked,
and checked free by binding them; each process also remembers what it handed out, so two
calls do not plan one port twice before either is bound.
"""

from __future__ import annotations

import collections
import random
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

LOWEST = 15000
"""Above the ports well-known daemons and llmesh's own defaults (8000, 9400..) sit on."""
_EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)
_MIN_POOL = 2000

_recent: collections.deque[int] = collections.deque(maxlen=4096)
_lock = threading.Lock()
_rng = random.Random()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for connections' local ports (Linux's; the usual default elsewhere)."""
    try:
        low, high = (int(v) for v in _EPHEMERAL_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _pool(span: int = 0) -> range | None:
    """Base ports below the ephemeral range leaving room for ``span`` more; None when too few."""
    top = ephemeral_range()[0] - span
    return range(LOWEST, top) if top - LOWEST >= _MIN_POOL else None


def _bind_all(host: str, ports: Iterable[int]) -> list[socket.socket] | None:
    socks: list[socket.socket] = []
    try:
        for port in ports:
            socks.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            socks[-1].bind((host, port))
        return socks
    except OSError:
        for s in socks:
            s.close()
        return None


def free_ports(n: int, host: str = "127.0.0.1", attempts: int = 500) -> list[int]:
    """``n`` distinct ports on ``host``, free now and not handed out before by this process."""
    return [free_port_base([0], host=host, attempts=attempts) for _ in range(n)]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_port_base(offsets: Iterable[int], avoid: Iterable[int] = (), host: str = "127.0.0.1",
                   attempts: int = 500) -> int:
    """A base port whose ``base + offset`` ports are all free now, none of them in ``avoid`` or
    handed out before: for services planned at offsets from one base (metrics ports, replicas)."""
    offsets, avoid = sorted(set(offsets)), set(avoid)
    pool = _pool(max(offsets))
    with _lock:
        for _ in range(attempts):
            base = _rng.choice(pool) if pool is not None else _kernel_port(host)
            ports = [base + off for off in offsets]
            if max(ports) > 65535 or avoid.intersection(ports) or set(_recent).intersection(ports):
                continue
            socks = _bind_all(host, ports)
            if socks is None:
                continue
            for s in socks:
                s.close()
            _recent.extend(ports)
            return base
    raise RuntimeError(f"ports: no free block at offsets {offsets} on {host} after {attempts} tries")


def _kernel_port(host: str) -> int:
    """The fallback where the range below the ephemeral one is too small: the kernel's choice."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
