"""
Balancing: the server parameters and policies of an upstream pool, chosen
on a L{Clock} without sockets (fast, exact), and the lease that counts a
server's open requests and tunnels.  The whole path over real sockets is in
L{tests.test_balancing_live}.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from random import Random
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from wsproxy import parseConfig
from wsproxy.config import ConfigError, UpstreamAddress, parseUpstreamAddress
from wsproxy.upstream import (
    Lease,
    NoUpstreamAvailable,
    ServerState,
    UpstreamPool,
    UpstreamsFull,
    ipHashKey,
)


def upstreamOf(servers: list[Any], **table: Any) -> Any:
    document = {
        "upstream": {"app": {"servers": servers, **table}},
        "server": [{"listen": "tcp:0", "proxy_pass": "http://app"}],
    }
    return parseConfig(document, "(test)").upstreams["app"]


def poolOf(servers: list[Any], clock: Clock | None = None, seed: int = 1, **table: Any) -> UpstreamPool:
    return UpstreamPool(upstreamOf(servers, **table), clock or Clock(), random=Random(seed))


def problem(servers: list[Any], **table: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        upstreamOf(servers, **table)
    return str(caught.value)


def ports(pool: UpstreamPool, picks: int, key: Any = None, hold: bool = False) -> Counter:
    """Which server (by port) comes first in each of C{picks} orders; with C{hold}, each pick stays open."""
    counts: Counter = Counter()
    for i in range(picks):
        server = pool.pickOrder(key(i) if callable(key) else key)[0]
        if hold:
            Lease().hold(server)
        counts[server.address.port] += 1
    return counts


@pytest.fixture
def stateLog():
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "upstreamState" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# The server parameters


def test_nginx_server_parameters_are_parsed_onto_the_address():
    address = parseUpstreamAddress("10.0.0.2:8080 weight=3 max_conns=500 max_fails=2 fail_timeout=30s backup")
    assert address == UpstreamAddress(
        "10.0.0.2", 8080, weight=3, max_conns=500, max_fails=2, fail_timeout=30.0, backup=True
    )
    assert parseUpstreamAddress("x:8080 down").down
    assert parseUpstreamAddress("Chat.Svc:8080 resolve") == UpstreamAddress("chat.svc", 8080, resolve=True)
    assert address.endpoint == ("10.0.0.2", 8080, False)
    assert str(address) == "10.0.0.2:8080"


@pytest.mark.parametrize(
    "server, message",
    [
        ("10.0.0.1:80 slow_start=30s", "unknown server parameter 'slow_start=30s'"),
        ("10.0.0.1:80 weight", "unknown server parameter 'weight'"),
        ("10.0.0.1:80 backup=1", "unknown server parameter 'backup=1'"),
        ("10.0.0.1:80 weight=0", "bad value in server parameter 'weight=0'"),
        ("10.0.0.1:80 max_conns=-1", "bad value in server parameter 'max_conns=-1'"),
        ("10.0.0.1:80 fail_timeout=soon", "bad duration in server parameter 'fail_timeout=soon'"),
    ],
)
def test_a_bad_server_parameter_is_a_config_error_naming_it(server, message):
    assert problem(["10.0.0.9:80", server]) == f"(test): upstream.app.servers: {message}"


def test_the_table_form_of_a_server():
    upstream = upstreamOf([{"address": "10.0.0.1:80", "weight": 2, "backup": True}, "10.0.0.2:80"])
    assert upstream.servers[0] == UpstreamAddress("10.0.0.1", 80, weight=2, backup=True)
    assert problem([{"address": "10.0.0.1:80", "colour": "red"}]).endswith("unknown server parameter 'colour=red'")
    assert "needs address" in problem([{"weight": 2}])


def test_the_policy_keys_are_checked():
    assert upstreamOf(["a:1"], balance="hash", hash="$cookie_io").hash == "$cookie_io"
    assert "unknown policy 'fair'" in problem(["a:1"], balance="fair")
    assert problem(["a:1"], balance="hash").endswith('hash: is required with balance = "hash", and only with it')
    assert "only with it" in problem(["a:1"], hash="$remote_addr")
    assert "not a cookie name" in problem(["a:1"], sticky_cookie="a b")
    assert "not a backup" in problem(["a:1 backup"])


# Round-robin


def test_round_robin_is_nginx_smooth_weighted_round_robin():
    pool = poolOf(["127.0.0.1:1", "127.0.0.1:2 weight=3"])
    order = [pool.pickOrder()[0].address.port for _ in range(8)]
    assert order == [2, 1, 2, 2, 2, 1, 2, 2], "spread out, not 1 then 2, 2, 2"
    assert ports(pool, 1000) == {1: 250, 2: 750}


def test_round_robin_failover_order_is_every_other_server_once():
    pool = poolOf(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    orders = [[s.address.port for s in pool.pickOrder()] for _ in range(3)]
    assert orders == [[1, 2, 3], [2, 3, 1], [3, 1, 2]]


# least_conn and random_two


def test_least_conn_counts_open_requests_and_tunnels_per_weight():
    pool = poolOf(["127.0.0.1:1", "127.0.0.1:2 weight=2", "127.0.0.1:3"], balance="least_conn")
    # 1,000 short requests (each over before the next): weighted round-robin.
    assert ports(pool, 1000) == {1: 250, 2: 500, 3: 250}
    # 300 long-lived ones: level per unit of weight.
    assert ports(pool, 300, hold=True) == {1: 75, 2: 150, 3: 75}
    tunnel = Lease()
    tunnel.hold(pool.servers[0])
    tunnel.becomeTunnel()
    assert [s.load.tunnels for s in pool.servers] == [1, 0, 0]
    assert pool.pickOrder()[0] is not pool.servers[0], "a tunnel counts"


def test_least_conn_sends_new_tunnels_to_a_restarted_server_until_the_counts_are_level():
    pool = poolOf(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], balance="least_conn")
    leases = {port: [] for port in (1, 2, 3)}
    for _ in range(300):
        lease = Lease()
        lease.hold(pool.pickOrder()[0])
        lease.becomeTunnel()
        leases[lease.server.address.port].append(lease)
    assert [len(leases[p]) for p in (1, 2, 3)] == [100, 100, 100]
    for lease in leases[2]:  # server 2 restarts: its tunnels end
        lease.release()
    assert ports(pool, 100, hold=True) == {2: 100}, "every new tunnel goes to the restarted server"
    assert ports(pool, 30, hold=True) == {1: 10, 2: 10, 3: 10}, "then round-robin again"


def test_random_two_takes_the_less_loaded_of_two_weighted_draws():
    pool = poolOf(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3 weight=2"], balance="random_two", seed=7)
    requests = ports(pool, 1000)
    assert sum(requests.values()) == 1000 and set(requests) == {1, 2, 3}
    assert 150 <= requests[1] <= 350 and 150 <= requests[2] <= 350 and 400 <= requests[3] <= 600
    tunnels = ports(pool, 300, hold=True)
    ratios = [s.ratio for s in pool.servers]
    assert max(ratios) - min(ratios) <= 2, f"long-lived connections stay nearly level: {tunnels}"
    print(f"random_two: 1,000 requests {dict(requests)}; 300 tunnels {dict(tunnels)}")


# Consistent hashing


def test_hash_removing_one_of_five_servers_moves_only_its_keys(capsys, record_property):
    five = [f"10.0.0.{i}:80" for i in range(1, 6)]
    before = poolOf(five, balance="hash", hash="$arg_u")
    after = poolOf(five[:4], balance="hash", hash="$arg_u")
    keys = [b"user-%d" % i for i in range(10_000)]
    was = [str(before.pickOrder(key)[0].address) for key in keys]
    now = [str(after.pickOrder(key)[0].address) for key in keys]
    moved = [i for i in range(len(keys)) if was[i] != now[i]]
    fraction = len(moved) / len(keys)
    spread = Counter(was)
    record_property("hash_remap_fraction", fraction)
    with capsys.disabled():
        print(
            f"\nconsistent hash: {fraction:.4f} of 10,000 keys moved when 1 of 5 servers was removed; "
            f"spread over 5: {sorted(spread.values())}"
        )
    assert fraction <= 0.3
    assert all(was[i] == "10.0.0.5:80" for i in moved), "only the removed server's keys move"
    assert all(1500 <= count <= 2500 for count in spread.values()), spread


def test_hash_weights_and_down_servers_keep_the_others_keys():
    pool = poolOf(["10.0.0.1:80", "10.0.0.2:80 weight=3"], balance="hash", hash="$arg_u")
    counts = Counter(pool.pickOrder(b"k%d" % i)[0].address.host for i in range(4000))
    assert 0.2 <= counts["10.0.0.1"] / 4000 <= 0.3, counts
    three = poolOf(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], balance="hash", hash="$arg_u")
    keys = [b"k%d" % i for i in range(1000)]
    was = [three.pickOrder(key)[0] for key in keys]
    three.servers[0].checkDown = True
    now = [three.pickOrder(key)[0] for key in keys]
    assert all(a is b for a, b in zip(was, now, strict=True) if a is not three.servers[0])
    assert three.servers[0] not in now
    assert [len(three.pickOrder(key)) for key in keys[:3]] == [2, 2, 2], "failover: the next on the ring"


def test_ip_hash_keys_on_the_first_three_octets_of_ipv4():
    assert ipHashKey("192.0.2.7") == ipHashKey("192.0.2.200") == bytes([192, 0, 2])
    assert ipHashKey("192.0.3.7") != ipHashKey("192.0.2.7")
    assert ipHashKey("2001:db8::1") != ipHashKey("2001:db8::2")
    pool = poolOf(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], balance="ip_hash")
    networks = [ipaddress.ip_address("198.18.0.0") + 256 * i for i in range(1000)]
    counts = Counter(pool.pickOrder(ipHashKey(str(ip)))[0].address.host for ip in networks)
    assert all(250 <= count <= 420 for count in counts.values()), counts
    print(f"ip_hash: 1,000 client /24s {dict(counts)}")


def test_hash_without_a_key_falls_back_to_round_robin():
    pool = poolOf(["10.0.0.1:80", "10.0.0.2:80"], balance="hash", hash="$cookie_io")
    assert [pool.pickOrder(b"")[0].address.host for _ in range(4)] == ["10.0.0.1", "10.0.0.2"] * 2


# Sticky cookie


def test_a_sticky_id_pins_while_its_server_is_up():
    pool = poolOf(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], sticky_cookie="srv")
    third = pool.servers[2]
    assert third.id not in ("10.0.0.3:80", "10.0.0.3") and len(third.id) == 16
    assert third.id == poolOf(["10.0.0.3:80"]).servers[0].id, "the same in every pool, worker and reload"
    assert [pool.pickOrder(sticky=third.id)[0] for _ in range(5)] == [third] * 5
    assert len(pool.pickOrder(sticky=third.id)) == 3
    assert pool.pickOrder(sticky=b"unknown")[0] in pool.servers
    third.checkDown = True
    assert third not in pool.pickOrder(sticky=third.id)


# backup, down, max_conns, checkDown and retiring


def test_backup_servers_only_when_every_primary_is_out():
    clock = Clock()
    pool = poolOf(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:80 backup"], clock)
    primary1, primary2, backup = pool.servers
    assert ports(pool, 100) == {80: 100} and all(pool.pickOrder()[0] is not backup for _ in range(10))
    assert pool.pickOrder()[-1] is backup, "failover ends at the backup"
    primary1.checkDown = True
    primary2.failed(clock.seconds())
    assert pool.pickOrder() == [backup, primary2], "the backup, then the primary down by failures"
    clock.advance(10)
    assert pool.pickOrder()[0] is primary2, "fail_timeout passed: the primary is back"


def test_down_servers_are_never_picked():
    pool = poolOf(["10.0.0.1:80 down", "10.0.0.2:80"])
    assert {pool.pickOrder()[0].address.host for _ in range(4)} == {"10.0.0.2"}
    assert len(pool.pickOrder()) == 1
    pool.servers[1].retiring = True
    with pytest.raises(NoUpstreamAvailable) as caught:
        pool.pickOrder()
    assert "10.0.0.1:80: down by config; 10.0.0.2:80: draining" in str(caught.value)


def test_max_conns_passes_a_full_server_over_and_all_full_is_upstreams_full():
    pool = poolOf(["10.0.0.1:80 max_conns=2", "10.0.0.2:80 max_conns=1", "10.0.0.9:80 backup max_conns=1"])
    assert ports(pool, 4, hold=True) == {80: 4}
    assert [s.load.requests for s in pool.servers] == [2, 1, 1], "the backup took the fourth"
    with pytest.raises(UpstreamsFull):
        pool.pickOrder()
    pool.servers[1].load.requests -= 1
    assert pool.pickOrder() == [pool.servers[1]]


def test_per_server_max_fails_and_fail_timeout():
    clock = Clock()
    pool = poolOf(["10.0.0.1:80 max_fails=2 fail_timeout=3s", "10.0.0.2:80"], clock, max_fails=1)
    first, second = pool.servers
    assert not first.failed(clock.seconds()) and first.failed(clock.seconds())
    assert first.state(clock.seconds()) is ServerState.DOWN_BY_FAILURES
    clock.advance(3)
    assert first.state(clock.seconds()) is ServerState.UP
    assert second.failed(clock.seconds()), "the upstream's max_fails = 1"


# The lease


def test_a_lease_counts_once_moves_with_failover_and_releases_once():
    pool = poolOf(["10.0.0.1:80", "10.0.0.2:80"])
    first, second = pool.servers
    lease = Lease()
    lease.hold(first)
    lease.hold(first)
    assert (first.load.requests, second.load.requests) == (1, 0)
    lease.hold(second)
    assert (first.load.requests, second.load.requests) == (0, 1)
    lease.becomeTunnel()
    lease.becomeTunnel()
    assert (second.load.requests, second.load.tunnels) == (0, 1)
    lease.hold(first)
    assert first.load.total == 0, "a tunnel does not move"
    lease.release()
    lease.release()
    lease.hold(first)
    lease.becomeTunnel()
    assert first.load.total == second.load.total == 0, "nothing counts after the release"


# State: snapshot, log, reload


def test_snapshot_and_a_log_line_on_every_state_change(stateLog):
    clock = Clock()
    pool = poolOf(["10.0.0.1:80 max_conns=9", "10.0.0.2:80 down", "10.0.0.9:80 backup"], clock)
    Lease().hold(pool.servers[0])
    tunnel = Lease()
    tunnel.hold(pool.servers[0])
    tunnel.becomeTunnel()
    snapshot = pool.snapshot()
    assert [(s.address, s.state, s.requests, s.tunnels, s.max_conns) for s in snapshot] == [
        ("10.0.0.1:80", ServerState.UP, 1, 1, 9),
        ("10.0.0.2:80", ServerState.DOWN_BY_CONFIG, 0, 0, 0),
        ("10.0.0.9:80", ServerState.BACKUP, 0, 0, 0),
    ]
    assert stateLog == []
    first = pool.servers[0]
    first.failed(clock.seconds())
    pool.noteState(first, "connection refused")
    pool.noteState(first, "connection refused")
    first.checkDown = True
    pool.noteState(first, "check failed")
    first.checkDown = False
    pool.noteState(first, "check passed")
    clock.advance(10)
    assert pool.snapshot()[0].state is ServerState.UP
    assert [e["upstreamState"] for e in stateLog] == ["down by failures", "down by check", "down by failures", "up"]
    assert stateLog[-1]["why"] == "fail_timeout passed"


def test_a_reload_carries_counts_and_health_of_the_servers_that_stay(stateLog):
    clock = Clock()
    old = poolOf(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], clock)
    a, b, c = old.servers
    open_ = Lease()
    open_.hold(a)
    open_.becomeTunnel()
    b.failed(clock.seconds())
    b.checkDown = True
    new = poolOf(["10.0.0.1:80 weight=2", "10.0.0.2:80", "10.0.0.4:80"], clock, balance="least_conn")
    new.adopt(old)
    old.retire(new)
    byAddress = {s.address: s for s in new.snapshot()}
    assert (byAddress["10.0.0.1:80"].tunnels, byAddress["10.0.0.1:80"].weight) == (1, 2)
    assert byAddress["10.0.0.2:80"].state is ServerState.DOWN_BY_CHECK
    assert byAddress["10.0.0.4:80"].state is ServerState.UP
    assert [s.state for s in old.snapshot()][2] is ServerState.DRAINING, "removed by the reload"
    assert [(e["upstreamServer"], e["upstreamState"]) for e in stateLog] == [
        ("10.0.0.2:80", "down by check"),
        ("10.0.0.3:80", "draining"),
    ]
    open_.release()
    assert new.snapshot()[0].tunnels == 0, "a lease from before the reload releases what the new pool counts"


# Connecting: the servers of one pick, tried in turn.


def connectingPool(servers: list[str]) -> tuple[UpstreamPool, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    return UpstreamPool(upstreamOf(servers), reactor, random=Random(1)), reactor


def test_a_refused_server_passes_the_request_to_the_next():
    pool, reactor = connectingPool(["127.0.0.1:9001", "127.0.0.1:9002"])
    results: list[Any] = []
    pool.connectInOrder(pool.servers, Protocol, 5.0).addBoth(results.append)
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 9001, 5.0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert results == [] and len(reactor.tcpClients) == 2
    factory = reactor.tcpClients[1][2]
    standIn = factory.buildProtocol(None)
    transport = StringTransport()
    transport.protocol = standIn
    standIn.makeConnection(transport)
    [(server, protocol, reused)] = results
    assert server.address.port == 9002 and not reused
    assert transport.protocol is protocol and protocol.transport is transport, "no wrapper in between"


def test_every_server_refusing_is_one_failure_naming_each():
    pool, reactor = connectingPool(["127.0.0.1:9001", "127.0.0.1:9002"])
    results: list[Any] = []
    pool.connectInOrder(pool.servers, Protocol, 5.0).addBoth(results.append)
    for index in range(2):
        reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    [failure] = results
    assert failure.check(NoUpstreamAvailable)
    assert "127.0.0.1:9001" in str(failure.value) and "127.0.0.1:9002" in str(failure.value)


def test_cancelling_stops_the_attempt_without_counting_a_failure():
    pool, reactor = connectingPool(["127.0.0.1:9001", "127.0.0.1:9002"])
    results: list[Any] = []
    attempt = pool.connectInOrder(pool.servers, Protocol, 5.0)
    attempt.addBoth(results.append)
    connector = reactor.connectors[0]
    attempt.cancel()
    [failure] = results
    assert failure.check(CancelledError)
    assert connector.stoppedConnecting
    assert len(reactor.tcpClients) == 1, "the next server is not tried"
    assert pool.servers[0].downUntil == 0.0


def test_an_error_of_our_own_fails_the_attempt_instead_of_raising():
    pool, _ = connectingPool(["127.0.0.1:9001"])

    def broken() -> Protocol:
        raise RuntimeError("no protocol")

    results: list[Any] = []
    pool.connectInOrder(pool.servers, broken, 5.0).addBoth(results.append)
    [failure] = results
    assert failure.check(RuntimeError)
