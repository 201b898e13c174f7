"""
The deployment files in C{deploy/}, checked for what can be checked without
Docker, Kubernetes or systemd: the image's command runs the proxy here as
it is, with the ConfigMap's configuration (its addresses moved to free
loopback ports) and stops on SIGTERM; the manifests parse, and their
probes, ports, mount and grace period agree with the configuration they
mount and the image they run; the systemd units parse, name the same
configuration, and the service runs on sockets handed over the way
C{wsproxy.socket} hands them (C{LISTEN_FDS}, C{LISTEN_PID}).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
import yaml
from support import ENVIRONMENT, LOOPBACK, RawClient, exchange, listeningPortsOf, listenScripted, ok, until
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread

import wsproxy
from wsproxy import parseConfig

DEPLOY = Path(__file__).parent.parent / "deploy"
BIN = str(Path(sys.executable).parent)
#: The environment of a process started from this virtual environment, as the image's PATH would find it.
RUNNING = {**ENVIRONMENT, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
#: What the drain gives a tunnel's close handshake after shutdown_timeout, when not configured.
WEBSOCKET_CLOSE_TIMEOUT = 5
#: systemd's part of a socket activation: the sockets as descriptors 3, 4, ... and
#: LISTEN_FDS, LISTEN_PID (the process's own, which exec keeps) and LISTEN_FDNAMES
#: (the socket unit's name for each, unless FileDescriptorName= says otherwise; Twisted
#: ignores descriptors without names) in the environment.
ACTIVATE = """
import os, sys
handed = [int(fd) for fd in sys.argv[1].split(",")]
for index, fd in enumerate(handed):
    os.dup2(fd, 3 + index)
os.environ.update(
    LISTEN_FDS=str(len(handed)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join(["wsproxy.socket"] * len(handed))
)
os.execv(sys.argv[2], sys.argv[2:])
"""
GET = b"GET /deployed HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def replaceOnce(text: str, pattern: str, replacement: str) -> str:
    """C{text} with the one match of C{pattern} replaced: a file that changed shape fails here."""
    found = re.findall(pattern, text, flags=re.M)
    assert len(found) == 1, f"expected one {pattern!r} in:\n{text}"
    return re.sub(pattern, replacement, text, flags=re.M)


def withMetricsOn(text: str) -> str:
    """The configuration's metrics listener moved to a free port on loopback (its log line names it)."""
    return replaceOnce(text, r'^listen = "tcp:9145[^"]*"', f'listen = "tcp:0:interface={LOOPBACK}"')


#: What the metrics listener logs once bound.
METRICS_LISTENING = re.compile(r"\bmetrics \S+ listening on \S+:(\d+)\r?\n")


async def metricsPortOf(log: Path, timeout: float = 20.0) -> int:
    """The port the metrics listener bound, from its log line (a bounded poll)."""
    assert await until(lambda: METRICS_LISTENING.search(log.read_text(errors="replace")), timeout), log.read_text()
    return int(METRICS_LISTENING.search(log.read_text(errors="replace")).group(1))


def listenPort(listen: str) -> int:
    """The port of a C{tcp:PORT[:...]} endpoint string."""
    match = re.match(r"^(?:haproxy:)?tcp6?:(?:port=)?(\d+)(?::|$)", listen)
    assert match, listen
    return int(match.group(1))


# The image


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def imageCommand() -> list[str]:
    (command,) = instruction("CMD")
    return json.loads(command)


def healthCheck() -> list[str]:
    (check,) = instruction("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert options.startswith("--interval=")
    return json.loads(command)


def configPath() -> str:
    command = imageCommand()
    return command[command.index("--config") + 1]


def test_the_image():
    assert instruction("FROM") == ["python:3.11-slim"]
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert any("pip install /src" in run for run in instruction("RUN"))
    assert imageCommand() == ["twistd", "--nodaemon", "--pidfile=", "wsproxy", "--config", "/etc/wsproxy/wsproxy.toml"]
    assert "http://127.0.0.1:9145/healthz" in " ".join(healthCheck())
    assert healthCheck()[0] == "python"


@pytest_twisted.ensureDeferred
async def test_the_image_command_serves_the_configmap_and_stops_on_sigterm(cleanup, tmp_path):
    upstream, factory = listenScripted(ok(b"deployed"))
    cleanup.port(upstream)
    text = manifests()["ConfigMap"]["data"]["wsproxy.toml"]
    text = replaceOnce(text, r'^listen = "tcp:8080"', f'listen = "tcp:0:interface={LOOPBACK}"')
    text = replaceOnce(text, r"^servers = \[.*\]", f'servers = ["{LOOPBACK}:{upstream.getHost().port}"]')
    config = tmp_path / "wsproxy.toml"
    config.write_text(withMetricsOn(text))
    command = [str(config) if word == configPath() else word for word in imageCommand()]
    assert command.count(str(config)) == 1
    log = tmp_path / "twistd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=RUNNING, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
    try:
        (port,) = await listeningPortsOf(log, process)
        response = await exchange(port, GET, timeout=10)
        assert response is not None and response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"deployed")
        assert any(b"x-forwarded-for: 127.0.0.1" in r.lower() for r in factory.requests)
        metricsPort = await metricsPortOf(log)
        check = [word.replace(":9145/", f":{metricsPort}/") for word in healthCheck()]
        result = await deferToThread(subprocess.run, check, env=RUNNING, capture_output=True, timeout=20)
        assert result.returncode == 0, result.stderr
        process.send_signal(signal.SIGTERM)
        assert await until(lambda: process.poll() is not None, timeout=30), log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # twistd re-raises the SIGTERM it handled once the reactor has stopped cleanly.
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Main loop terminated." in log.read_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=5).close()


def test_twistd_wsproxy_version():
    result = subprocess.run(
        [str(Path(BIN) / "twistd"), "wsproxy", "--version"], env=RUNNING, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wsproxy {wsproxy.__version__} (Twisted ")
    setup = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=DEPLOY.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert setup.stdout.strip().splitlines()[-1] == wsproxy.__version__


# Kubernetes


def manifests() -> dict[str, Any]:
    """The objects of deploy/kubernetes/, by kind, as kustomization.yaml lists them."""
    directory = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in directory.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    objects: dict[str, Any] = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((directory / name).read_text()):
            assert document["kind"] not in objects
            objects[document["kind"]] = document
    return objects


def test_the_manifests_agree_with_the_config_they_mount():
    objects = manifests()
    assert sorted(objects) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    configMap, deployment = objects["ConfigMap"], objects["Deployment"]
    text = configMap["data"]["wsproxy.toml"]
    document = tomllib.loads(text)
    checked = parseConfig(document)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    # The probes reach the metrics listener on the pod's address.
    metricsListen = document["metrics"]["listen"]
    assert "interface=127.0.0.1" not in metricsListen
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/readyz", "/healthz")
    assert ports[readiness["port"]] == ports[liveness["port"]] == listenPort(metricsListen)
    assert f":{listenPort(metricsListen)}/healthz" in " ".join(healthCheck())
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(listenPort(metricsListen))

    # Every listener is a container port, and the Service sends to one of them.
    listens = {listenPort(block.listen) for block in checked.servers}
    assert listens <= set(ports.values())
    assert set(ports.values()) == listens | {listenPort(metricsListen)}
    service = objects["Service"]
    assert all(ports[port["targetPort"]] in listens for port in service["spec"]["ports"])

    # The pod stops only once the balancer has noticed and the drain is over.
    preStop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert preStop[0] == "sleep"
    closing = document.get("websocket_close_timeout", WEBSOCKET_CLOSE_TIMEOUT)
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(preStop[1]) + checked.shutdown_timeout + closing

    # The ConfigMap is mounted where the image's command reads it.
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configMap["metadata"]["name"]
    (item,) = volume["configMap"]["items"]
    assert item["key"] in configMap["data"]
    assert f"{mount['mountPath']}/{item['path']}" == configPath()
    assert "args" not in container and "command" not in container

    # The image's user, the selectors.
    useradd = next(run for run in instruction("RUN") if "useradd" in run)
    assert f"--uid {pod['spec']['securityContext']['runAsUser']} " in useradd
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


# systemd


def readUnit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: sections of keys, each with every value it was given, continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip()[0] in "#;"):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.startswith("["):
            assert pending.endswith("]"), pending
            section = sections.setdefault(pending[1:-1], {})
        else:
            assert section is not None and "=" in pending, pending
            key, _, value = pending.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
        pending = ""
    assert not pending
    return sections


def systemdConfig() -> str:
    return (DEPLOY / "systemd" / "wsproxy.toml").read_text()


def test_the_systemd_units_agree_with_the_config():
    service = readUnit(DEPLOY / "systemd" / "wsproxy.service")
    sockets = readUnit(DEPLOY / "systemd" / "wsproxy.socket")
    assert "wsproxy.socket" in service["Unit"]["Requires"][0].split()
    assert "wsproxy.socket" in service["Unit"]["After"][0].split()
    (start,) = service["Service"]["ExecStart"]
    command = shlex.split(start)
    assert Path(command[0]).name == "twistd"
    assert command[1:] == imageCommand()[1:]
    assert service["Service"]["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Service"]["KillSignal"] == ["SIGTERM"]
    assert service["Service"]["User"] == ["wsproxy"]
    document = tomllib.loads(systemdConfig())
    closing = document.get("websocket_close_timeout", WEBSOCKET_CLOSE_TIMEOUT)
    assert int(service["Service"]["TimeoutStopSec"][0]) > document["shutdown_timeout"] + closing

    # One socket per systemd: listener, in order; domain=INET needs an IPv4 address.
    streams = sockets["Socket"]["ListenStream"]
    listens = [server["listen"] for server in document["server"]]
    assert listens == [f"systemd:domain=INET:index={index}" for index in range(len(streams))]
    assert all(stream.startswith("0.0.0.0:") for stream in streams)
    assert [int(stream.rpartition(":")[2]) for stream in streams] == [80, 443]
    assert sockets["Unit"]["PartOf"] == ["wsproxy.service"]


@pytest_twisted.ensureDeferred
async def test_the_systemd_service_serves_on_the_sockets_it_is_handed(cleanup, tmp_path):
    """
    What systemd does, done here: bind the socket unit's sockets (on
    loopback, free ports), start ExecStart with them as descriptors 3 and 4
    and C{LISTEN_FDS}/C{LISTEN_PID} set, then stop it with SIGTERM.
    """
    upstream, factory = listenScripted(ok(b"activated"))
    cleanup.port(upstream)
    ca = trustme.CA()
    leaf = ca.issue_cert("example.com")
    certificate, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    text = systemdConfig()
    text = replaceOnce(text, r"^servers = \[.*\]", f'servers = ["{LOOPBACK}:{upstream.getHost().port}"]')
    text = replaceOnce(text, r'^ssl_certificate = "[^"]*"', f'ssl_certificate = "{certificate}"')
    text = replaceOnce(text, r'^ssl_certificate_key = "[^"]*"', f'ssl_certificate_key = "{key}"')
    config = tmp_path / "wsproxy.toml"
    config.write_text(withMetricsOn(text))

    bound = []
    for _ in readUnit(DEPLOY / "systemd" / "wsproxy.socket")["Socket"]["ListenStream"]:
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.bind((LOOPBACK, 0))
        listening.listen(64)
        bound.append(listening)
    ports = [listening.getsockname()[1] for listening in bound]
    # Above 3 and 4, so that handing them over as 3 and 4 overwrites neither.
    handed = [fcntl.fcntl(listening.fileno(), fcntl.F_DUPFD, 10) for listening in bound]
    (start,) = readUnit(DEPLOY / "systemd" / "wsproxy.service")["Service"]["ExecStart"]
    command = [str(Path(BIN) / "twistd"), *shlex.split(start)[1:]]
    command[command.index(configPath())] = str(config)
    activate = [sys.executable, "-c", ACTIVATE, ",".join(map(str, handed)), *command]
    log = tmp_path / "twistd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            activate,
            env=RUNNING,
            cwd=tmp_path,
            pass_fds=handed,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    for fd in handed:
        os.close(fd)
    for listening in bound:
        listening.close()
    try:
        assert await listeningPortsOf(log, process, count=2) == ports
        redirect = await exchange(
            ports[0], b"GET /x?y=1 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n", timeout=10
        )
        assert redirect is not None and redirect.startswith(b"HTTP/1.1 308 ")
        assert b"Location: https://example.com/x?y=1\r\n" in redirect
        options = optionsForClientTLS("example.com", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, ports[1]))
        client = await connectProtocol(endpoint, RawClient())
        client.transport.write(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        response = await client.waitClosed(timeout=10)
        assert response is not None and response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"activated")
        process.send_signal(signal.SIGTERM)
        assert await until(lambda: process.poll() is not None, timeout=30), log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()
