# -*- test-case-name: tests.test_matching,tests.test_matching_nginx -*-
"""
nginx's request routing: which C{server} block a C{Host} picks
(C{server_name}), which C{location} a path picks, the path normalisation
both depend on (nginx's C{$uri}), and how C{proxy_pass} with a URI part
rewrites the target sent upstream.

Operators bring nginx configurations; a request must land in the same block
under wsproxy as under nginx, or a rule written for one path (an
authentication C{location}, a C{^~} that shields static files from a regex)
would silently guard another.  So the rules here are nginx's own, read from
its source and checked against a real nginx (C{tests/test_matching_nginx.py}),
quirks included: C{%2F} decodes to a real C{/}, C{%2e} to a real dot, and
C{/ws} is redirected to a proxied C{/ws/} before any regex is tried.

Everything is pure and runs for every request, so the configuration is
compiled once into dictionaries: a host or a path costs a few dictionary
look-ups (one per label or per distinct prefix length), and only the
regular expressions are tried one by one, in file order, as nginx does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .http import HTTPError

__all__ = [
    "LocationMatch",
    "Locations",
    "RoutingError",
    "ServerNames",
    "escapeURI",
    "isComplexPath",
    "isQuotedPath",
    "normalizeHost",
    "normalizePath",
    "parseLocationMatch",
    "replaceURI",
    "splitTarget",
]

T = TypeVar("T")

#: Bytes C{ngx_escape_uri(..., NGX_ESCAPE_URI)} escapes: controls, space,
#: C{"#%<>?\\^`{|}}, DEL and everything above ASCII.
_UNSAFE = re.compile(rb'[\x00-\x20"#%<>?\\^`{|}\x7f-\xff]')
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})?")
#: What makes a path complex (C{isComplexPath}), and what is left to do once it is decoded.
#: (A regex rather than C{in}: C{bytes.__contains__} first tries its argument as an integer.)
_COMPLEX = re.compile(rb"%|/[/.]").search
_SEGMENTS_TO_RESOLVE = re.compile(rb"/[/.]").search
#: A host that is already its own C{$host}: lowercase labels, no port, no trailing dot.
_PLAIN_HOST = re.compile(rb"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*").fullmatch
#: PCRE's C{(?<name>...)}, which Python spells C{(?P<name>...)}; an escaped
#: parenthesis is left alone.
_PCRE_NAMED_GROUP = re.compile(r"(?<!\\)((?:\\\\)*)\(\?<(?=[A-Za-z_])")
_MISSING = object()


class RoutingError(ValueError):
    """A C{server_name} or C{location} nginx would refuse, or that two blocks claim; one line for the user."""


def normalizeHost(host: bytes) -> bytes:
    """
    nginx's C{$host} from a C{Host} value: the port removed (C{[::1]:80}
    gives C{[::1]}), one trailing dot removed, lowercased.  C{b""} (no
    C{Host}) stays C{b""}.

    @raise HTTPError: 400 for what nginx's C{ngx_http_validate_host}
        refuses: two dots in a row, a C{/} or a NUL, or nothing left
        (C{":80"}, C{"."}).
    """
    if not host or _PLAIN_HOST(host) is not None:
        return host
    if host.find(b"..") >= 0 or host.find(b"/") >= 0 or host.find(b"\0") >= 0:
        raise HTTPError(400, "invalid Host header")
    if host[0:1] == b"[":
        end = host.find(b"]")
        length = len(host) if end < 0 else end + 1
    else:
        colon = host.find(b":")
        length = len(host) if colon < 0 else colon
    # nginx remembers the last dot of the whole value, port included.
    if host.rfind(b".") == length - 1:
        length -= 1
    if length <= 0:
        raise HTTPError(400, "invalid Host header")
    return host[:length].lower()


def _compileRegex(pattern: str, caseless: bool, what: str) -> re.Pattern[bytes]:
    """Compile a PCRE-style C{pattern} for matching bytes, or explain in a L{RoutingError}."""
    if not pattern:
        raise RoutingError(f"empty regular expression in {what}")
    try:
        return re.compile(_PCRE_NAMED_GROUP.sub(r"\1(?P<", pattern).encode("utf-8"), re.IGNORECASE if caseless else 0)
    except re.error as e:
        raise RoutingError(f"invalid regular expression in {what}: {e}") from None


class ServerNames(Generic[T]):
    """
    The C{server_name}s of the server blocks that share a listener, compiled
    for L{lookup}.

    Name forms are nginx's: C{example.com} (exact), C{*.example.com}
    (leading wildcard: at least one more label), C{.example.com} (both
    C{example.com} and C{*.example.com}), C{www.example.*} (trailing
    wildcard), C{~regex} (tried caselessly on the host, PCRE's
    C{(?<name>...)} accepted), and C{""}, which a request without a
    C{Host} matches.  C{_} is only a name that no host has.  Names other
    than regexes are compared lowercased.
    """

    def __init__(self, entries: Sequence[tuple[Sequence[str], T]], default: T) -> None:
        """
        @param entries: one pair per server block, in file order: its names
            and the value L{lookup} returns for them.
        @param default: what L{lookup} returns when no name matches (nginx's
            C{default_server}, or the first server block).
        @raise RoutingError: for an invalid name (a C{*} elsewhere than a
            whole first or last label, C{..}, a bad regex), or for a name
            two entries claim, including nginx's conflicts C{.example.com}
            with C{example.com} or C{*.example.com}.
        """
        self.default = default
        self._exact: dict[bytes, T] = {}
        self._leading: dict[bytes, T] = {}
        self._trailing: dict[bytes, T] = {}
        self._regexes: list[tuple[re.Pattern[bytes], T]] = []
        claims: dict[tuple[str, str], tuple[int, str]] = {}

        def claim(kind: str, key: str, index: int, name: str) -> None:
            """Record that entry C{index} has C{name} as C{key}; another entry may not."""
            owner = claims.setdefault((kind, key), (index, name))
            if owner[0] != index:
                other = owner[1]
                clash = f'"{name}"' if other.lower() == name.lower() else f'"{other}" and "{name}"'
                raise RoutingError(f"conflicting server names: {clash} in two server blocks")

        for index, (names, value) in enumerate(entries):
            for name in dict.fromkeys(names):
                if name.startswith("~"):
                    claim("regex", name, index, name)
                    self._regexes.append((_compileRegex(name[1:], True, f'server name "{name}"'), value))
                    continue
                kind, key = _serverNameForm(name)
                encoded = key.encode("utf-8")
                if kind == "exact":
                    claim("exact", key, index, name)
                    self._exact[encoded] = value
                elif kind == "leading":
                    claim("wildcard", key, index, name)
                    self._leading[encoded] = value
                elif kind == "both":
                    claim("exact", key, index, name)
                    claim("wildcard", key, index, name)
                    self._exact[encoded] = value
                    self._leading[encoded] = value
                else:
                    claim("trailing", key, index, name)
                    self._trailing[encoded] = value

    def lookup(self, host: bytes) -> T:
        """
        The value for C{host} (already L{normalizeHost}d), in nginx's order:
        the exact name, then the longest matching leading wildcard, then the
        longest matching trailing wildcard, then the first matching regex in
        file order (never for an empty host), else the default.
        """
        value = self._exact.get(host, _MISSING)
        if value is not _MISSING:
            return value  # type: ignore[return-value]
        if self._leading:
            dot = host.find(b".")
            while dot >= 0:
                value = self._leading.get(host[dot + 1 :], _MISSING)
                if value is not _MISSING:
                    return value  # type: ignore[return-value]
                dot = host.find(b".", dot + 1)
        if self._trailing:
            dot = host.rfind(b".")
            while dot > 0:
                value = self._trailing.get(host[:dot], _MISSING)
                if value is not _MISSING:
                    return value  # type: ignore[return-value]
                dot = host.rfind(b".", 0, dot)
        if host:
            for regex, value in self._regexes:
                if regex.search(host) is not None:
                    return value
        return self.default


def _serverNameForm(name: str) -> tuple[str, str]:
    """
    Classify a non-regex server name as nginx's C{ngx_hash_add_key} does:
    C{("exact", name)}, C{("leading", "example.com")} for
    C{*.example.com}, C{("both", "example.com")} for C{.example.com}, or
    C{("trailing", "www.example")} for C{www.example.*}; lowercased.
    """
    if ".." in name or "\0" in name or name.count("*") > 1:
        raise RoutingError(f'invalid server name or wildcard "{name}"')
    lower = name.lower()
    if len(lower) > 1 and lower[0] == ".":
        if "*" in lower:
            # nginx would take ".example.*" for the special form, with a last label "*" no host has.
            raise RoutingError(f'invalid server name or wildcard "{name}"')
        return "both", lower[1:]
    if len(lower) > 2 and lower[:2] == "*.":
        return "leading", lower[2:]
    if len(lower) > 2 and lower[-2:] == ".*":
        return "trailing", lower[:-2]
    if "*" in lower:
        raise RoutingError(f'invalid server name or wildcard "{name}"')
    return "exact", lower


_MODIFIERS = ("=", "^~", "~", "~*")


def parseLocationMatch(text: str) -> tuple[str, str]:
    """
    Split the argument of a C{location} into its modifier and pattern:
    C{"= /p"} gives C{("=", "/p")}, C{"^~ /p"} C{("^~", "/p")}, C{"~ re"}
    C{("~", "re")}, C{"~* re"} C{("~*", "re")}, C{"/p"} C{("", "/p")},
    C{"@name"} C{("@", "name")}.  As in nginx the modifier may also be
    written against its pattern (C{"=/p"}, C{"~*re"}), and text that does
    not start with a modifier and a space is one pattern (C{"/a b/"}).

    @raise RoutingError: for an unknown modifier, an empty pattern, or an
        exact or prefix pattern that does not start with C{/}.
    """
    parts = text.split(None, 1)
    if len(parts) == 2 and parts[0] in _MODIFIERS:
        modifier, pattern = parts
    elif text.startswith("@"):
        modifier, pattern = "@", text[1:]
    elif text.startswith(("^~", "~*")):
        modifier, pattern = text[:2], text[2:]
    elif text.startswith(("=", "~")):
        modifier, pattern = text[:1], text[1:]
    else:
        modifier, pattern = "", text
    if not pattern:
        raise RoutingError(f'location "{text}" has no pattern')
    if modifier in ("", "=", "^~") and not pattern.startswith("/"):
        raise RoutingError(f'invalid location "{text}": a prefix or exact location starts with "/"')
    return modifier, pattern


@dataclass(frozen=True, slots=True)
class LocationMatch(Generic[T]):
    """
    The C{location} a path selected.

    @ivar value: what the caller attached to the location.
    @ivar modifier: C{"="}, C{"^~"}, C{""} (prefix), C{"~"}, C{"~*"} or C{"@"}.
    @ivar prefix: the exact or prefix location's name, which C{proxy_pass}
        with a URI replaces (L{replaceURI}); C{None} for a regex.
    @ivar captures: a regex location's groups, nginx's C{$1}..C{$9} (C{None}
        for a group that did not take part); C{()} otherwise.
    @ivar redirectSlash: nginx answers C{301} instead of serving the
        request, with a C{Location} of L{escapeURI}C{(prefix)} plus
        C{?args} if there are any: the path was the location's name without
        its final C{/}, and the location is proxied (see
        L{Locations.lookup}).
    """

    value: T
    modifier: str
    prefix: bytes | None
    captures: tuple[bytes | None, ...]
    redirectSlash: bool = False


class Locations(Generic[T]):
    """
    The C{location} blocks of one server block, compiled for L{lookup}:
    exact names in one dictionary, prefixes in one dictionary per distinct
    length (longest first), regexes in file order, named locations apart.
    """

    def __init__(self, entries: Sequence[tuple[str, T, bool]]) -> None:
        """
        @param entries: in file order, each location's argument (see
            L{parseLocationMatch}), its value, and whether nginx would
            redirect to it (C{auto_redirect}: set for a location whose name
            ends with C{/} and that C{proxy_pass} handles; ignored for
            regex and named locations).
        @raise RoutingError: for an invalid argument or regex, or the same
            location twice (C{"/p"} and C{"^~ /p"} are the same prefix, as
            in nginx; C{"= /p"} and C{"/p"} may coexist).
        """
        self._exact: dict[bytes, LocationMatch[T]] = {}
        prefixes: dict[bytes, LocationMatch[T]] = {}
        redirecting: dict[bytes, LocationMatch[T]] = {}
        self._regexes: list[tuple[re.Pattern[bytes], T, str]] = []
        self._named: dict[str, T] = {}
        seen: set[tuple[str, str]] = set()
        for text, value, autoRedirect in entries:
            modifier, pattern = parseLocationMatch(text)
            kind = "" if modifier == "^~" else modifier
            if (kind, pattern) in seen:
                shown = f"@{pattern}" if modifier == "@" else pattern
                raise RoutingError(f'duplicate location "{shown}"')
            seen.add((kind, pattern))
            if modifier == "@":
                self._named[pattern] = value
                continue
            if modifier in ("~", "~*"):
                regex = _compileRegex(pattern, modifier == "~*", f'location "{text}"')
                self._regexes.append((regex, value, modifier))
                continue
            name = pattern.encode("utf-8")
            match = LocationMatch(value, modifier, name, ())
            if modifier == "=":
                self._exact[name] = match
                if autoRedirect and name.endswith(b"/"):
                    redirecting[name] = match
            else:
                prefixes[name] = match
                if autoRedirect and name.endswith(b"/"):
                    redirecting.setdefault(name, match)
        self._redirects: dict[bytes, LocationMatch[T]] = {}
        for name, target in redirecting.items():
            path = name[:-1]
            if path in prefixes or path in self._exact:
                # nginx stops at the location named exactly like the path.
                continue
            # With both "= /p/" and "/p/", nginx's tree node redirects with the exact one.
            chosen = self._exact.get(name, target)
            self._redirects[path] = LocationMatch(chosen.value, chosen.modifier, name, (), True)
        byLength: dict[int, dict[bytes, LocationMatch[T]]] = {}
        for name, match in prefixes.items():
            byLength.setdefault(len(name), {})[name] = match
        self._prefixes = sorted(byLength.items(), reverse=True)

    def lookup(self, path: bytes) -> LocationMatch[T] | None:
        """
        The location for C{path} (a normalised C{$uri}), as nginx's
        C{ngx_http_core_find_location} picks it:

          1. an exact (C{=}) location named C{path} wins at once;
          2. else, if a proxied exact or prefix location is named C{path}
             plus C{/} and no prefix location is named C{path}, its match
             with C{redirectSlash} set (nginx's 301), before any regex;
          3. else the longest prefix is remembered; if it is C{^~} it wins;
          4. else the regexes are tried in file order and the first match
             wins, with its captures;
          5. else the longest prefix, or C{None} if no location matches.
        """
        match = self._exact.get(path)
        if match is not None:
            return match
        if self._redirects:
            match = self._redirects.get(path)
            if match is not None:
                return match
        size = len(path)
        for length, names in self._prefixes:
            if length <= size:
                match = names.get(path[:length])
                if match is not None:
                    if match.modifier == "^~":
                        return match
                    break
        for regex, value, modifier in self._regexes:
            found = regex.search(path)
            if found is not None:
                return LocationMatch(value, modifier, None, found.groups())
        return match

    def named(self, name: str) -> T | None:
        """The value of the named location C{@name} (C{name} given with or without its C{@}), or C{None}."""
        return self._named.get(name[1:] if name.startswith("@") else name)


def isComplexPath(path: bytes) -> bool:
    """
    Whether nginx would run C{ngx_http_parse_complex_uri} on C{path} (its
    C{complex_uri} or C{quoted_uri}): it holds a C{%}, C{//} or C{/.}.  Any
    other path is its own L{normalizePath}.
    """
    return _COMPLEX(path) is not None


def isQuotedPath(path: bytes) -> bool:
    """
    nginx's C{r->quoted_uri} for the path part of a request target: it holds
    a C{%}.  Then C{proxy_pass} with a URI sends the rest of the path
    L{escapeURI}d (the C{quoted} argument of L{replaceURI}).
    """
    return path.find(b"%") >= 0


def splitTarget(target: bytes) -> tuple[bytes, bytes]:
    """
    An origin-form request target as C{(path, args)}: C{args} is what
    follows the first C{?}, without it (C{b""} if none); a fragment is
    dropped.
    """
    if target.find(b"#") >= 0:
        target = target.partition(b"#")[0]
    path, _, args = target.partition(b"?")
    return path, args


def _decode(match: re.Match[bytes]) -> bytes:
    """One %-escape of a request path, decoded; nginx refuses a bad one and an encoded NUL."""
    digits = match.group(1)
    if digits is None:
        raise HTTPError(400, "a bad %-escape in the request path")
    byte = int(digits, 16)
    if byte == 0:
        raise HTTPError(400, "an encoded NUL in the request path")
    return bytes((byte,))


def normalizePath(path: bytes) -> bytes:
    """
    nginx's C{$uri} for the path part of a request target
    (C{ngx_http_parse_complex_uri} with C{merge_slashes on}): %-escapes
    decoded, C{//} merged, C{.} and C{..} segments resolved.

    A decoded C{/} or C{.} counts as a real one (C{/a%2F..%2Fb} is C{/b});
    a decoded C{%}, C{?} or C{#} is an ordinary character.  A path that
    needs none of this (L{isComplexPath} is false) is returned as it is.

    @raise HTTPError: 400 for a path that does not start with C{/}, a
        C{%} not followed by two hex digits, an encoded NUL, or a C{..}
        that climbs above the root.
    """
    if path[:1] != b"/":
        raise HTTPError(400, "the request path does not start with /")
    if _COMPLEX(path) is None:
        return path
    if path.find(b"%") >= 0:
        path = _ESCAPE.sub(_decode, path)
        if _SEGMENTS_TO_RESOLVE(path) is None:
            return path
    segments = path.split(b"/")
    kept: list[bytes] = []
    for segment in segments[1:]:
        if segment == b"" or segment == b".":
            continue
        if segment == b"..":
            if not kept:
                raise HTTPError(400, "the request path climbs above the root")
            kept.pop()
            continue
        kept.append(segment)
    # A path ending in a directory ("/a/", "/a/.", "/a/b/..") keeps its slash.
    trailing = b"/" if kept and segments[-1] in (b"", b".", b"..") else b""
    return b"/" + b"/".join(kept) + trailing


def escapeURI(uri: bytes) -> bytes:
    """
    C{ngx_escape_uri(..., NGX_ESCAPE_URI)}: what nginx %-escapes (uppercase
    hex) in a decoded URI it sends upstream: controls, space,
    C{"#%<>?\\^`{|}}, DEL and bytes above ASCII.
    """
    if _UNSAFE.search(uri) is None:
        return uri
    return _UNSAFE.sub(lambda match: b"%%%02X" % match.group()[0], uri)


def replaceURI(uri: bytes, args: bytes, prefix: bytes, replacement: bytes, quoted: bool) -> bytes:
    """
    The target C{proxy_pass} with a URI part sends upstream: the location's
    name C{prefix} at the start of the normalised C{uri} is replaced by
    C{replacement}, the rest is L{escapeURI}d if the client's path was
    C{quoted} (L{isQuotedPath}) and copied as it is otherwise, then
    C{?args} follows if there are any.
    """
    rest = uri[len(prefix) :]
    if quoted:
        rest = escapeURI(rest)
    target = replacement + rest
    if args:
        target += b"?" + args
    return target
