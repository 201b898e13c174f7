"""
Upstreams discovered through DNS: a watcher's lookups on a L{Clock}
against a scripted resolver (set changes, TTL, failures kept quiet), the
configuration keys, then a real C{twisted.names} authoritative server on
loopback whose records change while the proxy carries 100 tunnels.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from support import (
    KEY,
    LOOPBACK,
    ScriptedConnection,
    ScriptedUpstream,
    connectRaw,
    exchange,
    ok,
    startProxy,
    switching,
    until,
    upgradeRequest,
)
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns, error
from twisted.names.authority import FileAuthority
from twisted.names.server import DNSServerFactory

from wsproxy import parseConfig
from wsproxy.config import ConfigError, Upstream, UpstreamAddress
from wsproxy.discovery import MINIMUM_WAIT, NameWatcher, PoolDiscovery, carryResolved
from wsproxy.upstream import UpstreamPool

NAME = "chat.example.test"
TEMPLATE = UpstreamAddress(NAME, 8080, resolve=True)
FIXED = UpstreamAddress("192.0.2.9", 8080)


@pytest.fixture
def logged():
    """What wsproxy.discovery and wsproxy.upstream log while the test runs."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") in ("wsproxy.discovery", "wsproxy.upstream"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class ScriptedResolver:
    """Answers A and AAAA lookups from C{records}, or fails a record type named in C{failures}."""

    def __init__(self, *addresses: str, ttl: int = 60) -> None:
        self.addresses = list(addresses)
        self.ttl = ttl
        self.failures: dict[int, Exception] = {}
        self.lookups = 0

    def _answer(self, name: str, kind: int):
        if kind in self.failures:
            return fail(self.failures[kind])
        ipv6 = kind == dns.AAAA
        records = [
            dns.RRHeader(name, kind, ttl=self.ttl, payload=(dns.Record_AAAA if ipv6 else dns.Record_A)(a, self.ttl))
            for a in self.addresses
            if (":" in a) == ipv6
        ]
        return succeed((records, [], []))

    def lookupAddress(self, name, timeout=None):
        self.lookups += 1
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, dns.AAAA)


def watched(resolver: ScriptedResolver, interval: float = 10.0) -> tuple[Clock, UpstreamPool, PoolDiscovery]:
    clock = Clock()
    pool = UpstreamPool(Upstream("chat", (FIXED, TEMPLATE), resolve_interval=interval), clock)
    discovery = PoolDiscovery(pool, clock, resolver)
    discovery.startService()
    return clock, pool, discovery


def hosts(pool: UpstreamPool) -> list[str]:
    return [server.address.host for server in pool.servers]


def test_the_first_answer_replaces_the_name_by_its_addresses():
    clock, pool, discovery = watched(ScriptedResolver("10.0.0.2", "2001:db8::1", "10.0.0.1"))
    assert hosts(pool) == ["192.0.2.9", "10.0.0.1", "10.0.0.2", "2001:db8::1"]
    resolved = pool.servers[1]
    assert resolved.origin == TEMPLATE and not resolved.address.resolve and resolved.address.port == 8080
    discovery.stopService()


def test_addresses_join_and_vanished_ones_retire(logged):
    resolver = ScriptedResolver("10.0.0.1", "10.0.0.2")
    clock, pool, discovery = watched(resolver)
    first, second = pool.servers[1:]
    resolver.addresses = ["10.0.0.2", "10.0.0.3"]
    clock.advance(10)
    assert hosts(pool) == ["192.0.2.9", "10.0.0.2", "10.0.0.3"]
    assert pool.servers[1] is second, "a server that stays keeps its state"
    assert first.retiring and first not in pool.servers
    assert logged == [
        f"upstream chat server 10.0.0.1:8080 joined: {NAME} resolves to it",
        f"upstream chat server 10.0.0.2:8080 joined: {NAME} resolves to it",
        f"upstream chat server 10.0.0.1:8080: up -> draining ({NAME} no longer resolves to it)",
        f"upstream chat server 10.0.0.3:8080 joined: {NAME} resolves to it",
    ]
    discovery.stopService()


@pytest.mark.parametrize("ttl, wait", [(3, 3.0), (60, 10.0), (0, MINIMUM_WAIT)])
def test_looked_up_again_after_the_interval_or_the_ttl_whichever_is_shorter(ttl, wait):
    resolver = ScriptedResolver("10.0.0.1", ttl=ttl)
    clock, pool, discovery = watched(resolver)
    clock.advance(wait - 0.01)
    assert resolver.lookups == 1
    clock.advance(0.01)
    assert resolver.lookups == 2
    discovery.stopService()


def test_a_failed_lookup_keeps_the_last_set_and_logs_once(logged):
    resolver = ScriptedResolver("10.0.0.1", "10.0.0.2")
    clock, pool, discovery = watched(resolver, interval=1)
    before = list(pool.servers)
    del logged[:]
    resolver.failures = {dns.A: error.DNSQueryTimeoutError(NAME), dns.AAAA: error.DNSServerError(NAME)}
    for _ in range(5):
        clock.advance(1)
    assert pool.servers == before
    assert resolver.lookups == 6
    assert logged == [
        f"upstream chat: looking up {NAME} failed (A: timed out; AAAA: server failure); keeping 10.0.0.1, 10.0.0.2"
    ]
    resolver.failures = {}
    resolver.addresses = ["10.0.0.3"]
    clock.advance(1)
    clock.advance(1)
    assert hosts(pool) == ["192.0.2.9", "10.0.0.3"]
    assert logged[1] == f"upstream chat: {NAME} resolves again"
    assert len(logged) == 5  # again, joined, two retiring
    discovery.stopService()


def test_one_record_type_failing_keeps_its_addresses_only():
    resolver = ScriptedResolver("10.0.0.1", "2001:db8::1")
    clock, pool, discovery = watched(resolver)
    resolver.failures = {dns.AAAA: error.DNSQueryTimeoutError(NAME)}
    resolver.addresses = ["10.0.0.2"]
    clock.advance(10)
    assert hosts(pool) == ["192.0.2.9", "10.0.0.2", "2001:db8::1"]
    discovery.stopService()


@pytest.mark.parametrize("failure", [None, error.DNSNameError(NAME)], ids=["no-records", "nxdomain"])
def test_a_name_with_no_address_keeps_the_last_set(logged, failure):
    resolver = ScriptedResolver("10.0.0.1")
    clock, pool, discovery = watched(resolver)
    resolver.addresses = []
    if failure is not None:
        resolver.failures = {dns.A: failure, dns.AAAA: failure}
    clock.advance(10)
    clock.advance(10)
    assert hosts(pool) == ["192.0.2.9", "10.0.0.1"]
    assert logged[-1] == f"upstream chat: looking up {NAME} failed (no A or AAAA record); keeping 10.0.0.1"
    discovery.stopService()


def test_a_name_that_never_resolved_keeps_the_name():
    resolver = ScriptedResolver()
    resolver.failures = {dns.A: error.DNSQueryTimeoutError(NAME), dns.AAAA: error.DNSQueryTimeoutError(NAME)}
    clock, pool, discovery = watched(resolver)
    assert pool.servers[1].address == TEMPLATE and not pool.servers[1].retiring
    discovery.stopService()


def test_stopping_ends_the_lookups():
    resolver = ScriptedResolver("10.0.0.1")
    clock, pool, discovery = watched(resolver)
    discovery.stopService()
    assert not clock.getDelayedCalls()
    clock.advance(100)
    assert resolver.lookups == 1


def test_an_answer_after_stop_changes_nothing():
    clock = Clock()
    pool = UpstreamPool(Upstream("chat", (TEMPLATE,)), clock)
    pending = []

    class Slow:
        def lookupAddress(self, name, timeout=None):
            from twisted.internet.defer import Deferred

            pending.append(Deferred())
            return pending[-1]

        lookupIPV6Address = lookupAddress

    watcher = NameWatcher(pool, TEMPLATE, Slow(), clock)
    watcher.start()
    watcher.stop()
    for d in pending:
        d.callback(([dns.RRHeader(NAME, dns.A, payload=dns.Record_A("10.0.0.1"))], [], []))
    assert hosts(pool) == [NAME]
    assert not clock.getDelayedCalls()


def test_a_retired_address_takes_no_new_request_nor_keeps_idle_connections():
    clock = Clock()
    pool = UpstreamPool(Upstream("chat", (TEMPLATE,)), clock)
    pool.updateResolved(TEMPLATE, ["10.0.0.1", "10.0.0.2"])
    gone = pool.servers[0]
    pool.updateResolved(TEMPLATE, ["10.0.0.2"])
    assert all(gone not in pool.pickOrder() for _ in range(3))
    assert not pool.release(gone, object()), "a connection to a retired server is closed, not kept"


def test_a_reload_starts_from_the_addresses_the_old_pool_resolved():
    old = UpstreamPool(Upstream("chat", (TEMPLATE,)), Clock())
    old.updateResolved(TEMPLATE, ["10.0.0.1", "10.0.0.2"])
    new = UpstreamPool(Upstream("chat", (FIXED, TEMPLATE), keepalive=4), Clock())
    carryResolved(old, new)
    assert hosts(new) == ["192.0.2.9", "10.0.0.1", "10.0.0.2"]
    assert all(server not in old.servers for server in new.servers)


def test_a_tls_name_is_verified_as_the_name_not_the_address():
    names = []
    template = UpstreamAddress(NAME, 443, tls=True, resolve=True)
    UpstreamPool(Upstream("chat", (template,)), Clock(), lambda address: names.append(address.host)).updateResolved(
        template, ["10.0.0.1"]
    )
    assert names == [NAME, NAME]


# Configuration.


def upstreamOf(table: dict) -> Upstream:
    document = {"upstream": {"app": table}, "server": [{"listen": "tcp:0", "proxy_pass": "http://app"}]}
    return parseConfig(document, "(test)").upstreams["app"]


def test_resolve_keys():
    upstream = upstreamOf(
        {"servers": ["10.0.0.1:80", f"{NAME}:8080 resolve"], "resolver": "127.0.0.1:5353", "resolve_interval": "10s"}
    )
    assert upstream.servers == (UpstreamAddress("10.0.0.1", 80), TEMPLATE)
    assert upstream.resolver == ("127.0.0.1", 5353)
    assert upstream.resolve_interval == 10.0
    assert upstreamOf({"servers": ["a:1"], "resolver": "[::1]"}).resolver == ("::1", 53)
    assert upstreamOf({"servers": ["a:1"], "resolver": "192.0.2.1"}).resolver == ("192.0.2.1", 53)


@pytest.mark.parametrize(
    "table, key, words",
    [
        ({"servers": ["10.0.0.1:80 resolve"]}, "servers", "needs a host name"),
        ({"servers": ["a:80 resolv"]}, "servers", "unknown server parameter 'resolv'"),
        ({"servers": ["a:80"], "resolver": "dns.example:53"}, "resolver", "expected"),
        ({"servers": ["a:80"], "resolver": "127.0.0.1:99999"}, "resolver", "bad port"),
        ({"servers": ["a:80"], "resolve_interval": 0}, "resolve_interval", "more than 0"),
    ],
)
def test_bad_resolve_keys(table, key, words):
    with pytest.raises(ConfigError) as raised:
        upstreamOf(table)
    assert raised.value.key == f"upstream.app.{key}"
    assert words in raised.value.problem


# A real DNS server whose records change while the proxy runs.


class Zone(FileAuthority):
    """An authority for example.test held in memory; L{point} changes a name's A records."""

    def __init__(self) -> None:
        super().__init__(None)

    def loadFile(self, filename) -> None:
        soa = dns.Record_SOA(mname=b"ns.example.test", rname=b"root.example.test", minimum=1, expire=1, ttl=1)
        self.soa = (b"example.test", soa)
        self.records = {}

    def point(self, name: str, *addresses: str) -> None:
        self.records[name.encode()] = [dns.Record_A(address, ttl=1) for address in addresses]


class EchoAfterUpgrade(ScriptedConnection):
    """A WebSocket-ish upstream: after its 101 it sends back whatever it receives."""

    def dataReceived(self, data: bytes) -> None:
        if self.switched:
            self.transport.write(data)
        super().dataReceived(data)


def listenAt(address: str, port: int = 0):
    def answer(request: bytes, connection) -> bytes:
        return switching(KEY) if b"Upgrade: websocket" in request else ok(address.encode())

    factory = ScriptedUpstream(answer)
    factory.connectionClass = EchoAfterUpgrade
    return reactor.listenTCP(port, factory, interface=address), factory


async def openTunnel(port: int):
    client = await connectRaw(port)
    client.transport.write(upgradeRequest())
    assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    return client


def tunnelsAt(factory) -> int:
    return sum(1 for connection in factory.connections if connection.switched)


@pytest_twisted.ensureDeferred
async def test_records_change_under_100_open_tunnels(cleanup, logged):
    zone = Zone()
    zone.point(NAME, "127.0.0.1")
    dnsPort = cleanup.port(reactor.listenUDP(0, dns.DNSDatagramProtocol(DNSServerFactory([zone])), interface=LOOPBACK))
    first, factory1 = listenAt("127.0.0.1")
    cleanup.port(first)
    port = first.getHost().port
    (second, factory2), (third, factory3) = listenAt("127.0.0.2", port), listenAt("127.0.0.3", port)
    cleanup.port(second), cleanup.port(third)
    upstreams = {
        "chat": {
            "servers": [f"{NAME}:{port} resolve"],
            "resolver": f"127.0.0.1:{dnsPort.getHost().port}",
            "resolve_interval": "0.2s",
        }
    }
    proxy = cleanup.service(await startProxy(upstreams, {"proxy_pass": "http://chat"}))
    pool = proxy.pools["chat"]
    assert await until(lambda: hosts(pool) == ["127.0.0.1"], timeout=5)

    tunnels = [await openTunnel(proxy.ports[0]) for _ in range(50)]
    assert tunnelsAt(factory1) == 50

    zone.point(NAME, "127.0.0.2", "127.0.0.3")
    assert await until(lambda: hosts(pool) == ["127.0.0.2", "127.0.0.3"], timeout=5)
    tunnels += [await openTunnel(proxy.ports[0]) for _ in range(50)]
    assert (tunnelsAt(factory1), tunnelsAt(factory2), tunnelsAt(factory3)) == (50, 25, 25)

    for number, client in enumerate(tunnels):
        client.transport.write(b"<%d>" % number)
    for number, client in enumerate(tunnels):
        marker = b"<%d>" % number
        assert (await client.waitFor(marker)).endswith(marker), f"tunnel {number} answers"
        assert not client.closed.called
    bodies = {
        (await exchange(proxy.ports[0], b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))[-9:]
        for _ in range(4)
    }
    assert bodies == {b"127.0.0.2", b"127.0.0.3"}
    assert f"upstream chat server 127.0.0.1:{port}: up -> draining ({NAME} no longer resolves to it)" in logged

    for client in tunnels:
        client.transport.abortConnection()
