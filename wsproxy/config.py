# -*- test-case-name: tests.test_config -*-
"""
Configuration: a TOML file turned into frozen, validated values.

The keys follow nginx's directive names where nginx has one, so that an
operator who knows the classic WebSocket recipe can read a wsproxy file
without a dictionary.  Every error names the file, the key and what is
wrong, in one line, because it is printed by C{twistd} before anything is
bound.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Config",
    "ConfigError",
    "HealthCheck",
    "ServerBlock",
    "Upstream",
    "UpstreamAddress",
    "loadConfig",
    "parseConfig",
]


class ConfigError(Exception):
    """
    A configuration file could not be used.

    C{str(error)} is one line: C{"FILE: KEY: what is wrong"}.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


@dataclass(frozen=True)
class UpstreamAddress:
    """One server of an upstream pool: where to connect and how."""

    host: str
    port: int
    tls: bool = False
    #: Re-resolve C{host} while running, one server per address (see
    #: L{wsproxy.discovery}).
    resolve: bool = False

    @property
    def isLiteralIP(self) -> bool:
        """
        Whether C{host} is an IP address, so that no name lookup is needed.
        """
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https://' if self.tls else ''}{host}:{self.port}"


@dataclass(frozen=True)
class HealthCheck:
    """
    An upstream's C{health_check} table: an active check of each server,
    an HTTP GET (C{uri}) or a WebSocket upgrade, ping and close
    (C{websocket}); see L{wsproxy.health}.

    @ivar kind: C{"http"} or C{"websocket"}.
    @ivar status: the statuses an HTTP check accepts; empty for any 2xx or
        3xx.
    """

    kind: str = "http"
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    fails: int = 1
    passes: int = 1
    status: tuple[int, ...] = ()


@dataclass(frozen=True)
class Upstream:
    """
    An C{[upstream.NAME]} table: nginx's C{upstream NAME { server ...; }}.
    """

    name: str
    servers: tuple[UpstreamAddress, ...]
    max_fails: int = 1
    fail_timeout: float = 10.0
    keepalive: int = 32
    keepalive_timeout: float = 60.0
    proxy_ssl_trusted_certificate: str | None = None
    proxy_ssl_name: str | None = None
    health_check: HealthCheck | None = None
    #: The DNS server for C{resolve} servers, C{(ip, port)}; C{None} for
    #: the system's.
    resolver: tuple[str, int] | None = None
    resolve_interval: float = 30.0


@dataclass(frozen=True)
class ServerBlock:
    """
    A C{[[server]]} table: one listener and what it does with requests.
    """

    listen: str
    proxy_pass: str | None = None
    upstream: str | None = None
    proxy_connect_timeout: float = 5.0
    proxy_read_timeout: float = 60.0
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    send_timeout: float = 60.0
    proxy_send_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    websocket_idle_timeout: float = 0.0
    max_request_line: int = 8192
    max_header_size: int = 32768
    max_headers: int = 100
    client_max_body_size: int = 0
    upgrade_protocols: tuple[str, ...] = ("websocket",)
    allowed_origins: tuple[str, ...] = ()
    set_real_ip_from: tuple[str, ...] = ()
    add_header: tuple[tuple[str, str], ...] = ()
    access_log: bool = True
    server_name: str = ""
    proxy_next_upstream_non_idempotent: bool = False
    underscores_in_headers: bool = False
    # The plain-HTTP redirect listener (nginx: return 308 https://...).
    return_: str | None = None
    acme_challenge_root: str | None = None
    # TLS (nginx: listen 443 ssl; ssl_...).
    ssl_certificate: str | None = None
    ssl_certificate_key: str | None = None
    ssl_certificates: tuple[tuple[str, str, str], ...] = ()
    ssl_protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ssl_ciphers: str | None = None
    ssl_prefer_server_ciphers: bool = True
    ssl_session_cache: int = 10 * 1024 * 1024
    ssl_session_timeout: float = 600.0
    ssl_handshake_timeout: float = 60.0
    max_connections: int = 0
    max_connections_per_ip: int = 0

    @property
    def isTLS(self) -> bool:
        """Whether this listener terminates TLS."""
        return self.ssl_certificate is not None or bool(self.ssl_certificates)

    @property
    def isRedirect(self) -> bool:
        """Whether this listener only answers with a redirect."""
        return self.return_ is not None


@dataclass(frozen=True)
class Config:
    """A whole configuration file, validated."""

    source: str
    upstreams: Mapping[str, Upstream]
    servers: tuple[ServerBlock, ...]
    shutdown_timeout: float = 30.0
    workers: int = 1


_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_TIME_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_REDIRECT_CODES = ("301", "302", "303", "307", "308")
#: nginx variables a C{return} URL may use (C{$name} or C{${name}}).
_RETURN_VARIABLES = ("host", "request_uri", "scheme", "server_port", "server_name")
_RETURN_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
_CHECK_PATH = re.compile(r"^/[\x21-\x7e]*$")


class _Reader:
    """
    Reads one TOML table, remembering which keys were used so that the
    unknown ones can be reported.
    """

    def __init__(self, source: str, prefix: str, table: Any) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(source, prefix, "must be a table")
        self.table = table
        self.used: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, f"{self.prefix}.{key}", problem)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(key, f"expected {_kindName(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.fail(key, f"expected {_kindName(kinds)}, got {type(value).__name__}")
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.get(key, (int, float, str), default)
        if isinstance(value, str):
            match = _TIME.match(value.strip())
            if match is None:
                raise self.fail(key, f"not a duration: {value!r} (use 30, 30s, 10m, 500ms)")
            value = float(match.group(1)) * _TIME_UNITS[match.group(2)]
        if value < 0:
            raise self.fail(key, "must not be negative")
        return float(value)

    def size(self, key: str, default: int) -> int:
        value = self.get(key, (int, str), default)
        if isinstance(value, str):
            match = _SIZE.match(value.strip())
            if match is None:
                raise self.fail(key, f"not a size: {value!r} (use 8192, 8k, 10m, 1g)")
            value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if value < 0:
            raise self.fail(key, "must not be negative")
        return value

    def count(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.get(key, int, default)
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, (list, str), None)
        if value is None:
            return default
        if isinstance(value, str):
            value = [value]
        for item in value:
            if not isinstance(item, str):
                raise self.fail(key, "expected a list of strings")
        return tuple(value)

    def finish(self) -> None:
        for key in self.table:
            if key not in self.used:
                raise self.fail(key, "unknown key")


def _kindName(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "a table"}
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def parseUpstreamAddress(text: str) -> UpstreamAddress:
    """
    Parse C{"host:port"}, C{"[v6]:port"}, C{"http://host:port"} or
    C{"https://host:port"}.

    @raise ValueError: if C{text} is none of those.
    """
    tls = False
    defaultPort: int | None = None
    for scheme, isTLS, schemePort in (("https://", True, 443), ("http://", False, 80)):
        if text.startswith(scheme):
            text, tls, defaultPort = text[len(scheme) :], isTLS, schemePort
            break
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad IPv6 address {text!r}")
        portText = rest[1:] if rest else ""
    else:
        host, _, portText = text.rpartition(":") if ":" in text else (text, "", "")
    if not host or any(c in host for c in "/@ ?#"):
        raise ValueError(f"bad host in {text!r}")
    if not portText:
        if defaultPort is None:
            raise ValueError(f"missing port in {text!r} (use host:port)")
        port = defaultPort
    elif portText.isdigit() and 0 < int(portText) < 65536:
        port = int(portText)
    else:
        raise ValueError(f"bad port in {text!r}")
    return UpstreamAddress(host.lower(), port, tls)


def _readUpstream(source: str, name: str, table: Any) -> Upstream:
    reader = _Reader(source, f"upstream.{name}", table)
    servers = reader.strings("servers")
    if not servers:
        raise reader.fail("servers", "needs at least one server")
    addresses = []
    for text in servers:
        where, *parameters = text.split() or [""]
        try:
            address = parseUpstreamAddress(where)
        except ValueError as e:
            raise reader.fail("servers", str(e)) from None
        if reader.table.get("tls") is True:
            address = UpstreamAddress(address.host, address.port, True)
        for parameter in parameters:
            if parameter != "resolve":
                raise reader.fail("servers", f"unknown server parameter {parameter!r} in {text!r}")
            if address.isLiteralIP:
                raise reader.fail("servers", f"resolve needs a host name, not an address: {text!r}")
            address = UpstreamAddress(address.host, address.port, address.tls, resolve=True)
        addresses.append(address)
    reader.get("tls", bool)
    trusted = reader.get("proxy_ssl_trusted_certificate", str)
    if trusted is not None and not Path(trusted).is_file():
        raise reader.fail("proxy_ssl_trusted_certificate", f"cannot read {trusted!r}")
    upstream = Upstream(
        name=name,
        servers=tuple(addresses),
        max_fails=reader.count("max_fails", 1),
        fail_timeout=reader.seconds("fail_timeout", 10.0),
        keepalive=reader.count("keepalive", 32),
        keepalive_timeout=reader.seconds("keepalive_timeout", 60.0),
        proxy_ssl_trusted_certificate=trusted,
        proxy_ssl_name=reader.get("proxy_ssl_name", str),
        health_check=_readHealthCheck(source, name, reader.get("health_check", dict)),
        resolver=_readResolver(reader),
        resolve_interval=reader.seconds("resolve_interval", 30.0),
    )
    if upstream.resolve_interval <= 0:
        raise reader.fail("resolve_interval", "must be more than 0")
    reader.finish()
    return upstream


def _readHealthCheck(source: str, name: str, table: dict[str, Any] | None) -> HealthCheck | None:
    """
    The C{health_check} table: C{uri} (an HTTP GET, the default with
    C{"/"}) or C{websocket} (an upgrade, a ping, a close), C{interval},
    C{timeout} (at most the interval), C{fails}, C{passes} and, for HTTP,
    C{status}.
    """
    if table is None:
        return None
    reader = _Reader(source, f"upstream.{name}.health_check", table)
    uri = reader.get("uri", str)
    websocket = reader.get("websocket", str)
    if uri is not None and websocket is not None:
        raise reader.fail("websocket", "give either uri (an HTTP check) or websocket, not both")
    kind, path = ("websocket", websocket) if websocket is not None else ("http", uri or "/")
    key = "websocket" if websocket is not None else "uri"
    if not _CHECK_PATH.match(path):
        raise reader.fail(key, f"expected a path such as /healthz (ASCII, no spaces), got {path!r}")
    interval = reader.seconds("interval", 5.0)
    if interval <= 0:
        raise reader.fail("interval", "must be more than 0")
    timeout = reader.seconds("timeout", min(2.0, interval))
    if not 0 < timeout <= interval:
        raise reader.fail("timeout", "must be more than 0 and at most the interval")
    status = reader.get("status", list, [])
    if kind == "websocket" and status:
        raise reader.fail("status", "a websocket check expects 101; status is for uri checks")
    for code in status:
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise reader.fail("status", f"expected a list of HTTP statuses (100-599), got {code!r}")
    check = HealthCheck(
        kind=kind,
        path=path,
        interval=interval,
        timeout=timeout,
        fails=reader.count("fails", 1, minimum=1),
        passes=reader.count("passes", 1, minimum=1),
        status=tuple(status),
    )
    reader.finish()
    return check


def _readResolver(reader: _Reader) -> tuple[str, int] | None:
    """
    C{resolver}: C{"IP"}, C{"IP:PORT"} or C{"[IPV6]:PORT"}, port 53 by
    default.  An address, not a name: the resolver cannot resolve itself.
    """
    text = reader.get("resolver", str)
    if text is None:
        return None
    portText = "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            portText = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, portText = text.partition(":")
    else:
        host = text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise reader.fail("resolver", f'expected "IP" or "IP:PORT" of a DNS server, got {text!r}') from None
    if not portText.isdigit() or not 0 < int(portText) < 65536:
        raise reader.fail("resolver", f"bad port in {text!r}")
    return str(ip), int(portText)


def _readServer(source: str, index: int, table: Any, upstreams: Mapping[str, Upstream]) -> ServerBlock:
    reader = _Reader(source, f"server[{index}]", table)
    listen = reader.get("listen", str)
    if not listen:
        raise reader.fail("listen", "is required (a Twisted endpoint such as tcp:8080)")
    values: dict[str, Any] = {"listen": listen}

    proxyPass = reader.get("proxy_pass", str)
    returnValue = reader.get("return", str)
    if proxyPass is None and returnValue is None:
        raise reader.fail("proxy_pass", 'is required (or give return = "308 https://...")')
    if proxyPass is not None and returnValue is not None:
        raise reader.fail("return", "cannot be combined with proxy_pass")
    if proxyPass is not None:
        name = proxyPass.removeprefix("http://")
        if name == proxyPass:
            raise reader.fail("proxy_pass", f'expected "http://UPSTREAM", got {proxyPass!r}')
        if name not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none defined"
            raise reader.fail("proxy_pass", f"no [upstream.{name}] (known: {known})")
        values["proxy_pass"] = proxyPass
        values["upstream"] = name
    if returnValue is not None:
        code, _, target = returnValue.partition(" ")
        if code not in _REDIRECT_CODES or not target.strip():
            raise reader.fail("return", f'expected "CODE URL" with CODE one of {", ".join(_REDIRECT_CODES)}')
        if not re.fullmatch(r"[\x21-\x7e]+", target.strip()):
            raise reader.fail("return", "the URL must be ASCII without spaces or control characters (punycode an IDN)")
        unknown = sorted(set(_RETURN_VARIABLE.findall(target)) - set(_RETURN_VARIABLES))
        if unknown:
            known = ", ".join("$" + name for name in _RETURN_VARIABLES)
            raise reader.fail("return", f"unknown variable ${unknown[0]} (use {known})")
        values["return_"] = f"{code} {target.strip()}"
    root = reader.get("acme_challenge_root", str)
    if root is not None:
        if returnValue is None:
            raise reader.fail("acme_challenge_root", "only a redirect listener (return = ...) serves challenge files")
        if not Path(root).is_dir():
            raise reader.fail("acme_challenge_root", f"not a directory: {root!r}")
        values["acme_challenge_root"] = root

    for key, default in (
        ("proxy_connect_timeout", 5.0),
        ("proxy_read_timeout", 60.0),
        ("client_header_timeout", 60.0),
        ("client_body_timeout", 60.0),
        ("send_timeout", 60.0),
        ("proxy_send_timeout", 60.0),
        ("keepalive_timeout", 75.0),
        ("websocket_idle_timeout", 0.0),
        ("ssl_session_timeout", 600.0),
        ("ssl_handshake_timeout", 60.0),
    ):
        values[key] = reader.seconds(key, default)
    for key, default in (
        ("max_request_line", 8192),
        ("max_header_size", 32768),
        ("client_max_body_size", 0),
    ):
        values[key] = reader.size(key, default)
    values["max_headers"] = reader.count("max_headers", 100, minimum=1)
    values["max_connections"] = reader.count("max_connections", 0)
    values["max_connections_per_ip"] = reader.count("max_connections_per_ip", 0)
    values["access_log"] = reader.get("access_log", bool, True)
    serverName = reader.get("server_name", str, "")
    if not serverName.isascii():
        raise reader.fail("server_name", f"must be ASCII (write an internationalised name in punycode): {serverName!r}")
    values["server_name"] = serverName
    values["proxy_next_upstream_non_idempotent"] = reader.get("proxy_next_upstream_non_idempotent", bool, False)
    values["underscores_in_headers"] = reader.get("underscores_in_headers", bool, False)
    values["upgrade_protocols"] = tuple(p.lower() for p in reader.strings("upgrade_protocols", ("websocket",)))
    values["allowed_origins"] = reader.strings("allowed_origins")
    trusted = reader.strings("set_real_ip_from")
    for network in trusted:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise reader.fail("set_real_ip_from", f"not an address or network: {network!r}") from None
    values["set_real_ip_from"] = trusted

    headers = reader.get("add_header", dict, {})
    for name, value in headers.items():
        if not isinstance(value, str) or not _HEADER_NAME.match(name) or not _HEADER_VALUE.match(value):
            raise reader.fail(f"add_header.{name}", "expected a header name and a printable string value")
    values["add_header"] = tuple(headers.items())

    _readTLS(reader, values)
    reader.finish()
    return ServerBlock(**values)


def _readTLS(reader: _Reader, values: dict[str, Any]) -> None:
    """
    Read the C{ssl_*} keys.  The files are checked for readability here;
    that the key matches the certificate is checked by L{wsproxy.tls}.
    """
    certificate = reader.get("ssl_certificate", str)
    key = reader.get("ssl_certificate_key", str)
    if (certificate is None) != (key is None):
        missing = "ssl_certificate_key" if key is None else "ssl_certificate"
        raise reader.fail(missing, "is required when the other of ssl_certificate/ssl_certificate_key is given")
    for name, path in (("ssl_certificate", certificate), ("ssl_certificate_key", key)):
        if path is not None and not _readable(path):
            raise reader.fail(name, f"cannot read {path!r}")
    values["ssl_certificate"] = certificate
    values["ssl_certificate_key"] = key

    extra = []
    for position, entry in enumerate(reader.get("ssl_certificates", list, [])):
        where = f"ssl_certificates[{position}]"
        if not isinstance(entry, dict) or set(entry) - {"server_name", "certificate", "key"}:
            raise reader.fail(where, "expected a table with server_name, certificate and key")
        for part in ("server_name", "certificate", "key"):
            if not isinstance(entry.get(part), str):
                raise reader.fail(f"{where}.{part}", "is required and must be a string")
        for part in ("certificate", "key"):
            if not _readable(entry[part]):
                raise reader.fail(f"{where}.{part}", f"cannot read {entry[part]!r}")
        extra.append((entry["server_name"].lower(), entry["certificate"], entry["key"]))
    if extra and certificate is None:
        raise reader.fail("ssl_certificate", "a default certificate is required with ssl_certificates")
    values["ssl_certificates"] = tuple(extra)

    protocols = reader.strings("ssl_protocols", ("TLSv1.2", "TLSv1.3"))
    for protocol in protocols:
        if protocol not in _TLS_VERSIONS:
            raise reader.fail("ssl_protocols", f"unknown protocol {protocol!r} (use {', '.join(_TLS_VERSIONS)})")
    if not protocols:
        raise reader.fail("ssl_protocols", "needs at least one protocol")
    values["ssl_protocols"] = protocols
    ciphers = reader.get("ssl_ciphers", str)
    if ciphers is not None and (not ciphers.strip() or not ciphers.isascii()):
        raise reader.fail("ssl_ciphers", 'expected an OpenSSL cipher string such as "ECDHE+AESGCM"')
    values["ssl_ciphers"] = ciphers
    values["ssl_prefer_server_ciphers"] = reader.get("ssl_prefer_server_ciphers", bool, True)
    values["ssl_session_cache"] = _sessionCache(reader)
    if certificate is None:
        for name in ("ssl_protocols", "ssl_ciphers", "ssl_certificates", "ssl_session_cache"):
            if name in reader.table:
                raise reader.fail(name, "needs ssl_certificate and ssl_certificate_key")


def _sessionCache(reader: _Reader) -> int:
    """
    C{ssl_session_cache} in nginx's syntax: C{"off"}/C{"none"} (0), a size
    (C{"10m"}), C{"builtin[:SESSIONS]"} or C{"shared:NAME:SIZE"}; a cache
    is on when the result is not 0.  OpenSSL's own cache is used in every
    case (pyOpenSSL cannot size it; see the README).
    """
    value = reader.get("ssl_session_cache", (int, str), 10 * 1024 * 1024)
    if isinstance(value, int):
        if value < 0:
            raise reader.fail("ssl_session_cache", "must not be negative")
        return value
    text = value.strip().lower()
    if text in ("off", "none"):
        return 0
    if text == "builtin":
        return 10 * 1024 * 1024
    kind, _, rest = text.partition(":")
    if kind == "builtin" and rest.isdigit():
        return int(rest)
    if kind == "shared":
        name, _, size = rest.partition(":")
        text = size if name else ""
    match = _SIZE.match(text)
    if match is None:
        raise reader.fail("ssl_session_cache", f'not a cache size: {value!r} (use "10m", "shared:SSL:10m" or "off")')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def parseConfig(document: Mapping[str, Any], source: str = "<config>") -> Config:
    """
    Validate an already-parsed TOML document.

    @raise ConfigError: naming the first problem found.
    """
    reader = _Reader(source, "", dict(document))
    reader.prefix = "(top level)"
    upstreamTables = reader.get("upstream", dict, {})
    upstreams = {name: _readUpstream(source, name, table) for name, table in upstreamTables.items()}
    serverTables = reader.get("server", list, [])
    if not serverTables:
        raise ConfigError(source, "server", "at least one [[server]] block is required")
    servers = tuple(_readServer(source, i, t, upstreams) for i, t in enumerate(serverTables))
    config = Config(
        source=source,
        upstreams=upstreams,
        servers=servers,
        shutdown_timeout=reader.seconds("shutdown_timeout", 30.0),
        workers=reader.count("workers", 1, minimum=1),
    )
    reader.finish()
    return config


def loadConfig(path: str | Path) -> Config:
    """
    Read and validate the TOML file at C{path}.

    @raise ConfigError: if it cannot be read, is not TOML, or is not valid.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, "(file)", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "(syntax)", str(e)) from None
    return parseConfig(document, source)
