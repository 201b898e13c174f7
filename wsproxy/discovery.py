# -*- test-case-name: tests.test_discovery -*-
"""
Upstreams discovered through DNS: a server marked C{resolve} stands for
every address its name has (A and AAAA), looked up again while the proxy
runs.

nginx (without Plus) resolves an upstream's names once, at start; a
Kubernetes headless Service or a DNS round-robin name changes its set of
addresses while the proxy runs.  Here each C{resolve} name is looked up
every C{resolve_interval}, or sooner when the records' TTL says so, with
C{twisted.names} (the upstream's C{resolver}, or the system's); the pool
is told the new set (L{UpstreamPool.updateResolved}): new addresses
join, vanished ones retire while their open tunnels run on.

A lookup that fails keeps the last good set, per address family (an
A query that times out does not drop the IPv4 addresses because the AAAA
query answered), and an answer with no address at all keeps it too: a
name that briefly resolves to nothing should not empty the pool.  A
failure is logged once, when it starts, and once more when lookups work
again.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.names import client, dns, error
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from .config import Upstream, UpstreamAddress
from .upstream import UpstreamPool

__all__ = ["NameWatcher", "PoolDiscovery", "carryResolved", "resolverFor"]

log = Logger()

#: The retry timeouts of one query, in seconds (twisted.names' default
#: waits a minute in all).
QUERY_TIMEOUT = (1, 3)

#: The shortest wait between lookups, whatever the TTL (a TTL of 0 would
#: otherwise mean asking without pause).
MINIMUM_WAIT = 1.0

_FAMILIES = ((dns.A, "lookupAddress"), (dns.AAAA, "lookupIPV6Address"))

_ERRORS = (
    (error.DNSQueryTimeoutError, "timed out"),
    (error.DNSServerError, "server failure"),
    (error.DNSQueryRefusedError, "refused"),
    (error.DNSFormatError, "format error"),
)


def resolverFor(upstream: Upstream) -> Any:
    """
    The C{IResolver} for C{upstream}'s C{resolve} servers: its
    C{resolver} alone, or the system's (C{/etc/hosts}, then the servers of
    C{/etc/resolv.conf}).
    """
    if upstream.resolver is not None:
        return client.Resolver(servers=[upstream.resolver])
    return client.createResolver()


def _addressOf(record: dns.RRHeader) -> str:
    if record.type == dns.A:
        return record.payload.dottedQuad()
    return socket.inet_ntop(socket.AF_INET6, record.payload.address)


class NameWatcher:
    """
    Looks one C{resolve} server's name up again and again, and tells the
    pool what it resolves to.

    @ivar addresses: the last good addresses, per record type.
    @ivar failing: why lookups fail now, or C{None}.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        template: UpstreamAddress,
        resolver: Any,
        clock: Any,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.template = template
        self.resolver = resolver
        self.clock = clock
        self.changed = changed
        self.interval = pool.upstream.resolve_interval
        self.addresses: dict[int, list[str]] = {kind: [] for kind, _ in _FAMILIES}
        self.failing: str | None = None
        self._next: Any = None
        self._running = False

    def start(self) -> None:
        """Look the name up now, and again after each answer."""
        self._running = True
        self.lookup()

    def stop(self) -> None:
        """Stop looking up; an answer still on its way is ignored."""
        self._running = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None

    def lookup(self) -> Deferred:
        """One lookup of both record types; the next is scheduled when it is answered."""
        self._next = None
        name = self.template.host
        queries = [getattr(self.resolver, method)(name, timeout=QUERY_TIMEOUT) for _, method in _FAMILIES]
        answered = DeferredList(queries, consumeErrors=True)
        answered.addCallback(self._answered)
        return answered

    def _answered(self, results: list[tuple[bool, Any]]) -> None:
        if not self._running:
            return
        ttls: list[int] = []
        problems: list[str] = []
        fresh = dict(self.addresses)
        for (kind, _), (ok, result) in zip(_FAMILIES, results, strict=True):
            if not ok:
                if result.check(DNSNameError):
                    fresh[kind] = []
                else:
                    problems.append(f"{dns.QUERY_TYPES[kind]}: {_describe(result)}")
                continue
            records = [record for record in result[0] if record.type == kind]
            fresh[kind] = sorted({_addressOf(record) for record in records})
            ttls.extend(record.ttl for record in records)
        found = fresh[dns.A] + fresh[dns.AAAA]
        if found:
            self.addresses = fresh
        elif not problems:
            problems.append("no A or AAAA record")
        self._report("; ".join(problems) or None, self.addresses[dns.A] + self.addresses[dns.AAAA])
        if found:
            self.pool.updateResolved(self.template, found)
            self.changed()
        wait = self.interval
        if ttls and not problems:
            wait = min(wait, max(min(ttls), MINIMUM_WAIT))
        self._next = self.clock.callLater(wait, self.lookup)

    def _report(self, problem: str | None, found: list[str]) -> None:
        """Log a failure when it starts and when it ends, not at every lookup."""
        if (problem is None) == (self.failing is None):
            return
        self.failing = problem
        fields = {"pool": self.pool.name, "name": self.template.host}
        if problem is None:
            log.info("upstream {pool}: {name} resolves again", **fields)
        elif found:
            log.warn(
                "upstream {pool}: looking up {name} failed ({why}); keeping {addresses}",
                why=problem,
                addresses=", ".join(found),
                **fields,
            )
        else:
            log.warn(
                "upstream {pool}: looking up {name} failed ({why}); keeping the servers it had", why=problem, **fields
            )


def _describe(failure: Failure) -> str:
    for kind, words in _ERRORS:
        if failure.check(kind):
            return words
    value = failure.value
    return f"{type(value).__name__}: {value}" if str(value) else type(value).__name__


class PoolDiscovery(Service):
    """
    One L{NameWatcher} per C{resolve} server of a pool, started and
    stopped with the service.

    @param changed: called after each update of the pool's servers (the
        pool's L{wsproxy.health.PoolHealth.sync}).
    """

    def __init__(
        self,
        pool: UpstreamPool,
        clock: Any,
        resolver: Any = None,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.resolver = resolver if resolver is not None else resolverFor(pool.upstream)
        self.watchers = [
            NameWatcher(pool, template, self.resolver, clock, changed)
            for template in pool.upstream.servers
            if template.resolve
        ]

    def startService(self) -> None:
        super().startService()
        for watcher in self.watchers:
            watcher.start()

    def stopService(self) -> None:
        super().stopService()
        for watcher in self.watchers:
            watcher.stop()


def carryResolved(old: UpstreamPool, new: UpstreamPool) -> None:
    """
    Give C{new} (a reload's pool) the addresses C{old} resolved for the
    C{resolve} servers both have, so that it does not start from the
    bare names.
    """
    for template in new.upstream.servers:
        if not template.resolve:
            continue
        addresses = [s.address.host for s in old.servers if s.origin == template and not s.retiring]
        if addresses:
            new.updateResolved(template, addresses)
