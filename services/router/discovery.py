"""Engine replicas found in DNS: a model's ``discovery: dns://HOST:PORT`` (models file).

Every ``discovery_interval_s`` the router resolves HOST's A and AAAA records (on
Kubernetes, a headless Service: one record per ready engine pod) and hands the set of
``ip:PORT`` addresses to ``Fleet.sync``, which admits a new address only once its
``grpc.health.v1`` Check answers SERVING and its Info is read, and retires an address that
left DNS (no new routes; streams already on it finish). A failed lookup (timeout,
SERVFAIL, unreachable nameserver) keeps the pool as it is: a DNS outage is not a fleet
outage. A name that does not exist, or has no address records, is an empty fleet.

dnspython resolves (not ``getaddrinfo``), so that lookups have their own deadline, bypass
the libc cache, and can ask a given nameserver (``discovery_nameserver``; tests run one).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import dns.asyncresolver
import dns.exception
import dns.resolver

from llmesh.models_file import parse_discovery

log = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """A lookup failed for a reason other than the name having no addresses."""


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


class DnsResolver:
    """A/AAAA lookups with a deadline, through ``nameserver`` (``ip:port``) or the system's."""

    def __init__(self, nameserver: str | None, timeout_s: float) -> None:
        if nameserver:
            ip, _, port = nameserver.rpartition(":")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [ip.strip("[]")]
            resolver.port = int(port)
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration as e:
                raise DiscoveryError(f"router discovery: no DNS configuration (/etc/resolv.conf): {e}") from None
            # Short names ("llmesh-engine-small") resolve through the search domains, as
            # getaddrinfo would: the models file then works in any namespace.
            resolver.use_search_by_default = True
        resolver.timeout = resolver.lifetime = timeout_s
        self._resolver = resolver

    async def _records(self, host: str, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise DiscoveryError(f"router discovery: {rdtype} lookup of {host} failed: "
                                 f"{type(e).__name__}: {e}") from None
        return [rr.address for rr in answer]

    async def addresses(self, host: str, port: int) -> set[str]:
        """``ip:port`` of every A and AAAA record of ``host`` (empty: no such name or records)."""
        v4, v6 = await asyncio.gather(self._records(host, "A"), self._records(host, "AAAA"),
                                      return_exceptions=True)
        failed = [r for r in (v4, v6) if isinstance(r, BaseException)]
        found = [ip for r in (v4, v6) if not isinstance(r, BaseException) for ip in r]
        # Some resolvers drop one family's queries (AAAA, often): the other family's answer
        # stands. Both failed, or one failed and the other found nothing: the lookup failed
        # (the caller keeps its pool rather than emptying it on a timeout).
        if failed and not found:
            raise failed[0]
        return {_address(ip, port) for ip in found}


class DnsDiscovery:
    """Keeps one model's pool equal to the addresses its DNS name resolves to."""

    def __init__(self, model: str, url: str, resolver: DnsResolver, interval_s: float) -> None:
        self.model = model
        self.host, self.port = parse_discovery(url)
        self.resolver = resolver
        self.interval_s = interval_s
        self.last_error = ""

    async def resolve(self) -> set[str] | None:
        """The current addresses; None when the lookup failed (logged once per new reason)."""
        try:
            found = await self.resolver.addresses(self.host, self.port)
        except DiscoveryError as e:
            if str(e) != self.last_error:
                log.warning("discovery lookup failed; keeping the replicas found before",
                            extra={"model": self.model, "reason": str(e)})
            self.last_error = str(e)
            return None
        self.last_error = ""
        return found
