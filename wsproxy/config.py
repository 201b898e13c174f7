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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "AccessLog",
    "Config",
    "ConfigError",
    "HealthCheck",
    "ListenAddress",
    "Location",
    "MapVariable",
    "Metrics",
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
    """
    One server of an upstream pool: where to connect and how, and nginx's
    C{server} parameters.

    @ivar max_fails: this server's own C{max_fails}, or C{None} for the
        upstream's.
    @ivar fail_timeout: likewise for C{fail_timeout}.
    @ivar max_conns: how many requests and tunnels it may have open at
        once; 0 for no limit.
    @ivar resolve: the host is a name to re-resolve while running (DNS
        discovery); here only recorded.
    """

    host: str
    port: int
    tls: bool = False
    weight: int = 1
    max_fails: int | None = None
    fail_timeout: float | None = None
    backup: bool = False
    down: bool = False
    max_conns: int = 0
    resolve: bool = False

    @property
    def endpoint(self) -> tuple[str, int, bool]:
        """Where this server is, without its parameters: what a reload compares."""
        return (self.host, self.port, self.tls)

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
    balance: str = "round_robin"
    hash: str | None = None
    sticky_cookie: str | None = None
    health_check: HealthCheck | None = None
    #: The DNS server for C{resolve} servers, C{(ip, port)}; C{None} for
    #: the system's.
    resolver: tuple[str, int] | None = None
    resolve_interval: float = 30.0
    #: Made for a C{proxy_pass} URL, not written as an C{[upstream.NAME]}.
    implicit: bool = False


@dataclass(frozen=True)
class AccessLog:
    """
    Where a server's or location's access log goes and in what format
    (C{access_log = "/path"} or C{{ path = "...", format = "json" }}); see
    L{wsproxy.accesslog}.  C{access_log = true} is not one of these: it
    keeps the fixed line in C{twistd}'s log.

    @ivar path: the file, or C{None} for C{twistd}'s log.
    @ivar format: the name of the format: a preset (L{LOG_FORMAT_PRESETS})
        or a C{[log_format]} entry.
    @ivar text: the C{[log_format]} entry's text; C{None} for a preset.
    @ivar escape: how a C{[log_format]} entry escapes values: C{"default"}
        (nginx's C{\\xHH}), C{"json"} or C{"none"}.
    """

    path: str | None = None
    format: str = "combined"
    text: str | None = None
    escape: str = "default"


#: The formats every configuration has: nginx's C{combined}, and C{json}.
LOG_FORMAT_PRESETS = ("combined", "json")
_LOG_ESCAPES = ("default", "json", "none")


#: The values of C{balance}.
BALANCE_POLICIES = ("round_robin", "least_conn", "random_two", "ip_hash", "hash")


@dataclass(frozen=True)
class Location:
    """
    A C{[[server.location]]} table: nginx's C{location MATCH { ... }}.

    @ivar match: the location's argument as written (C{"/ws/"},
        C{"= /old"}, C{"~* \\.png$"}, C{"@app"}).
    @ivar block: the effective settings of the requests it handles: its
        server's, with the location's own keys over them.
    """

    match: str
    block: ServerBlock


@dataclass(frozen=True)
class ServerBlock:
    """
    A C{[[server]]} table: a virtual host on one or more addresses, and
    what it does with requests.  A L{Location}'s effective settings are a
    C{ServerBlock} too, so that everything on the request path reads one
    kind of object.
    """

    listen: str
    proxy_pass: str | None = None
    upstream: str | None = None
    #: The path part of a C{proxy_pass} URL (nginx replaces the matched part of the URI with it).
    proxy_uri: str | None = None
    listens: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ()
    default_server: bool = False
    locations: tuple[Location, ...] = ()
    root: str | None = None
    alias: str | None = None
    index: tuple[str, ...] = ("index.html",)
    try_files: tuple[str, ...] = ()
    error_page: tuple[tuple[int, str], ...] = ()
    internal: bool = False
    proxy_set_header: tuple[tuple[str, str], ...] = ()
    proxy_hide_header: tuple[str, ...] = ()
    #: C{None}: nginx's C{proxy_redirect default}; C{()}: off; else (from, to) prefixes.
    proxy_redirect: tuple[tuple[str, str], ...] | None = None
    disable_symlinks: bool = True
    #: Follow WebSocket frame boundaries in tunnels (what a drain's Close 1001 needs).
    websocket_frame_tracking: bool = True
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
    access_log: bool | AccessLog = True
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
    #: Connections start with a PROXY protocol header (see L{wsproxy.proxyprotocol}).
    proxy_protocol: bool = False

    @property
    def isTLS(self) -> bool:
        """Whether this listener terminates TLS."""
        return self.ssl_certificate is not None or bool(self.ssl_certificates)

    @property
    def isRedirect(self) -> bool:
        """Whether this server answers every request with a redirect (C{return} on the server)."""
        return self.return_ is not None and not self.locations


class ListenAddress(NamedTuple):
    """
    A listening address: its C{listen} string, and for a port 0 the block
    it belongs to (each such block gets a free port of its own).
    """

    listen: str
    owner: int | None = None

    def __str__(self) -> str:
        return self.listen


_EPHEMERAL = re.compile(r"^(?:haproxy:)?(?:tcp6?|ssl):(?:port=)?0(?::|$)")


@dataclass(frozen=True)
class Metrics:
    """
    The C{[metrics]} table: where Prometheus metrics, C{/healthz} and
    C{/readyz} are served (see L{wsproxy.metrics}).

    @ivar listen: a Twisted server endpoint string.
    """

    listen: str


@dataclass(frozen=True)
class MapVariable:
    """
    A C{[map.NAME]} table: nginx's C{map SOURCE $NAME { KEY VALUE; ... }},
    a variable whose value depends on another (see L{wsproxy.variables.VariableMap}).
    """

    name: str
    source: str
    default: str = ""
    values: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Config:
    """A whole configuration file, validated."""

    source: str
    upstreams: Mapping[str, Upstream]
    servers: tuple[ServerBlock, ...]
    shutdown_timeout: float = 30.0
    workers: int = 1
    #: C{None}: no metrics listener (the default).
    metrics: Metrics | None = None
    #: C{[log_format]}: name to (text, escape).
    log_format: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    #: How long a drain waits for a tunnel's WebSocket close handshake.
    websocket_close_timeout: float = 5.0
    #: When a drain sends its 1001 Close frames (seconds after it begins),
    #: if sooner than C{shutdown_timeout}; C{None}: only then.
    websocket_drain_close_after: float | None = None
    #: C{[map.NAME]} tables: nginx's C{map} variables.
    maps: tuple[MapVariable, ...] = ()

    @property
    def addresses(self) -> dict[ListenAddress, tuple[int, ...]]:
        """
        Each listening address, in the order they first appear, with the
        indexes of the server blocks that share it (its virtual hosts).
        Blocks share an address when their C{listen} strings are the same;
        a port 0 (any free port) is never shared.
        """
        shared: dict[ListenAddress, list[int]] = {}
        for index, block in enumerate(self.servers):
            for listen in block.listens or (block.listen,):
                ephemeral = _EPHEMERAL.match(listen) is not None
                shared.setdefault(ListenAddress(listen, index if ephemeral else None), []).append(index)
        return {address: tuple(indexes) for address, indexes in shared.items()}

    def defaultServer(self, address: ListenAddress) -> int:
        """The index of the block that answers a Host no name on C{address} matches."""
        indexes = self.addresses[address]
        return next((i for i in indexes if self.servers[i].default_server), indexes[0])


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

    @ivar mapNames: the C{[map.NAME]} variables values may use.
    """

    mapNames: frozenset[str] = frozenset()

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
    C{"https://host:port"}, followed by nginx's C{server} parameters
    (C{"10.0.0.2:8080 weight=3 max_conns=500"}, see L{UpstreamAddress}).

    @raise ValueError: if C{text} is none of those, or a parameter is
        unknown or has a bad value.
    """
    text, *parameters = text.split()
    values = dict(_serverParameter(parameter) for parameter in parameters)
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
    return UpstreamAddress(host.lower(), port, tls, **values)


_FLAG_PARAMETERS = ("backup", "down", "resolve")
_COUNT_PARAMETERS = {"weight": 1, "max_fails": 0, "max_conns": 0}


def _serverParameter(text: str) -> tuple[str, Any]:
    """One nginx C{server} parameter (C{"weight=3"}, C{"backup"}) as a field of L{UpstreamAddress}."""
    name, equals, value = text.partition("=")
    if name in _FLAG_PARAMETERS and not equals:
        return name, True
    if name in _COUNT_PARAMETERS and equals:
        if not value.isdigit() or int(value) < _COUNT_PARAMETERS[name]:
            raise ValueError(f"bad value in server parameter {text!r}")
        return name, int(value)
    if name == "fail_timeout" and equals:
        match = _TIME.match(value)
        if match is None:
            raise ValueError(f"bad duration in server parameter {text!r}")
        return name, float(match.group(1)) * _TIME_UNITS[match.group(2)]
    raise ValueError(f"unknown server parameter {text!r}")


def _readServerAddresses(reader: _Reader) -> list[UpstreamAddress]:
    """
    C{servers}: strings (C{"host:port weight=3 backup"}) or tables
    (C{{ address = "host:port", weight = 3, backup = true }}).
    """
    servers = reader.get("servers", (list, str), None)
    if isinstance(servers, str):
        servers = [servers]
    if not servers:
        raise reader.fail("servers", "needs at least one server")
    addresses = []
    for item in servers:
        if isinstance(item, dict):
            item = _serverTableText(reader, item)
        elif not isinstance(item, str):
            raise reader.fail("servers", "expected strings or tables")
        try:
            address = parseUpstreamAddress(item)
        except ValueError as e:
            raise reader.fail("servers", str(e)) from None
        if reader.table.get("tls") is True:
            address = replace(address, tls=True)
        if address.resolve and address.isLiteralIP:
            raise reader.fail("servers", f"resolve needs a host name, not an address: {item!r}")
        addresses.append(address)
    return addresses


def _serverTableText(reader: _Reader, table: dict[str, Any]) -> str:
    """The table form of a server, as the string form, so that one parser checks both."""
    address = table.get("address")
    if not isinstance(address, str):
        raise reader.fail("servers", 'a server table needs address = "host:port"')
    words = [address]
    for name, value in table.items():
        if name == "address":
            continue
        if isinstance(value, bool) and name in _FLAG_PARAMETERS:
            words.extend([name] if value else [])
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool) and name not in _FLAG_PARAMETERS:
            words.append(f"{name}={value}")
        else:
            raise reader.fail("servers", f"unknown server parameter {name!r} or bad value {value!r}")
    return " ".join(words)


def _readUpstream(source: str, name: str, table: Any, mapNames: frozenset[str] = frozenset()) -> Upstream:
    reader = _Reader(source, f"upstream.{name}", table)
    reader.mapNames = mapNames
    addresses = _readServerAddresses(reader)
    if all(address.backup for address in addresses):
        raise reader.fail("servers", "needs at least one server that is not a backup")
    reader.get("tls", bool)
    balance = reader.get("balance", str, "round_robin")
    if balance not in BALANCE_POLICIES:
        raise reader.fail("balance", f"unknown policy {balance!r} (use {', '.join(BALANCE_POLICIES)})")
    hashKey = reader.get("hash", str)
    if (balance == "hash") != bool(hashKey):
        raise reader.fail("hash", 'is required with balance = "hash", and only with it')
    if hashKey:
        _checkTemplate(reader, "hash", hashKey)
    sticky = reader.get("sticky_cookie", str)
    if sticky is not None and not _HEADER_NAME.match(sticky):
        raise reader.fail("sticky_cookie", f"not a cookie name: {sticky!r}")
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
        balance=balance,
        hash=hashKey,
        sticky_cookie=sticky,
        health_check=_readHealthCheck(source, name, reader.get("health_check", dict)),
        resolver=_readResolver(reader),
        resolve_interval=reader.seconds("resolve_interval", 30.0),
    )
    if upstream.resolve_interval <= 0:
        raise reader.fail("resolve_interval", "must be more than 0")
    reader.finish()
    return upstream


#: Durations a location may set, with the server's defaults.
_REQUEST_TIMES = (
    ("proxy_connect_timeout", 5.0),
    ("proxy_read_timeout", 60.0),
    ("client_body_timeout", 60.0),
    ("send_timeout", 60.0),
    ("proxy_send_timeout", 60.0),
    ("websocket_idle_timeout", 0.0),
)
#: Durations that belong to the connection: read before the Host is known,
#: so an address takes them from its default server, as nginx does.
_CONNECTION_TIMES = (
    ("client_header_timeout", 60.0),
    ("keepalive_timeout", 75.0),
    ("ssl_session_timeout", 600.0),
    ("ssl_handshake_timeout", 60.0),
)
#: What a C{[[server.location]]} may not set: it belongs to the server or its address.
_SERVER_ONLY = frozenset(
    {"listen", "server_name", "default_server", "location", "acme_challenge_root", "set_real_ip_from"}
    | {key for key, _ in _CONNECTION_TIMES}
    | {"max_request_line", "max_header_size", "max_headers", "max_connections", "max_connections_per_ip"}
    | {"underscores_in_headers", "ssl_certificate", "ssl_certificate_key", "ssl_certificates", "ssl_protocols"}
    | {"ssl_ciphers", "ssl_prefer_server_ciphers", "ssl_session_cache"}
)
#: What answers a request; a location that sets none of these takes its server's.
_HANDLERS = ("proxy_pass", "return", "root", "alias", "try_files")
_LOCATION_RETURN = re.compile(r"^(\d{3})(?: (.*))?$", re.S)
_PLAIN_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


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


def _readServer(
    source: str, index: int, table: Any, upstreams: dict[str, Upstream], mapNames: frozenset[str] = frozenset()
) -> ServerBlock:
    reader = _Reader(source, f"server[{index}]", table)
    reader.mapNames = mapNames
    listens = reader.strings("listen")
    if not listens or not all(listens):
        raise reader.fail("listen", "is required (a Twisted endpoint such as tcp:8080, or a list of them)")
    if len(set(listens)) != len(listens):
        raise reader.fail("listen", "lists the same address twice")
    values: dict[str, Any] = {"listen": listens[0], "listens": listens}
    names = tuple(name.lower() for name in reader.strings("server_name"))
    for name in names:
        if not name.isascii():
            raise reader.fail("server_name", f"must be ASCII (write an internationalised name in punycode): {name!r}")
    values["server_names"] = names
    values["server_name"] = next((n for n in names if not n.startswith(("~", "*")) and "*" not in n), "")
    values["default_server"] = reader.get("default_server", bool, False)

    returnValue = reader.table.get("return")
    locationTables = reader.get("location", list, [])
    if locationTables and isinstance(returnValue, str):
        raise reader.fail("return", "on the server answers every request; put it in a [[server.location]] instead")
    if returnValue is not None and not locationTables:
        reader.used.add("return")
        if not isinstance(returnValue, str):
            raise reader.fail("return", "expected a string")
        values["return_"] = _serverReturn(reader, returnValue)
        if "proxy_pass" in reader.table:
            raise reader.fail("return", "cannot be combined with proxy_pass")
    _readRequestKeys(reader, values, {}, upstreams, location=None)
    if not locationTables and not any(values.get(key) for key in ("proxy_pass", "return_", "root", "try_files")):
        raise reader.fail(
            "proxy_pass", 'is required (or give return = "308 https://...", root, or [[server.location]])'
        )
    root = reader.get("acme_challenge_root", str)
    if root is not None:
        if values.get("return_") is None:
            raise reader.fail("acme_challenge_root", "only a redirect listener (return = ...) serves challenge files")
        if not Path(root).is_dir():
            raise reader.fail("acme_challenge_root", f"not a directory: {root!r}")
        values["acme_challenge_root"] = root

    for key, default in _CONNECTION_TIMES:
        values[key] = reader.seconds(key, default)
    for key, default in (("max_request_line", 8192), ("max_header_size", 32768)):
        values[key] = reader.size(key, default)
    values["max_headers"] = reader.count("max_headers", 100, minimum=1)
    values["max_connections"] = reader.count("max_connections", 0)
    values["max_connections_per_ip"] = reader.count("max_connections_per_ip", 0)
    values["proxy_protocol"] = reader.get("proxy_protocol", bool, False)
    values["underscores_in_headers"] = reader.get("underscores_in_headers", bool, False)
    trusted = reader.strings("set_real_ip_from")
    for network in trusted:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise reader.fail("set_real_ip_from", f"not an address or network: {network!r}") from None
    values["set_real_ip_from"] = trusted
    _readTLS(reader, values)
    server = ServerBlock(**values)

    locations = []
    for position, locationTable in enumerate(locationTables):
        where = f"server[{index}].location[{position}]"
        locationReader = _Reader(source, where, locationTable)
        locationReader.mapNames = mapNames
        locations.append(_readLocation(locationReader, server, values, upstreams))
    reader.finish()
    if locations:
        server = replace(server, locations=tuple(locations))
    return server


def _serverReturn(reader: _Reader, returnValue: str) -> str:
    """A server-level C{return}: a redirect of every request (the plain-HTTP listener)."""
    code, _, target = returnValue.partition(" ")
    if code not in _REDIRECT_CODES or not target.strip():
        raise reader.fail("return", f'expected "CODE URL" with CODE one of {", ".join(_REDIRECT_CODES)}')
    if not re.fullmatch(r"[\x21-\x7e]+", target.strip()):
        raise reader.fail("return", "the URL must be ASCII without spaces or control characters (punycode an IDN)")
    unknown = sorted(set(_RETURN_VARIABLE.findall(target)) - set(_RETURN_VARIABLES))
    if unknown:
        known = ", ".join("$" + name for name in _RETURN_VARIABLES)
        raise reader.fail("return", f"unknown variable ${unknown[0]} (use {known})")
    return f"{code} {target.strip()}"


def _readLocation(
    reader: _Reader, server: ServerBlock, serverValues: dict[str, Any], upstreams: dict[str, Upstream]
) -> Location:
    """
    One C{[[server.location]]}: its match, and its settings over its
    server's (C{add_header}, C{proxy_set_header}, C{proxy_hide_header} and
    C{error_page} are merged with the server's, key by key; see the
    README for how that differs from nginx).
    """
    match = reader.get("match", str)
    if match is None:
        raise reader.fail(
            "match", 'is required: nginx\'s location argument, such as "/ws/", "= /old", "~* \\.png$" or "@app"'
        )
    for key in reader.table:
        if key in _SERVER_ONLY:
            raise reader.fail(key, "belongs to the [[server]], not to a location")
    values = {key: getattr(server, key) for key in server.__dataclass_fields__ if key != "locations"}
    values["return_"] = None
    values["proxy_pass"] = values["upstream"] = values["proxy_uri"] = None
    if not any(key in reader.table for key in _HANDLERS):
        # No handler of its own: the server's proxy_pass or files answer.
        for key in ("proxy_pass", "upstream", "proxy_uri"):
            values[key] = serverValues.get(key)
    else:
        values["root"] = None if "alias" in reader.table else values["root"]
        values["try_files"] = ()
    _readRequestKeys(reader, values, serverValues, upstreams, location=match)
    reader.finish()
    return Location(match, replace(server, **values))


def _readRequestKeys(
    reader: _Reader,
    values: dict[str, Any],
    inherited: dict[str, Any],
    upstreams: dict[str, Upstream],
    location: str | None,
) -> None:
    """
    The keys a server and its locations share: handlers, per-request
    limits and timeouts, headers.  C{values} holds the server's values
    when reading a location (C{location} is its match then).
    """
    for key, default in _REQUEST_TIMES:
        values[key] = reader.seconds(key, inherited.get(key, default))
    values["client_max_body_size"] = reader.size("client_max_body_size", inherited.get("client_max_body_size", 0))
    values["access_log"] = _readAccessLog(reader, inherited.get("access_log", True))
    values["proxy_next_upstream_non_idempotent"] = reader.get(
        "proxy_next_upstream_non_idempotent", bool, inherited.get("proxy_next_upstream_non_idempotent", False)
    )
    values["upgrade_protocols"] = tuple(
        p.lower() for p in reader.strings("upgrade_protocols", inherited.get("upgrade_protocols", ("websocket",)))
    )
    values["allowed_origins"] = reader.strings("allowed_origins", inherited.get("allowed_origins", ()))
    values["disable_symlinks"] = reader.get("disable_symlinks", bool, inherited.get("disable_symlinks", True))
    values["websocket_frame_tracking"] = reader.get(
        "websocket_frame_tracking", bool, inherited.get("websocket_frame_tracking", True)
    )
    values["add_header"] = _merged(inherited.get("add_header", ()), _headerTable(reader, "add_header", variables=False))
    values["proxy_set_header"] = _merged(
        inherited.get("proxy_set_header", ()), _headerTable(reader, "proxy_set_header", variables=True)
    )
    hidden = reader.strings("proxy_hide_header")
    for name in hidden:
        if not _HEADER_NAME.match(name):
            raise reader.fail("proxy_hide_header", f"not a header name: {name!r}")
    values["proxy_hide_header"] = tuple(dict.fromkeys((*inherited.get("proxy_hide_header", ()), *hidden)))
    values["error_page"] = _errorPages(reader, inherited.get("error_page", ()))
    values["proxy_redirect"] = _proxyRedirect(reader, inherited.get("proxy_redirect"))

    values["index"] = reader.strings("index", inherited.get("index", ("index.html",)))
    root = reader.get("root", str)
    alias = reader.get("alias", str) if location is not None else None
    if location is None and "alias" in reader.table:
        raise reader.fail("alias", "belongs in a [[server.location]] (use root on the server)")
    if root is not None and alias is not None:
        raise reader.fail("alias", "cannot be combined with root")
    for key, path in (("root", root), ("alias", alias)):
        if path is not None and not Path(path).is_dir():
            raise reader.fail(key, f"not a directory: {path!r}")
    if root is not None:
        values["root"] = root
    if alias is not None:
        values["alias"] = alias
    tryFiles = reader.strings("try_files")
    if tryFiles:
        if len(tryFiles) < 2:
            raise reader.fail(
                "try_files", 'needs at least two entries: files to try, then a fallback ("=404", "@name" or a URI)'
            )
        for entry in tryFiles:
            if not entry.startswith(("=", "@")):
                _checkTemplate(reader, "try_files", entry)
        values["try_files"] = tryFiles
    if location is not None:
        values["internal"] = reader.get("internal", bool, False)
        returnValue = reader.get("return", str)
        if returnValue is not None:
            values["return_"] = _locationReturn(reader, returnValue)
    proxyPass = reader.get("proxy_pass", str)
    if proxyPass is not None:
        if values.get("return_") is not None:
            raise reader.fail("return", "cannot be combined with proxy_pass")
        _proxyPass(reader, values, proxyPass, upstreams, location)


def _merged(inherited: tuple[tuple[str, str], ...], own: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The inherited (name, value) pairs with C{own} over them; names compared without case."""
    ownNames = {name.lower() for name, _ in own}
    return tuple((name, value) for name, value in inherited if name.lower() not in ownNames) + own


def _headerTable(reader: _Reader, key: str, variables: bool) -> tuple[tuple[str, str], ...]:
    headers = reader.get(key, dict, {})
    for name, value in headers.items():
        if not isinstance(value, str) or not _HEADER_NAME.match(name) or not _HEADER_VALUE.match(value):
            raise reader.fail(f"{key}.{name}", "expected a header name and a printable string value")
        if variables:
            _checkTemplate(reader, f"{key}.{name}", value)
    return tuple(headers.items())


def _checkTemplate(reader: _Reader, key: str, text: str) -> None:
    """Refuse a value that uses a variable wsproxy does not know."""
    from .variables import VariableError, compileTemplate

    try:
        compileTemplate(text, reader.mapNames)
    except VariableError as e:
        raise reader.fail(key, str(e)) from None


def _errorPages(reader: _Reader, inherited: tuple[tuple[int, str], ...]) -> tuple[tuple[int, str], ...]:
    """C{error_page = { "404" = "/404.html", "502 503" = "@down", "500" = "=200 /oops" }}."""
    pages = dict(inherited)
    for codes, target in reader.get("error_page", dict, {}).items():
        if not isinstance(target, str) or not target.strip():
            raise reader.fail(f"error_page.{codes}", "expected a URI, @name or =CODE URI")
        answer = target.split()
        if answer[0].startswith("=") and not re.fullmatch(r"=(\d{3})?", answer[0]):
            raise reader.fail(f"error_page.{codes}", f"bad response code {answer[0]!r} (use =200 or =)")
        if (
            not answer[-1].startswith(("/", "@"))
            or len(answer) > 2
            or (len(answer) == 2 and not answer[0].startswith("="))
        ):
            raise reader.fail(f"error_page.{codes}", 'expected "/uri", "@name" or "=CODE /uri"')
        for code in codes.split():
            if not code.isdigit() or not 300 <= int(code) <= 599:
                raise reader.fail(f"error_page.{codes}", f"not an error status: {code!r}")
            pages[int(code)] = target.strip()
    return tuple(sorted(pages.items()))


def _proxyRedirect(reader: _Reader, inherited: Any) -> tuple[tuple[str, str], ...] | None:
    value = reader.get("proxy_redirect", (str, list), None)
    if value is None:
        return inherited
    if value == "default":
        return None
    if value == "off":
        return ()
    if isinstance(value, str):
        value = [value]
    pairs = []
    for item in value:
        parts = item.split() if isinstance(item, str) else []
        if len(parts) != 2:
            raise reader.fail("proxy_redirect", f'expected "default", "off" or "FROM TO" pairs, got {item!r}')
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def _locationReturn(reader: _Reader, text: str) -> str:
    """
    A location's C{return}: C{"301 URL"} (3xx), C{"404"}, C{"200 text"},
    or C{"444"} (close without an answer), as nginx's C{return}.
    """
    match = _LOCATION_RETURN.match(text.strip())
    if match is None:
        raise reader.fail("return", f'expected "CODE", "CODE URL" or "CODE text", got {text!r}')
    code, rest = int(match.group(1)), match.group(2)
    if code < 200 or code > 599 and code != 444:
        raise reader.fail("return", f"not a response code: {code}")
    if code in (301, 302, 303, 307, 308) and not rest:
        raise reader.fail("return", f"{code} needs a URL")
    if rest is not None:
        if not rest.isascii() or any(ch in rest for ch in "\r\n\0"):
            raise reader.fail("return", "must be ASCII without line breaks")
        _checkTemplate(reader, "return", rest)
    return text.strip()


def _proxyPass(
    reader: _Reader, values: dict[str, Any], text: str, upstreams: dict[str, Upstream], location: str | None
) -> None:
    """
    C{proxy_pass}: C{"http://UPSTREAM"} (an C{[upstream.NAME]}), or a URL
    C{"http://127.0.0.1:8080"}, C{"https://api.example.com/v2/"}, for which
    an upstream of one server is made.  A path after the authority is the
    URI that replaces the part of the request's URI the location matched.
    """
    scheme = next((s for s in ("http://", "https://") if text.startswith(s)), None)
    if scheme is None:
        raise reader.fail(
            "proxy_pass", f'expected "http://UPSTREAM" or a URL such as "http://127.0.0.1:8080", got {text!r}'
        )
    authority, slash, path = text[len(scheme) :].partition("/")
    uri = slash + path if slash else None
    if uri is not None and ("?" in uri or "#" in uri or not re.fullmatch(r"[\x21-\x7e]*", uri)):
        raise reader.fail("proxy_pass", f"the URI part must be a plain path: {uri!r}")
    if uri is not None and location is not None and location.startswith(("~", "@")):
        raise reader.fail("proxy_pass", "cannot have a URI part in a regex or named location (as in nginx)")
    if authority in upstreams and scheme == "http://":
        name = authority
    else:
        try:
            address = parseUpstreamAddress(scheme + authority)
        except ValueError as e:
            raise reader.fail("proxy_pass", str(e)) from None
        explicitPort = authority.rpartition(":")[2].isdigit() and not authority.endswith("]")
        if not (explicitPort or "." in address.host or ":" in address.host or address.host == "localhost"):
            known = ", ".join(sorted(n for n, u in upstreams.items() if not u.implicit)) or "none defined"
            raise reader.fail("proxy_pass", f"no [upstream.{authority}] (known: {known})")
        name = str(address)
        if name not in upstreams:
            upstreams[name] = Upstream(name=name, servers=(address,), implicit=True)
    values["proxy_pass"] = text
    values["upstream"] = name
    values["proxy_uri"] = uri


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
    case (pyOpenSSL cannot size it; see docs/tls.md).
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
    maps = _readMaps(source, reader.get("map", dict, {}))
    mapNames = frozenset(variableMap.name for variableMap in maps)
    upstreams = {name: _readUpstream(source, name, table, mapNames) for name, table in upstreamTables.items()}
    serverTables = reader.get("server", list, [])
    if not serverTables:
        raise ConfigError(source, "server", "at least one [[server]] block is required")
    servers = tuple(_readServer(source, i, t, upstreams, mapNames) for i, t in enumerate(serverTables))
    formats = _readLogFormats(source, reader.get("log_format", dict, {}))
    config = Config(
        source=source,
        upstreams=upstreams,
        servers=_withLogFormats(source, servers, formats),
        log_format=formats,
        shutdown_timeout=reader.seconds("shutdown_timeout", 30.0),
        workers=reader.count("workers", 1, minimum=1),
        metrics=_readMetrics(source, reader.get("metrics", dict, None)),
        websocket_close_timeout=reader.seconds("websocket_close_timeout", 5.0),
        websocket_drain_close_after=_drainCloseAfter(reader),
        maps=maps,
    )
    reader.finish()
    if config.metrics is not None and config.workers > 1:
        raise ConfigError(source, "metrics", "not available with workers > 1 (each worker would need its own listener)")
    _checkVirtualHosts(config)
    return config


def _readMetrics(source: str, table: dict[str, Any] | None) -> Metrics | None:
    """The C{[metrics]} table, or C{None} if there is none."""
    if table is None:
        return None
    reader = _Reader(source, "metrics", table)
    listen = reader.get("listen", str)
    if not listen:
        raise reader.fail("listen", 'required: a server endpoint, such as "tcp:9145:interface=127.0.0.1"')
    reader.finish()
    return Metrics(listen)


def _readAccessLog(reader: _Reader, inherited: bool | AccessLog) -> bool | AccessLog:
    """
    C{access_log}: C{true} or C{false} (C{twistd}'s log, or none), a file
    (C{"/var/log/wsproxy/access.log"}, in the C{combined} format), or a
    table C{{ path = "...", format = "json" }} (without C{path}, the
    formatted line goes to C{twistd}'s log).  The format's name is checked
    once C{[log_format]} is read (L{_withLogFormats}).
    """
    value = reader.get("access_log", (bool, str, dict), inherited)
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        return value
    unknown = sorted(set(value) - {"path", "format"})
    if unknown:
        raise reader.fail(f"access_log.{unknown[0]}", "unknown key (use path and format)")
    path, name = value.get("path"), value.get("format", "combined")
    if path is not None and (not isinstance(path, str) or not path or "\x00" in path):
        raise reader.fail("access_log.path", "expected the path of a file")
    if not isinstance(name, str) or not name:
        raise reader.fail("access_log.format", "expected the name of a format")
    if path is not None and not Path(path).parent.is_dir():
        raise reader.fail("access_log.path", f"no such directory: {str(Path(path).parent)!r}")
    return AccessLog(path=path, format=name)


def _readLogFormats(source: str, table: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """
    C{[log_format]}: C{NAME = "format"} (nginx's C{log_format NAME
    'format'}) or C{NAME = {{ format = "...", escape = "json" }}}; each
    is compiled now, so that a misspelt variable stops the load.
    """
    from .accesslog import compileLogFormat
    from .variables import VariableError

    formats = {}
    for name, value in table.items():
        key = f"log_format.{name}"
        if not _PLAIN_NAME.match(name):
            raise ConfigError(source, key, "a format's name is letters, digits, - and _")
        if name in LOG_FORMAT_PRESETS:
            raise ConfigError(source, key, f"{name!r} is a preset and cannot be defined again")
        if isinstance(value, dict):
            reader = _Reader(source, key, value)
            text, escape = reader.get("format", str), reader.get("escape", str, "default")
            reader.finish()
        else:
            text, escape = value, "default"
        if not isinstance(text, str) or not text:
            raise ConfigError(source, key, 'expected a format such as "$remote_addr $status", or a table with format')
        if escape not in _LOG_ESCAPES:
            raise ConfigError(source, f"{key}.escape", f"expected one of {', '.join(_LOG_ESCAPES)}, got {escape!r}")
        try:
            compileLogFormat(text, escape)
        except VariableError as e:
            raise ConfigError(source, key, str(e)) from None
        formats[name] = (text, escape)
    return formats


def _withLogFormats(
    source: str, servers: tuple[ServerBlock, ...], formats: dict[str, tuple[str, str]]
) -> tuple[ServerBlock, ...]:
    """The blocks with each C{access_log}'s format text filled in from C{[log_format]}."""

    def resolve(where: str, block: ServerBlock) -> ServerBlock:
        spec = block.access_log
        if not isinstance(spec, AccessLog) or spec.format in LOG_FORMAT_PRESETS:
            return block
        if spec.format not in formats:
            known = ", ".join((*LOG_FORMAT_PRESETS, *formats))
            raise ConfigError(source, f"{where}.access_log", f"unknown format {spec.format!r} (known: {known})")
        text, escape = formats[spec.format]
        return replace(block, access_log=replace(spec, text=text, escape=escape))

    resolved = []
    for index, server in enumerate(servers):
        locations = tuple(
            Location(location.match, resolve(f"server[{index}].location[{position}]", location.block))
            for position, location in enumerate(server.locations)
        )
        server = resolve(f"server[{index}]", server)
        resolved.append(replace(server, locations=locations) if locations else server)
    return tuple(resolved)


def _drainCloseAfter(reader: _Reader) -> float | None:
    """C{websocket_drain_close_after}: C{false} (off), C{true} (at once) or a duration."""
    value = reader.table.get("websocket_drain_close_after", False)
    if isinstance(value, bool):
        reader.used.add("websocket_drain_close_after")
        return 0.0 if value else None
    return reader.seconds("websocket_drain_close_after", 0.0)


def _readMaps(source: str, tables: dict[str, Any]) -> tuple[MapVariable, ...]:
    """
    C{[map.NAME]}: C{source} (a value with variables, nginx's first
    argument), C{default}, and C{values}, a table of key to value in
    nginx's order.  Each is compiled now, so that a mistake stops the load.
    """
    from .variables import VariableError, VariableMap

    maps = []
    for name, table in tables.items():
        reader = _Reader(source, f"map.{name}", table)
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise reader.fail("(name)", "a map's name is a variable name: lowercase letters, digits and _")
        mapSource = reader.get("source", str)
        if not mapSource:
            raise reader.fail("source", 'is required: the value to look up, such as "$http_x_tenant"')
        values = reader.get("values", dict, {})
        for key, value in values.items():
            if not isinstance(value, str):
                raise reader.fail(f"values.{key}", "expected a string")
        variable = MapVariable(name, mapSource, reader.get("default", str, ""), tuple(values.items()))
        reader.finish()
        maps.append(variable)
    names = [variable.name for variable in maps]
    for variable in maps:
        try:
            VariableMap(variable.name, variable.source, variable.default, variable.values, names)
        except VariableError as e:
            raise ConfigError(source, f"map.{variable.name}", str(e)) from None
    return tuple(maps)


def _checkVirtualHosts(config: Config) -> None:
    """
    Blocks that share an address are its virtual hosts: they must agree on
    TLS, at most one may be the C{default_server}, and no name may belong
    to two of them.
    """
    for address, indexes in config.addresses.items():
        listen = address.listen
        first = indexes[0]
        defaults: list[int] = []
        owners: dict[str, int] = {}
        for index in indexes:
            block = config.servers[index]
            if block.isTLS != config.servers[first].isTLS:
                tls, plain = (index, first) if block.isTLS else (first, index)
                raise ConfigError(
                    config.source,
                    f"server[{index}].listen",
                    f"{listen!r} is shared by server[{first}] and server[{index}], but only server[{tls}] has "
                    f"ssl_certificate (server[{plain}] does not): blocks on one address must agree on TLS",
                )
            if block.proxy_protocol != config.servers[first].proxy_protocol and not listen.startswith("haproxy:"):
                expects, plain = (index, first) if block.proxy_protocol else (first, index)
                raise ConfigError(
                    config.source,
                    f"server[{index}].proxy_protocol",
                    f"{listen!r} is shared by server[{first}] and server[{index}], but only server[{expects}] has "
                    f"proxy_protocol = true (server[{plain}] does not): blocks on one address must agree on it",
                )
            if block.default_server:
                if defaults:
                    raise ConfigError(
                        config.source,
                        f"server[{index}].default_server",
                        f"server[{defaults[0]}] and server[{index}] both claim default_server on {listen!r}",
                    )
                defaults.append(index)
            for name in block.server_names:
                if name in owners and owners[name] != index:
                    raise ConfigError(
                        config.source,
                        f"server[{index}].server_name",
                        f"{name!r} is a name of both server[{owners[name]}] and server[{index}] on {listen!r}",
                    )
                owners[name] = index


_TOML_TABLE = re.compile(r"^\s*\[\[?[A-Za-z0-9_.\"-]+\]\]?\s*(#.*)?$", re.M)
_NGINX_BLOCK = re.compile(r"^\s*[a-z_]+(\s+[^\s{;=]+)*\s*\{", re.M)
_NGINX_STATEMENT = re.compile(r"^\s*[a-z_]+(\s+[^=\s#][^;\n]*)?;\s*(#.*)?$", re.M)


def looksLikeNginx(text: str) -> bool:
    """
    Whether C{text} is an nginx configuration rather than wsproxy's TOML,
    by its content: nginx has blocks in braces and statements ending in
    C{;}, TOML has C{[tables]} and C{key = value}.

    It lives here rather than in L{wsproxy.nginxconf} so that a TOML file
    loads without importing the converter: a proxy started from TOML never
    needs it, and its code would stay in memory for as long as it runs.
    """
    if _TOML_TABLE.search(text):
        return False
    return bool(_NGINX_BLOCK.search(text) or _NGINX_STATEMENT.search(text))


def loadConfig(path: str | Path, acceptUnsupported: bool = False) -> Config:
    """
    Read and validate the TOML file at C{path}, or the nginx configuration
    there (recognised by its content), converted by L{wsproxy.nginxconf}.

    @param acceptUnsupported: run an nginx configuration even when some of
        its directives are unsupported and change what clients receive.
    @raise ConfigError: if it cannot be read, is not TOML (nor nginx), or
        is not valid.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if looksLikeNginx(raw.decode("utf-8", "replace")):
            from .nginxconf import convertFile

            conversion = convertFile(path)
            blocking = conversion.blocking
            if blocking and not acceptUnsupported:
                first = blocking[0]
                raise ConfigError(
                    source,
                    f"{first.where}: {first.directive}",
                    f"unsupported, and it changes what clients receive: {first.detail} ({len(blocking)} such "
                    "directive(s); --check lists them, --accept-unsupported runs without them)",
                )
            return parseConfig(conversion.document, source)
        document = tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(source, "(file)", f"cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(source, "(syntax)", str(e)) from None
    return parseConfig(document, source)
