"""
The proxy as a service: graceful shutdown (stop accepting, finish what is
under way, drain tunnels) and configuration reload (new requests see it,
open tunnels keep running, a bad file changes nothing).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest_twisted
from support import (
    ENVIRONMENT,
    TWISTD,
    connectRaw,
    exchange,
    listeningPorts,
    listenScripted,
    ok,
    proxyTo,
    startProxy,
    switching,
    until,
    upgradeRequest,
)
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import formatEvent, globalLogPublisher

from wsproxy import parseConfig
from wsproxy.listeners import describeAddress
from wsproxy.tap import reloadFrom

GET_CLOSE = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_shutdown_stops_accepting_finishes_responses_and_drains_tunnels(cleanup):
    def answer(request, connection):
        if b"Upgrade" in request:
            return switching()
        from twisted.internet import reactor

        connection.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        reactor.callLater(0.3, connection.transport.write, b"world")
        return None

    upstream, _ = listenScripted(answer, closeAfter=False)
    cleanup.port(upstream)
    upstreams, block = proxyTo(upstream.getHost().port)
    proxy = await startProxy(upstreams, block, shutdown_timeout=0.8)
    port = proxy.ports[0]

    tunnel = await connectRaw(port)
    tunnel.transport.write(upgradeRequest())
    await tunnel.waitFor(b"\r\n\r\n")
    slow = await connectRaw(port)
    slow.transport.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    await slow.waitFor(b"hello")
    idle = await connectRaw(port)
    assert await until(lambda: len(proxy.listeners[0].proxyFactory.connections) == 3), "the proxy has the idle one"

    started = time.monotonic()
    stopping = proxy.stopService()
    assert await idle.waitClosed(timeout=1) == b""
    try:
        await connectRaw(port)
        accepted = True
    except ConnectionRefusedError:
        accepted = False
    assert not accepted, "a stopped listener must not accept"
    response = await slow.waitClosed(timeout=2)
    assert response.endswith(b"helloworld"), "a response under way is finished"
    assert not tunnel.closed.called, "a tunnel is given the drain period"
    await stopping
    assert time.monotonic() - started >= 0.7
    assert await tunnel.waitClosed(timeout=1) is not None


@pytest_twisted.ensureDeferred
async def test_reload_applies_to_new_requests_and_keeps_tunnels(cleanup):
    first, firstFactory = listenScripted(
        lambda r, c: switching() if b"Upgrade" in r else ok(b"first"), closeAfter=False
    )
    second, _ = listenScripted(ok(b"second"))
    cleanup.port(first), cleanup.port(second)
    upstreams, block = proxyTo(first.getHost().port)
    proxy = cleanup.service(await startProxy(upstreams, block))
    port = proxy.ports[0]
    tunnel = await connectRaw(port)
    tunnel.transport.write(upgradeRequest())
    await tunnel.waitFor(b"\r\n\r\n")
    assert (await exchange(port, GET_CLOSE)).endswith(b"first")

    listen = proxy.listeners[0].block.listen
    proxy.reload(
        parseConfig(
            {
                "upstream": {"app": {"servers": [f"127.0.0.1:{second.getHost().port}"]}},
                "server": [
                    {
                        "listen": listen,
                        "proxy_pass": "http://app",
                        "access_log": False,
                        "add_header": {"X-Reloaded": "yes"},
                    }
                ],
            }
        )
    )
    response = await exchange(port, GET_CLOSE)
    assert response.endswith(b"second") and b"X-Reloaded: yes\r\n" in response
    assert not tunnel.closed.called
    frame = b"\x81\x80\x00\x00\x00\x00"
    tunnel.transport.write(frame)
    upstreamEnd = firstFactory.connections[0]
    assert await until(lambda: upstreamEnd.received.endswith(frame)), "the tunnel still relays"
    assert not tunnel.closed.called
    tunnel.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_bad_file_on_reload_keeps_the_running_configuration(cleanup, tmp_path):
    upstream, _ = listenScripted(ok(b"kept"))
    cleanup.port(upstream)
    upstreams, block = proxyTo(upstream.getHost().port)
    proxy = cleanup.service(await startProxy(upstreams, block))
    path = tmp_path / "wsproxy.toml"
    path.write_text("[[server]]\nlisten = 'tcp:0'\nproxy_pass = 'http://nowhere'\n")
    assert reloadFrom(proxy, str(path)) is False
    assert (await exchange(proxy.ports[0], GET_CLOSE)).endswith(b"kept")


@pytest_twisted.ensureDeferred
async def test_a_bound_listener_logs_where_it_listens(cleanup):
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        proxy = cleanup.service(await startProxy(*proxyTo(9)))
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [line for line in lines if "listening on" in line] == [
        f"server[0] tcp:0:interface=127.0.0.1 listening on 127.0.0.1:{proxy.ports[0]}"
    ]


def test_addresses_in_the_listening_line():
    assert describeAddress(IPv4Address("TCP", "127.0.0.1", 8080)) == "127.0.0.1:8080"
    assert describeAddress(IPv6Address("TCP", "::1", 8443)) == "[::1]:8443"
    assert describeAddress(UNIXAddress(b"/run/wsproxy.sock")) == "/run/wsproxy.sock"


def test_sighup_reloads_a_running_twistd(tmp_path):
    answers = {}
    servers = []
    for name in (b"one", b"two"):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        servers.append(server)
        answers[server.getsockname()[1]] = name
    portA, portB = (s.getsockname()[1] for s in servers)
    config = tmp_path / "wsproxy.toml"
    template = '[upstream.app]\nservers = ["127.0.0.1:{}"]\n[[server]]\nlisten = "tcp:0:interface=127.0.0.1"\nproxy_pass = "http://app"\n'
    config.write_text(template.format(portA))
    log = tmp_path / "twistd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(config)],
            env=ENVIRONMENT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        (listenPort,) = listeningPorts(log, process)

        def ask() -> int:
            with socket.create_connection(("127.0.0.1", listenPort), timeout=5) as client:
                client.sendall(GET_CLOSE)
                for server in servers:
                    server.settimeout(0.2)
                    try:
                        connection, _ = server.accept()
                    except OSError:
                        continue
                    with connection:
                        connection.recv(65536)
                        connection.sendall(ok(answers[server.getsockname()[1]]))
                    return server.getsockname()[1]
            raise AssertionError("no upstream was asked")

        assert ask() == portA
        config.write_text(template.format(portB))
        os.kill(process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "configuration reloaded" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "configuration reloaded" in log.read_text(), log.read_text()
        assert ask() == portB
    finally:
        process.terminate()
        process.wait(timeout=30)
        for server in servers:
            server.close()
