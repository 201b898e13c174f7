# -*- test-case-name: tests.test_routing_listener -*-
"""
Routing: which virtual host and which location answer a request, and how.

One L{AddressSettings} per listening address holds the address's virtual
hosts (the C{[[server]]} blocks that share its C{listen}), each with its
locations compiled once into L{wsproxy.matching} tables.  For each request
the C{Host} picks the virtual host (nginx's C{server_name} precedence), the
normalised path picks the location (nginx's C{location} precedence), and
the location's handler answers: a proxied L{wsproxy.relay.Exchange}, a
static file, a C{return}, or an error, with C{try_files}, C{error_page}
and named locations as nginx has them.

Everything that can be worked out from the configuration is worked out
here, when the configuration is loaded: a request costs a few dictionary
lookups and, where the configuration has them, the regexes nginx would
also try.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.logger import Logger

from .answers import CloseAnswer, ErrorAnswer, TextAnswer
from .config import Config, ListenAddress, Location, ServerBlock
from .http import HTTPError, RequestHead
from .interfaces import IExchange
from .matching import (
    Locations,
    ServerNames,
    escapeURI,
    normalizeHost,
    normalizePath,
    parseLocationMatch,
    splitTarget,
)
from .metrics import NO_METRICS
from .redirect import RedirectAnswer, RedirectSettings
from .relay import Exchange
from .server import ConnectionSettings, ListenerSettings, RequestLoop
from .static import NeedsSlash, StaticAnswer, StaticFiles
from .upstream import UpstreamPool
from .variables import RequestContext, VariableMap, compileTemplate, contextFor, headerValueOK

__all__ = ["AddressSettings", "LocationSettings", "VirtualHost", "routingTable"]

log = Logger()

#: How many internal redirects (C{try_files} fallbacks, C{error_page}s) one
#: request may go through before it is a configuration loop (nginx: 10).
MAX_INTERNAL_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class LocationSettings(ListenerSettings):
    """
    One location's effective settings, compiled: its pool, its headers,
    its handler.  An L{Exchange} reads these as it reads a listener's.

    @ivar handler: C{"proxy"}, C{"return"}, C{"files"} or C{"try_files"}.
    """

    def __init__(
        self, match: str, block: ServerBlock, pool: UpstreamPool | None, reactor: Any, secure: bool, vhost: VirtualHost
    ) -> None:
        super().__init__(block, pool, reactor, secure)
        self.match = match
        self.vhost = vhost
        self.internal = block.internal
        if not secure:
            self.extraHeaders = withoutHSTS(self.extraHeaders)
            self.extraHeaderLines = tuple(b"%b: %b" % pair for pair in self.extraHeaders)
        modifier, pattern = parseLocationMatch(match)
        self.prefix = pattern.encode("utf-8") if modifier in ("", "=", "^~") else b""
        self.setHeaders = tuple(
            (name.lower().encode("ascii"), name.encode("ascii"), compileTemplate(value, vhost.maps))
            for name, value in block.proxy_set_header
        )
        self.setNames = frozenset(lower for lower, _, _ in self.setHeaders)
        self.responseDrop = frozenset(
            {b"content-length", *(h.lower().encode("ascii") for h in block.proxy_hide_header)}
        )
        self.proxyURI = block.proxy_uri.encode("ascii") if block.proxy_uri is not None else None
        self.redirects = self._locationRewrites(block)
        self.errorPages = dict(block.error_page)
        self.files: StaticFiles | None = None
        if block.root is not None or block.alias is not None:
            self.files = StaticFiles(block.root, block.alias, self.prefix, block.index, block.disable_symlinks)
        # An entry ending in "/" tests for a directory, and is then served
        # without that slash (nginx decides this from the entry as written).
        self.tryFiles = tuple(
            (compileTemplate(entry[:-1] if entry.endswith("/") else entry, vhost.maps), entry.endswith("/"))
            for entry in block.try_files[:-1]
        )
        self.fallback = block.try_files[-1] if block.try_files else None
        self.fallbackURI = None
        if self.fallback is not None and not self.fallback.startswith(("=", "@")):
            self.fallbackURI = compileTemplate(self.fallback, vhost.maps)
        self.maps = vhost.maps
        self.returnStatus = 0
        self.returnText: Any = None
        if block.return_ is not None:
            code, _, text = block.return_.partition(" ")
            self.returnStatus = int(code)
            self.returnText = compileTemplate(text, vhost.maps)
        if block.return_ is not None:
            self.handler = "return"
        elif block.try_files:
            self.handler = "try_files"
        elif pool is not None:
            self.handler = "proxy"
        else:
            self.handler = "files"

    def _locationRewrites(self, block: ServerBlock) -> tuple[tuple[bytes, bytes], ...]:
        """
        The C{Location} rewrites of nginx's C{proxy_redirect}: C{default}
        turns the C{proxy_pass} URL back into the location's prefix.
        """
        if block.proxy_redirect is not None:
            return tuple((old.encode("ascii"), new.encode("ascii")) for old, new in block.proxy_redirect)
        if block.proxy_pass is None:
            return ()
        url = block.proxy_pass.encode("ascii")
        if self.proxyURI is not None:
            return ((url, self.prefix),) if self.prefix else ()
        return ((url + b"/", b"/"),)


class VirtualHost:
    """
    One C{[[server]]} block on an address: its names and its locations.

    @ivar redirect: for a server whose C{return} answers every request (the
        plain-HTTP listener of the recipe), its settings; else C{None}.
    @ivar allLocations: the settings of each of its locations.
    """

    #: The recorder of what it answers outside any location (see L{wsproxy.metrics}).
    metrics: Any = NO_METRICS

    def __init__(
        self,
        index: int,
        block: ServerBlock,
        pools: Mapping[str, UpstreamPool],
        reactor: Any,
        secure: bool,
        maps: Mapping[str, VariableMap] | None = None,
    ) -> None:
        self.index = index
        self.block = block
        #: The configuration's C{map} variables, by name.
        self.maps: Mapping[str, VariableMap] = maps or {}
        self.name = block.server_name.encode("ascii")
        self.extraHeaders = tuple((k.encode("ascii"), v.encode("ascii")) for k, v in block.add_header)
        if not secure:
            self.extraHeaders = withoutHSTS(self.extraHeaders)
        self.redirect = RedirectSettings(block) if block.isRedirect else None
        self.locations: Locations[LocationSettings] = Locations([])
        self.allLocations: tuple[LocationSettings, ...] = ()
        if self.redirect is not None:
            return
        entries: list[tuple[str, LocationSettings, bool]] = []
        locations = list(block.locations)
        if not any(parseLocationMatch(loc.match) == ("", "/") for loc in locations) and (
            block.proxy_pass is not None or block.root is not None or block.try_files
        ):
            # nginx needs "location /"; a server-level handler is that location here.
            locations.append(Location("/", block))
        for location in locations:
            effective = location.block
            pool = pools[effective.upstream] if effective.upstream is not None else None
            settings = LocationSettings(location.match, effective, pool, reactor, secure, self)
            autoRedirect = settings.handler == "proxy" and location.match.endswith("/")
            entries.append((location.match, settings, autoRedirect))
        self.locations = Locations(entries)
        self.allLocations = tuple(settings for _, settings, _ in entries)


class AddressSettings(ConnectionSettings):
    """
    What a listening address needs: the connection-level settings of its
    default server (read before any C{Host} is known, as in nginx), and
    its virtual hosts.
    """

    def __init__(
        self, config: Config, address: ListenAddress, pools: Mapping[str, UpstreamPool], reactor: Any, secure: bool
    ) -> None:
        indexes = config.addresses[address]
        default = config.defaultServer(address)
        super().__init__(config.servers[default])
        # The body limit is the location's: the head is read without one.
        self.maxBodySize = 0
        self.address = address
        if not secure:
            self.extraHeaders = withoutHSTS(self.extraHeaders)
            self.extraHeaderLines = tuple(b"%b: %b" % pair for pair in self.extraHeaders)
        self.reactor = reactor
        self.secure = secure
        self.scheme = b"https" if secure else b"http"
        maps = {
            m.name: VariableMap(m.name, m.source, m.default, m.values, [n.name for n in config.maps])
            for m in config.maps
        }
        self.vhosts = [VirtualHost(i, config.servers[i], pools, reactor, secure, maps) for i in indexes]
        byIndex = {vhost.index: vhost for vhost in self.vhosts}
        self.defaultHost = byIndex[default]
        self.names = ServerNames(_implicitNames(self.vhosts), self.defaultHost)
        protocols = {p.encode("ascii") for block in self._blocks() for p in block.upgrade_protocols}
        self.upgradeProtocols = frozenset(protocols)

    def _blocks(self) -> list[ServerBlock]:
        return [loc.block for vhost in self.vhosts for loc in vhost.block.locations] + [v.block for v in self.vhosts]

    # Routing one request

    def answer(self, loop: RequestLoop, request: RequestHead) -> IExchange:
        """The exchange that answers C{request}: see the module's docstring."""
        host = normalizeHost(request.host) if request.host else b""
        if self.secure and not host:
            # No Host (HTTP/1.0): the server the TLS name chose answers.
            vhost = self._sniHost(loop)
        else:
            vhost = self.names.lookup(host)
        if self.secure and vhost is not self._sniHost(loop):
            answer: Any = ErrorAnswer(
                loop, request, 421, "this connection's TLS name is for another server", vhost.extraHeaders
            )
            answer.metrics = vhost.metrics
            return answer
        if vhost.redirect is not None:
            return RedirectAnswer(loop, request, vhost.redirect)
        path, args = splitTarget(request.path)
        try:
            uri = b"/" if path == b"*" else normalizePath(path)
        except HTTPError as e:
            answer = ErrorAnswer(loop, request, e.status, e.message, self.extraHeaders)
            answer.metrics = vhost.metrics
            return answer
        return _Routing(self, loop, request, vhost, host, uri, args).start()

    def _sniHost(self, loop: RequestLoop) -> VirtualHost:
        """The virtual host the connection's TLS server name picked (cached on the connection)."""
        leg = loop.leg
        picked = getattr(leg, "sniHost", None)
        if picked is None:
            handle = getattr(leg.transport, "getHandle", None)
            name = handle().get_servername() if handle is not None else None
            picked = self.names.lookup(normalizeHost(name) if name else b"")
            leg.sniHost = picked
        return picked


class _Routing:
    """
    One request on its way through a virtual host's locations, internal
    redirects included.  It lives only while the request is routed.
    """

    def __init__(
        self,
        address: AddressSettings,
        loop: RequestLoop,
        request: RequestHead,
        vhost: VirtualHost,
        host: bytes,
        uri: bytes,
        args: bytes,
    ) -> None:
        self.address = address
        self.loop = loop
        self.request = request
        self.vhost = vhost
        self.host = host
        self.uri = uri
        self.args = args
        self.redirects = 0
        self.status = 0
        self.captures: tuple[bytes | None, ...] = ()
        #: The recorder of the place that answers: the last location handled.
        self.metrics = vhost.metrics

    def start(self) -> IExchange:
        return self._counted(self._route(self.uri, internal=False))

    def _counted(self, answer: Any) -> Any:
        """C{answer}, told whose metrics it records."""
        if answer is not None:
            answer.metrics = self.metrics
        return answer

    def _route(self, uri: bytes, internal: bool) -> IExchange:
        self.uri = uri
        found = self.vhost.locations.lookup(uri)
        if found is None or (found.value.internal and not internal and not found.redirectSlash):
            return self._error(None, 404, "no location for this URI")
        location = found.value
        self.captures = found.captures
        if found.redirectSlash:
            return self._redirect(location, 301, escapeURI(uri) + b"/" + (b"?" + self.args if self.args else b""))
        return self._handle(location, found.prefix)

    def _handle(self, location: LocationSettings, prefix: bytes | None) -> IExchange:
        request, loop = self.request, self.loop
        self.metrics = location.metrics
        if request.upgrade is not None:
            if location.allowedOrigins:
                origin = (request.first(b"origin") or b"").lower().rstrip(b"/")
                if origin not in location.allowedOrigins:
                    location.metrics.upgradeRefused()
                    return self._error(location, 403, "WebSocket upgrade from an origin that is not allowed")
            if request.upgrade not in location.upgradeProtocols:
                # This location does not upgrade: the request goes on as plain HTTP.
                request.upgrade = None
        limit = location.block.client_max_body_size
        if limit and request.bodyLength and request.bodyLength > limit:
            return self._error(location, 413, "request body too large", close=True)
        loop.cycle.maxBodySize = limit
        handler = location.handler
        if handler == "proxy":
            return self._proxy(location, prefix)
        if handler == "return":
            return self._return(location)
        if handler == "try_files":
            return self._tryFiles(location)
        return self._file(location, self.uri)

    # Handlers

    def _proxy(self, location: LocationSettings, prefix: bytes | None) -> IExchange:
        exchange = Exchange(self.loop, self.request, location)
        exchange.uri, exchange.args = self.uri, self.args
        if location.proxyURI is not None and self.request.path != b"*":
            exchange.target = _replaceURI(self.uri, self.args, prefix or b"", location.proxyURI, self.request.path)
        exchange.statusOverride = self.status
        exchange.errorPage = lambda status, message: self._counted(self._errorPage(location, status, message))
        return exchange

    def _return(self, location: LocationSettings) -> IExchange:
        status = location.returnStatus
        if status == 444:
            return CloseAnswer(self.loop, self.request, location.extraHeaders, location.block.access_log)
        text = location.returnText.expand(self._context(location)) if location.returnText is not None else b""
        if status in _REDIRECTS or (status >= 400 and not text):
            if status >= 400:
                return self._error(location, status, "")
            return self._redirect(location, status, text)
        return TextAnswer(
            self.loop,
            self.request,
            self.status or status,
            body=text,
            extraHeaders=location.extraHeaders,
            accessLog=location.block.access_log,
        )

    def _tryFiles(self, location: LocationSettings) -> IExchange:
        files = location.files
        if files is not None:
            context = self._context(location)
            for entry, directory in location.tryFiles:
                candidate = entry.expand(context) or b"/"
                if files.exists(candidate, directory=directory):
                    return self._file(location, candidate)
        fallback = location.fallback
        assert fallback is not None
        if fallback.startswith("="):
            return self._error(location, int(fallback[1:]), "no file for this URI")
        if fallback.startswith("@"):
            return self._named(location, fallback[1:])
        target = location.fallbackURI.expand(self._context(location))
        path, _, args = target.partition(b"?")
        if args:
            self.args = args
        return self._internal(location, path)

    def _file(self, location: LocationSettings, uri: bytes) -> IExchange:
        files = location.files
        if files is None:
            return self._error(location, 404, "no file for this URI")
        request = self.request
        if request.method not in (b"GET", b"HEAD"):
            return self._error(location, 405, "only GET and HEAD for files", headers=((b"Allow", b"GET, HEAD"),))
        try:
            path = files.find(uri)
        except NeedsSlash:
            return self._redirect(location, 301, escapeURI(uri) + b"/" + (b"?" + self.args if self.args else b""))
        except HTTPError as e:
            return self._error(location, e.status, e.message)
        if path is None:
            return self._error(location, 404, "no file for this URI")
        return StaticAnswer(
            self.loop,
            request,
            path,
            location.extraHeaders,
            status=self.status or 200,
            accessLog=location.block.access_log,
        )

    # Internal redirects and errors

    def _internal(self, location: LocationSettings, uri: bytes) -> IExchange:
        self.redirects += 1
        if self.redirects > MAX_INTERNAL_REDIRECTS:
            log.error("{uri}: more than {n} internal redirects", uri=uri, n=MAX_INTERNAL_REDIRECTS)
            return ErrorAnswer(self.loop, self.request, 500, "internal redirect loop", location.extraHeaders)
        try:
            uri = normalizePath(uri)
        except HTTPError as e:
            return ErrorAnswer(self.loop, self.request, e.status, e.message, location.extraHeaders)
        return self._route(uri, internal=True)

    def _named(self, location: LocationSettings, name: str) -> IExchange:
        named = self.vhost.locations.named(name)
        if named is None:
            return ErrorAnswer(self.loop, self.request, 500, f"no location @{name}", location.extraHeaders)
        self.redirects += 1
        if self.redirects > MAX_INTERNAL_REDIRECTS:
            return ErrorAnswer(self.loop, self.request, 500, "internal redirect loop", location.extraHeaders)
        return self._handle(named, None)

    def _errorPage(self, location: LocationSettings, status: int, message: str) -> IExchange | None:
        """The C{error_page} for C{status} in C{location}, if it has one."""
        target = location.errorPages.get(status)
        if target is None or self.status:
            return None
        parts = target.split()
        override = parts[0][1:] if len(parts) == 2 else None
        self.status = int(override) if override else (0 if override == "" else status)
        # An error page is fetched with GET (a HEAD stays HEAD), as in nginx.
        if self.request.method != b"HEAD":
            self.request.method = b"GET"
        where = parts[-1]
        if where.startswith("@"):
            return self._named(location, where[1:])
        self.args = b""
        return self._internal(location, where.encode("ascii"))

    def _error(
        self, location: LocationSettings | None, status: int, message: str, close: bool = False, headers: Any = ()
    ) -> IExchange:
        if location is not None and not close and not (self.request.chunked or self.request.bodyLength):
            page = self._errorPage(location, status, message)
            if page is not None:
                return page
        extra = location.extraHeaders if location is not None else self.vhost.extraHeaders
        accessLog = (location.block if location is not None else self.vhost.block).access_log
        return ErrorAnswer(
            self.loop, self.request, self.status or status, message or "error", extra, headers, accessLog
        )

    def _redirect(self, location: LocationSettings, status: int, target: bytes) -> IExchange:
        """A redirect; a relative target is made absolute, as nginx's C{absolute_redirect}."""
        if not headerValueOK(target):
            # A decoded %0D%0A in $uri must not become a header of ours.
            return ErrorAnswer(self.loop, self.request, 400, "the redirect would carry a line break")
        if target.startswith(b"/"):
            target = absoluteURL(self.loop, self.address.scheme, self.host or self.vhost.name, target)
        return TextAnswer(
            self.loop,
            self.request,
            self.status or status,
            location=target,
            extraHeaders=location.extraHeaders,
            accessLog=location.block.access_log,
        )

    def _context(self, location: LocationSettings) -> RequestContext:
        return contextFor(self.request, self.loop.leg, location, self.uri, self.args, self.captures)


def _implicitNames(vhosts: list[VirtualHost]) -> list[tuple[tuple[str, ...], VirtualHost]]:
    """
    Each virtual host's names; the first block without a C{server_name}
    is named C{""}, as in nginx, so that it answers requests without a
    C{Host} (HTTP/1.0) even when it is not the default server.
    """
    entries = []
    unnamed = False
    for vhost in vhosts:
        names = vhost.block.server_names
        if not names and not unnamed and not any("" in v.block.server_names for v in vhosts):
            names, unnamed = ("",), True
        entries.append((names, vhost))
    return entries


def withoutHSTS(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """
    C{headers} without C{Strict-Transport-Security}: RFC 6797 section 7.2
    says a browser must ignore it over plain HTTP, so a plain listener
    never sends it.
    """
    return tuple((name, value) for name, value in headers if name.lower() != b"strict-transport-security")


def absoluteURL(loop: RequestLoop, scheme: bytes, host: bytes, path: bytes) -> bytes:
    """
    C{scheme://host[:port]path} for a redirect, as nginx writes it: the
    port is the one the client connected to, left out when it is the
    scheme's default.
    """
    if not host:
        local = loop.leg.transport.getHost()
        address = getattr(local, "host", "localhost")
        host = (f"[{address}]" if ":" in address else address).encode("ascii")
    port = getattr(loop.leg.transport.getHost(), "port", 0)
    default = 443 if scheme == b"https" else 80
    suffix = b"" if port in (default, 0) else b":%d" % port
    return scheme + b"://" + host + suffix + path


def _replaceURI(uri: bytes, args: bytes, prefix: bytes, replacement: bytes, raw: bytes) -> bytes:
    from .matching import isQuotedPath, replaceURI

    return replaceURI(uri, args, prefix, replacement, isQuotedPath(splitTarget(raw)[0]))


def routingTable(config: Config) -> str:
    """
    The effective routing, for C{--check}: each address, its names (the
    default server marked), each location with what answers it.
    """
    lines = []
    for address, indexes in config.addresses.items():
        lines.append(f"{address.listen}{' (TLS)' if config.servers[indexes[0]].isTLS else ''}")
        default = config.defaultServer(address)
        for index in indexes:
            block = config.servers[index]
            names = " ".join(block.server_names) or '""'
            mark = "  [default_server]" if index == default else ""
            lines.append(f"  server[{index}] {names}{mark}")
            if block.isRedirect:
                lines.append(f"    (every request)  -> return {block.return_}")
                continue
            locations: Sequence[Location] = block.locations
            if not any(loc.match == "/" for loc in locations) and (block.proxy_pass or block.root or block.try_files):
                locations = (*locations, Location("/", block))
            for location in locations:
                lines.append(f"    {location.match:<24} -> {_describeHandler(location.block)}")
    return "\n".join(lines)


def _describeHandler(block: ServerBlock) -> str:
    if block.return_ is not None:
        return f"return {block.return_}"
    parts = []
    if block.try_files:
        parts.append("try_files " + " ".join(block.try_files))
    if block.proxy_pass is not None:
        parts.append(f"proxy_pass {block.proxy_pass}")
    if block.alias is not None:
        parts.append(f"alias {block.alias}")
    elif block.root is not None and not block.proxy_pass:
        parts.append(f"root {block.root}")
    if block.internal:
        parts.append("(internal)")
    return "; ".join(parts) or "404"
