# -*- test-case-name: tests.test_variables,tests.test_variables_nginx -*-
"""
nginx variables in configuration values: C{"https://$host$request_uri"},
C{"$remote_addr"}, C{"${arg_page}x"}.

A value is compiled once, when the configuration is read, into a
L{Template}: literal bytes and getter functions.  A misspelt variable is a
configuration error then, never an empty header at run time, and the
request path does no parsing: it builds a cheap L{RequestContext} and
calls L{Template.expand}.  A value without variables expands to the very
bytes object it was compiled to.

The variables are those of nginx's C{ngx_http_core_module} ("Embedded
Variables", U{https://nginx.org/en/docs/http/ngx_http_core_module.html#variables})
with nginx's semantics, as its C{ngx_http_variables.c} and
C{ngx_http_script.c} implement them:

  - C{$name} and C{${name}}; names are letters, digits and C{_}, and
    case-insensitive (C{$HOST} is C{$host}).  C{$1}..C{$9} are regex
    captures, one digit only (C{$12} is capture 1, then C{"2"}).
  - nginx has no escape for C{$}: a C{$} not followed by a name (C{"a$"},
    C{"$$"}, C{"${}"}, C{"$ "}) is an "invalid variable name", a brace
    left open ("${host") is an error too, and so are C{$0} and C{${1}},
    which nginx reads as the unknown variables C{0} and C{1}.
  - A variable with no value (a missing header, argument or cookie)
    expands to nothing.

Where this module differs from nginx, on purpose:

  - C{$proxy_add_x_forwarded_for} is the C{X-Forwarded-For} value the
    proxy itself computed with its trust rules (C{set_real_ip_from}): the
    client's own chain is kept only when the client is a trusted proxy.
    nginx appends C{$remote_addr} to whatever the client sent, so that any
    client can put any address in front.
  - C{$arg_}, C{$cookie_} and C{$http_} with nothing after the prefix are
    refused; nginx accepts them and reads nonsense.
  - C{$http_NAME} joins repeated fields with C{", "} (C{"; "} for
    C{Cookie}), as nginx does since 1.23.0; nginx 1.22 gave the first
    field only, except for C{Cookie} and C{X-Forwarded-For}.

What expansions may contain: the request parser refuses CR, LF and NUL in
header values and in the request target, so C{$http_*}, C{$cookie_*},
C{$arg_*}, C{$args}, C{$request_uri} and C{$host} can never carry them.
C{$uri}, C{$1}..C{$9} and the C{extra} values are whatever the caller put
into the L{RequestContext}: a normalised, %-decoded path can hold a
decoded C{%0D%0A}.  An expansion that goes into a header must therefore
still pass L{headerValueOK}; the caller refuses the request if it does not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from .http import RequestHead

__all__ = [
    "PREFIXES",
    "VARIABLES",
    "MapValues",
    "RequestContext",
    "Template",
    "VariableError",
    "VariableMap",
    "compileTemplate",
    "contextFor",
    "headerValueOK",
]


class VariableError(ValueError):
    """A configuration value names an unknown variable or is malformed; the message is one line."""


class RequestContext:
    """
    What variables are read from, for one request; built by the request
    path for each request that needs a template expanded.

    Creating one only stores its arguments: the request ID, the host name
    and the text of the numbers are made when a template first asks for
    them.

    @ivar request: the parsed request head.
    @ivar clientAddress: the client's address as text (C{$remote_addr}).
    @ivar clientPort: the client's port, 0 if it has none (C{$remote_port}).
    @ivar serverPort: the port the request came in on (C{$server_port}).
    @ivar scheme: C{b"http"} or C{b"https"} (C{$scheme}).
    @ivar serverName: the listener's C{server_name} (C{$server_name}; also
        C{$host} for a request without a host).
    @ivar uri: the normalised path, without the query (C{$uri}).
    @ivar args: the query, without the C{"?"} (C{$args}).
    @ivar forwardedFor: the C{X-Forwarded-For} value the proxy computed
        (C{$proxy_add_x_forwarded_for}).
    @ivar captures: the groups of the regular expression that matched, the
        first being C{$1}; a group that did not take part is C{None}.
    @ivar extra: values of variables defined elsewhere (C{map}, C{$status}
        in a log format), by name, attached when known; see the
        C{extraNames} of L{compileTemplate}.
    @ivar underscores: whether header names with C{_} count, as nginx's
        C{underscores_in_headers on}; by default they are invisible to
        C{$http_NAME}, as nginx ignores them, so that C{X_Real_IP} cannot
        pose as C{X-Real-IP}.
    """

    __slots__ = (
        "request",
        "clientAddress",
        "clientPort",
        "serverPort",
        "scheme",
        "serverName",
        "uri",
        "args",
        "forwardedFor",
        "captures",
        "extra",
        "underscores",
        "_requestId",
        "_host",
    )

    def __init__(
        self,
        request: RequestHead,
        clientAddress: str,
        clientPort: int,
        serverPort: int,
        scheme: bytes,
        serverName: bytes,
        uri: bytes,
        args: bytes,
        forwardedFor: bytes,
        captures: tuple[bytes | None, ...] = (),
        *,
        underscores: bool = False,
    ) -> None:
        self.request = request
        self.clientAddress = clientAddress
        self.clientPort = clientPort
        self.serverPort = serverPort
        self.scheme = scheme
        self.serverName = serverName
        self.uri = uri
        self.args = args
        self.forwardedFor = forwardedFor
        self.captures = captures
        self.extra: dict[str, bytes] | None = None
        self.underscores = underscores
        self._requestId: bytes | None = None
        self._host: bytes | None = None

    @property
    def requestId(self) -> bytes:
        """
        C{$request_id}: 32 lowercase hexadecimal digits from 16 random
        bytes, as nginx makes it; made on first use, then the same for the
        whole request.
        """
        if self._requestId is None:
            self._requestId = os.urandom(16).hex().encode("ascii")
        return self._requestId

    @property
    def host(self) -> bytes:
        """
        C{$host}: the host from the request line or the C{Host} header,
        lowercased, without its port and trailing dot; else the server name.
        """
        if self._host is None:
            raw = self.request.host
            self._host = _hostName(raw) if raw else self.serverName
        return self._host


def _hostName(raw: bytes) -> bytes:
    """
    nginx's C{ngx_http_validate_host} on a host the parser accepted: the
    port goes (a bracketed IPv6 address keeps its colons), then one
    trailing dot, and the rest is lowercased.
    """
    if raw[:1] == b"[":
        name = raw[: raw.find(b"]") + 1]
    else:
        name = raw.partition(b":")[0]
    if name[-1:] == b".":
        name = name[:-1]
    return name.lower()


Getter = Callable[[RequestContext], bytes]


class Template:
    """
    A configuration value compiled by L{compileTemplate}.

    @ivar text: the value as configured.
    @ivar variables: the names of the variables it uses, in order of first
        use, without C{$} (C{"host"}, C{"1"}), for reports.
    """

    __slots__ = ("text", "variables", "_parts", "_constant")

    def __init__(self, text: str, parts: list[bytes | Getter], variables: tuple[str, ...]) -> None:
        self.text = text
        self.variables = variables
        self._parts = tuple(parts)
        self._constant = None if variables else b"".join(part for part in parts if isinstance(part, bytes))

    @property
    def isConstant(self) -> bool:
        """Whether the value has no variables: its expansion is always the same object."""
        return self._constant is not None

    def expand(self, ctx: RequestContext) -> bytes:
        """The value for the request C{ctx} describes."""
        constant = self._constant
        if constant is not None:
            return constant
        return b"".join([part if isinstance(part, bytes) else part(ctx) for part in self._parts])

    def __repr__(self) -> str:
        return f"<Template {self.text!r}>"


def headerValueOK(value: bytes) -> bool:
    """
    Whether C{value} may be sent as a header field value: no CR, LF or NUL
    (RFC 9110 §5.5), which would end the field, or the head, early.
    """
    return _FORBIDDEN_IN_HEADER.search(value) is None


_FORBIDDEN_IN_HEADER = re.compile(rb"[\x00\r\n]")


def _header(ctx: RequestContext, name: bytes) -> bytes:
    """The values of header C{name} (lowercase), joined as nginx joins them."""
    values = ctx.request.fields.get(name)
    if not values:
        return b""
    return values[0] if len(values) == 1 else b", ".join(values)


def _headerGetter(suffix: str) -> Getter:
    """
    C{$http_NAME}: every field whose lowercased name, with C{-} read as
    C{_}, is C{NAME}, joined with C{", "}, or C{"; "} for C{Cookie}, in
    the order the client sent them.
    """
    dashed = suffix.replace("_", "-").encode("ascii")
    underscored = suffix.encode("ascii")
    separator = b"; " if suffix == "cookie" else b", "

    def getHeader(ctx: RequestContext) -> bytes:
        if not ctx.underscores or b"_" not in underscored:
            # A name with "_" in it is invisible, so only the dashed spelling can match.
            values = ctx.request.fields.get(dashed)
        else:
            values = [value for name, value in ctx.request.headers if name.lower().replace(b"-", b"_") == underscored]
        if not values:
            return b""
        return values[0] if len(values) == 1 else separator.join(values)

    return getHeader


def _argumentGetter(suffix: str) -> Getter:
    """
    C{$arg_NAME}: nginx's C{ngx_http_arg}, the raw value of the first
    C{NAME=} argument, the name matched case-insensitively.  An argument
    without C{=} is not found.
    """
    search = re.compile(rb"(?:^|&)" + re.escape(suffix.encode("ascii")) + rb"=([^&]*)", re.IGNORECASE).search

    def getArgument(ctx: RequestContext) -> bytes:
        found = search(ctx.args)
        return found.group(1) if found is not None else b""

    return getArgument


def _cookieGetter(suffix: str) -> Getter:
    """C{$cookie_NAME}: see L{_findCookie}."""
    name = suffix.encode("ascii")

    def getCookie(ctx: RequestContext) -> bytes:
        for value in ctx.request.fields.get(b"cookie", ()):
            found = _findCookie(value, name)
            if found is not None:
                return found
        return b""

    return getCookie


def _findCookie(header: bytes, name: bytes) -> bytes | None:
    """
    The value of cookie C{name} (lowercase) in one C{Cookie} field, or
    C{None}, read as nginx's C{ngx_http_parse_multi_header_lines} reads it:
    pairs split at C{;} or C{,}, names case-insensitive, spaces around the
    C{=} ignored, the value running to the next C{;}.  Its quirks are kept
    so that the same request gives the same value behind either proxy: the
    name looked for, found without an C{=}, makes the pair after it be
    skipped too (C{"a; a=1"} has no cookie C{a}).
    """
    size = len(name)
    end = len(header)
    if size > end:
        return None
    start = 0
    while start < end:
        if header[start : start + size].lower() == name:
            start += size
            while start < end and header[start] == _SPACE:
                start += 1
            if start < end and header[start] == _EQUALS:
                start += 1
                while start < end and header[start] == _SPACE:
                    start += 1
                last = header.find(b";", start)
                return header[start:] if last < 0 else header[start:last]
            start += 1
        while start < end:
            start += 1
            if header[start - 1] in _COOKIE_SEPARATORS:
                break
        while start < end and header[start] == _SPACE:
            start += 1
    return None


_SPACE = ord(" ")
_EQUALS = ord("=")
_COOKIE_SEPARATORS = b";,"


def _port(port: int) -> bytes:
    return b"%d" % port if 0 < port < 65536 else b""


def _captureGetter(index: int) -> Getter:
    def getCapture(ctx: RequestContext) -> bytes:
        captures = ctx.captures
        return (captures[index] or b"") if index < len(captures) else b""

    return getCapture


def _extraGetter(name: str) -> Getter:
    def getExtra(ctx: RequestContext) -> bytes:
        extra = ctx.extra
        return extra.get(name, b"") if extra else b""

    return getExtra


_GETTERS: dict[str, Getter] = {
    "host": lambda ctx: ctx.host,
    "http_host": lambda ctx: ctx.request.first(b"host") or b"",
    "remote_addr": lambda ctx: ctx.clientAddress.encode("ascii"),
    "remote_port": lambda ctx: _port(ctx.clientPort),
    "scheme": lambda ctx: ctx.scheme,
    "server_name": lambda ctx: ctx.serverName,
    "server_port": lambda ctx: _port(ctx.serverPort),
    "request_uri": lambda ctx: ctx.request.path,
    "uri": lambda ctx: ctx.uri,
    "document_uri": lambda ctx: ctx.uri,
    "args": lambda ctx: ctx.args,
    "query_string": lambda ctx: ctx.args,
    "is_args": lambda ctx: b"?" if ctx.args else b"",
    "request_id": lambda ctx: ctx.requestId,
    "request_method": lambda ctx: ctx.request.method,
    # nginx: the Content-Length field as sent; nothing for a chunked body.
    "content_length": lambda ctx: ctx.request.first(b"content-length") or b"",
    "content_type": lambda ctx: _header(ctx, b"content-type"),
    "proxy_add_x_forwarded_for": lambda ctx: ctx.forwardedFor,
}

#: The variables with fixed names.
VARIABLES: frozenset[str] = frozenset(_GETTERS)

#: Variables named by a prefix and what follows it: C{$http_NAME} (a
#: request header), C{$arg_NAME} (a query argument), C{$cookie_NAME}.
PREFIXES = ("http_", "arg_", "cookie_")

_PREFIX_GETTERS: dict[str, Callable[[str], Getter]] = {
    "http_": _headerGetter,
    "arg_": _argumentGetter,
    "cookie_": _cookieGetter,
}

#: What follows a "$": a capture digit, a braced name (closed or not), or a name.
_REFERENCE = re.compile(r"\$(?:([1-9])|\{([A-Za-z0-9_]*)(\}?)|([A-Za-z0-9_]*))")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def _literal(text: str) -> bytes:
    if not _PRINTABLE.fullmatch(text):
        bad = next(c for c in text if not "\x20" <= c <= "\x7e")
        raise VariableError(f"the character {bad!r} in {text!r}: only printable ASCII may be configured")
    return text.encode("ascii")


def _getter(name: str, extraNames: frozenset[str]) -> Getter:
    getter = _GETTERS.get(name)
    if getter is not None:
        return getter
    for prefix in PREFIXES:
        if name.startswith(prefix):
            if name == prefix:
                raise VariableError(f"variable ${name} names nothing after {prefix!r}")
            return _PREFIX_GETTERS[prefix](name[len(prefix) :])
    if name in extraNames:
        return _extraGetter(name)
    raise VariableError(f"unknown variable ${name}")


def _checkExtraNames(extraNames: Collection[str]) -> frozenset[str]:
    names = frozenset(name.lower() for name in extraNames)
    for name in names:
        if not _NAME.fullmatch(name):
            raise VariableError(f"invalid variable name ${name}")
        if name in VARIABLES or name.startswith(PREFIXES):
            raise VariableError(f"variable ${name} is built in and cannot be defined again")
    return names


def compileTemplate(text: str, extraNames: Collection[str] = ()) -> Template:
    """
    Compile a configuration value with nginx variables in it.

    @param text: the value as configured.
    @param extraNames: names of variables defined elsewhere (C{map}
        variables, C{$status} in a log format), which are read from
        L{RequestContext.extra}; they may not be built-in names.
    @raise VariableError: for an unknown variable, a C{$} not followed by
        a name, a brace left open, or a character other than printable
        ASCII (header values must be printable).
    """
    extras = _checkExtraNames(extraNames) if extraNames else frozenset()
    parts: list[bytes | Getter] = []
    names: dict[str, None] = {}
    position = 0
    while (dollar := text.find("$", position)) >= 0:
        if dollar > position:
            parts.append(_literal(text[position:dollar]))
        reference = _REFERENCE.match(text, dollar)
        assert reference is not None
        capture, braced, closed, bare = reference.groups()
        if capture is not None:
            parts.append(_captureGetter(int(capture) - 1))
            names[capture] = None
        else:
            name = braced if braced is not None else bare
            if braced is not None and not closed:
                raise VariableError(f"the closing bracket of ${{{braced} is missing in {text!r}")
            if not name:
                raise VariableError(f"invalid variable name at {text[dollar:]!r}: nginx has no escape for $")
            name = name.lower()
            parts.append(_getter(name, extras))
            names[name] = None
        position = reference.end()
    if position < len(text):
        parts.append(_literal(text[position:]))
    return Template(text, parts, tuple(names))


class VariableMap:
    """
    nginx's C{map SOURCE $NAME { ... }}: a variable whose value depends on
    another value of the request, worked out only when something reads it.

    Keys are matched as nginx matches them: a string ignoring case (a
    leading C{\\} escapes a key that would read as a special word), then
    the regexes (C{~} case-sensitive, C{~*} not) in the order given, else
    the default.  Values, the source and the default may use variables,
    other maps' included.
    """

    def __init__(
        self, name: str, source: str, default: str, values: Sequence[tuple[str, str]], mapNames: Collection[str] = ()
    ) -> None:
        """
        @raise VariableError: for an unknown variable or a bad regex.
        """
        self.name = name
        self.source = compileTemplate(source, mapNames)
        self.default = compileTemplate(default, mapNames)
        self.exact: dict[bytes, Template] = {}
        self.patterns: list[tuple[re.Pattern[bytes], Template]] = []
        for key, value in values:
            template = compileTemplate(value, mapNames)
            if key.startswith("~"):
                caseless = key.startswith("~*")
                pattern = key[2:] if caseless else key[1:]
                try:
                    compiled = re.compile(pattern.encode("utf-8"), re.IGNORECASE if caseless else 0)
                except re.error as e:
                    raise VariableError(f"map ${name}: bad regex {pattern!r}: {e}") from None
                self.patterns.append((compiled, template))
            else:
                self.exact.setdefault(key.removeprefix("\\").lower().encode("utf-8"), template)

    def value(self, ctx: RequestContext) -> bytes:
        """This map's value for the request C{ctx}."""
        source = self.source.expand(ctx)
        template = self.exact.get(source.lower())
        if template is None:
            template = next((t for pattern, t in self.patterns if pattern.search(source)), self.default)
        return template.expand(ctx)


class MapValues:
    """
    The map variables of one request (a L{RequestContext}'s C{extra}): each
    is worked out on first use and kept for the rest of the request.  A map
    that reads itself, directly or not, reads an empty value.
    """

    __slots__ = ("ctx", "maps", "values")

    def __init__(self, ctx: RequestContext, maps: Mapping[str, VariableMap]) -> None:
        self.ctx = ctx
        self.maps = maps
        self.values: dict[str, bytes] = {}

    def __bool__(self) -> bool:
        return True

    def get(self, name: str, default: bytes = b"") -> bytes:
        values = self.values
        if name in values:
            return values[name]
        variableMap = self.maps.get(name)
        if variableMap is None:
            return default
        values[name] = b""
        values[name] = value = variableMap.value(self.ctx)
        return value


def contextFor(
    request: RequestHead,
    leg: Any,
    settings: Any,
    uri: bytes | None = None,
    args: bytes | None = None,
    captures: tuple[bytes | None, ...] = (),
) -> RequestContext:
    """
    The variables of C{request}, received on the client C{leg} and answered
    under C{settings} (a location's, or a listener's): the one place a
    L{RequestContext} is made for the request path.  C{uri} and C{args}
    are the router's when it has them; else they are worked out here.
    """
    from .http import HTTPError, forwardedFor
    from .matching import normalizePath, splitTarget

    if uri is None or args is None:
        path, args = splitTarget(request.path)
        try:
            uri = normalizePath(path)
        except HTTPError:
            uri = path
    transport = leg.transport
    block = settings.block
    context = RequestContext(
        request,
        leg.clientAddress,
        getattr(transport.getPeer(), "port", 0),
        getattr(transport.getHost(), "port", 0),
        settings.scheme,
        block.server_name.encode("ascii"),
        uri,
        args,
        forwardedFor(request, leg.clientAddress, settings),
        captures,
        underscores=block.underscores_in_headers,
    )
    maps = getattr(settings, "maps", None)
    if maps:
        context.extra = MapValues(context, maps)
    return context
