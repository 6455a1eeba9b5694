"""A real UDP DNS server for discovery tests: answers A queries from a table the test edits.

Names in ``records`` answer their A records (AAAA: no records); other names answer
NXDOMAIN; names in ``failing`` answer SERVFAIL (a broken upstream), names in
``failing_aaaa`` SERVFAIL to AAAA queries only (resolvers that drop one family). Served by
dnslib's threaded UDP server on loopback.
"""

from __future__ import annotations

import threading

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import DNSLogger, DNSServer


class DnsStub:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failing: set[str] = set()
        self.failing_aaaa: set[str] = set()
        self.queries = 0
        self._lock = threading.Lock()
        self._server = DNSServer(self, address="127.0.0.1", port=0,
                                 logger=DNSLogger(logf=lambda _line: None))

    @property
    def address(self) -> str:
        host, port = self._server.server.server_address[:2]
        return f"{host}:{port}"

    def set(self, name: str, ips: list[str]) -> None:
        with self._lock:
            self.records[name.rstrip(".")] = list(ips)

    def resolve(self, request, handler):
        """dnslib's resolver interface: the reply to one query."""
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        with self._lock:
            self.queries += 1
            failing, ips = name in self.failing, self.records.get(name)
            failing |= name in self.failing_aaaa and request.q.qtype == QTYPE.AAAA
        if failing:
            reply.header.rcode = RCODE.SERVFAIL
        elif ips is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for ip in ips:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=0))
        return reply

    def __enter__(self) -> DnsStub:
        self._server.start_thread()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
        self._server.server.server_close()
