# -*- test-case-name: tests.test_nginxconf -*-
"""
An nginx configuration, converted: C{wsproxy-from-nginx FILE} and
C{twistd wsproxy --config nginx.conf}.

The people wsproxy is for already have an nginx.conf.  Rewriting it by hand
in TOML, key by key, loses things silently; this module reads it with
C{crossplane} (nginx's own grammar, includes followed as nginx follows
them) and accounts for every directive in a report of four kinds:

  - I{converted}: it became a wsproxy key (named in the report, and the
    TOML names the C{file:line} of every key it writes);
  - I{not needed}: it describes what wsproxy does anyway
    (C{proxy_http_version 1.1}, the upgrade headers, C{sendfile});
  - I{approximated}: it became something close, and the report says what
    differs;
  - I{unsupported}: it was skipped.  An unsupported directive that changes
    what a client receives (a C{rewrite} that cannot be expressed with
    locations, an C{if}, C{auth_basic}, C{limit_req}, C{proxy_cache}) is
    I{blocking}: the conversion is refused unless the operator accepts it.

nginx's meaning is kept where wsproxy's defaults differ from it:
C{add_header}, C{proxy_set_header} and C{proxy_hide_header} are replaced
at each level that sets any in nginx but merged in wsproxy, so each
location gets nginx's effective list and the server gets none; a location
upgrades WebSockets only where nginx would forward the handshake; and
where nginx's defaults differ from wsproxy's (C{client_max_body_size 1m},
C{proxy_connect_timeout 60s}, the C{Host} nginx sends) the value nginx
would use is written.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, looksLikeNginx
from .variables import VariableError, compileTemplate

__all__ = [
    "Conversion",
    "ConversionRefused",
    "Entry",
    "convertFile",
    "formatReport",
    "looksLikeNginx",
    "main",
    "printReport",
]

#: The kinds of report entries, in the order a report lists them.
KINDS = ("converted", "not needed", "approximated", "unsupported")


@dataclass(frozen=True)
class Entry:
    """
    What became of one nginx directive.

    @ivar kind: one of L{KINDS}.
    @ivar directive: the directive as written, without its block
        (C{"proxy_set_header Upgrade $http_upgrade"}).
    @ivar detail: the key it became, why it is not needed, what differs,
        or why it is unsupported.
    @ivar affectsClients: for an unsupported directive, whether skipping
        it changes what a client receives; such entries stop a run.
    """

    kind: str
    directive: str
    file: str
    line: int
    detail: str
    affectsClients: bool = False

    @property
    def where(self) -> str:
        """C{file:line}."""
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Conversion:
    """
    An nginx configuration converted: the wsproxy configuration document,
    the report of every directive, and the TOML text of the document.
    """

    document: dict[str, Any]
    report: tuple[Entry, ...]
    toml: str

    @property
    def blocking(self) -> tuple[Entry, ...]:
        """The unsupported entries that change what a client receives."""
        return tuple(e for e in self.report if e.kind == "unsupported" and e.affectsClients)


class ConversionRefused(Exception):
    """
    A conversion has blocking entries and they were not accepted.

    @ivar entries: the blocking entries.
    """

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = tuple(entries)
        lines = [f"{len(self.entries)} unsupported directive(s) change what clients receive:"]
        lines += [f"  {e.where}: {e.directive}: {e.detail}" for e in self.entries]
        super().__init__("\n".join(lines))


# Reading


@dataclass(eq=False)
class _Directive:
    """One nginx directive as crossplane read it, with includes spliced in."""

    name: str
    args: list[str]
    file: str
    line: int
    block: list[_Directive] | None = None
    includes: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def text(self) -> str:
        words = [self.name if self.name else "''"] + [_quoted(arg) for arg in self.args]
        return " ".join(words)

    def walk(self) -> Iterable[_Directive]:
        yield self
        for child in self.block or ():
            yield from child.walk()


def _quoted(arg: str) -> str:
    if arg and not re.search(r"[\s;{}\"'#]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read(path: str) -> list[_Directive]:
    """
    Parse C{path} with crossplane, following C{include} (globs, relative to
    the main file's directory, as nginx resolves them against its prefix):
    an include's directives follow it in the block that includes it.

    @raise ConfigError: where nginx would refuse the file too.
    """
    import crossplane  # type: ignore[import-untyped]

    payload = crossplane.parse(path, catch_errors=True, check_ctx=False, check_args=True, comments=False)
    for error in payload["errors"]:
        raise ConfigError(f"{error['file']}:{error.get('line') or 0}", "(nginx syntax)", error["error"])
    configs = payload["config"]

    def build(items: list[dict[str, Any]], file: str) -> list[_Directive]:
        result = []
        for item in items:
            if item["directive"] == "#":
                continue  # a comment crossplane read inside a statement
            directive = _Directive(item["directive"], list(item["args"]), file, item["line"])
            if "block" in item:
                directive.block = build(item["block"], file)
            result.append(directive)
            for index in item.get("includes", ()):
                included = configs[index]
                directive.includes.append(included["file"])
                result.extend(build(included["parsed"], included["file"]))
        return result

    return build(configs[0]["parsed"], configs[0]["file"])


# nginx values


_NGINX_TIME = re.compile(r"(\d+)(ms|s|m|h|d|w|M|y)?")
_NGINX_TIME_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NGINX_TIME_UNITS.update({"M": 2592000, "y": 31536000})
_NGINX_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")


def _seconds(text: str) -> float | int:
    """An nginx time (C{"1h30m"}, C{"500ms"}, C{"75"}) in seconds; an int when whole."""
    position, total = 0, 0.0
    for match in _NGINX_TIME.finditer(text):
        if match.start() != position:
            break
        total += int(match.group(1)) * _NGINX_TIME_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"not an nginx time: {text!r}")
    return int(total) if total == int(total) else total


def _bytes(text: str) -> int:
    match = _NGINX_SIZE.match(text)
    if match is None:
        raise ValueError(f"not an nginx size: {text!r}")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]


_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _variables(text: str) -> list[str]:
    return [name.lower() for name in _VARIABLE.findall(text)]


# The wsproxy document, with the source of every key


class _Table:
    """
    A TOML table being written: keys in order, each with the C{file:line}
    it comes from; dotted keys (C{("add_header", "X-Frame-Options")}) make
    one line per header so that each names its own source.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[str, ...], tuple[Any, str]] = {}
        self.locations: list[_Table] = []

    def set(self, key: str | tuple[str, ...], value: Any, source: str) -> None:
        path = (key,) if isinstance(key, str) else key
        self.items[path] = (value, source)

    def get(self, key: str, default: Any = None) -> Any:
        item = self.items.get((key,))
        return default if item is None else item[0]

    def document(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for path, (value, _) in self.items.items():
            target = result
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = value
        if self.locations:
            result["location"] = [location.document() for location in self.locations]
        return result

    def lines(self) -> list[str]:
        return [
            f"{'.'.join(_tomlKey(p) for p in path)} = {_tomlValue(v)}  # {s}" for path, (v, s) in self.items.items()
        ]


def _tomlKey(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _tomlValue(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_tomlValue(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


# Scopes: nginx's inheritance


class _Scope:
    """
    The simple directives of one nginx block (C{http}, C{server},
    C{location}) over its parent's, inherited as nginx inherits them.
    """

    def __init__(self, parent: _Scope | None, directives: Iterable[_Directive]) -> None:
        self.parent = parent
        self.own: dict[str, list[_Directive]] = {}
        for directive in directives:
            if directive.block is None:
                self.own.setdefault(directive.name, []).append(directive)

    def last(self, name: str) -> _Directive | None:
        """The directive in force: this block's last, else the parent's."""
        if name in self.own:
            return self.own[name][-1]
        return self.parent.last(name) if self.parent else None

    def array(self, name: str) -> list[_Directive]:
        """
        An array directive (C{add_header}, C{proxy_set_header}...): this
        block's own if it has any, else the parent's, as nginx replaces them.
        """
        if name in self.own:
            return self.own[name]
        return self.parent.array(name) if self.parent else []


# What each directive is, where no code is needed to say it


_NOT_NEEDED = {
    "worker_connections": "wsproxy's reactor has no fixed connection table",
    "use": "Twisted picks the best event mechanism (epoll)",
    "multi_accept": "wsproxy's listeners accept what is pending",
    "accept_mutex": "each worker has its own listening sockets",
    "accept_mutex_delay": "each worker has its own listening sockets",
    "worker_rlimit_nofile": "file limits are the service manager's (ulimit)",
    "worker_cpu_affinity": "the scheduler places the workers",
    "worker_priority": "the service manager sets priorities",
    "pcre_jit": "Python's re compiles each regex once",
    "timer_resolution": "the reactor's timers are exact enough",
    "daemon": "twistd daemonizes unless -n",
    "master_process": "twistd is the master when workers > 1",
    "thread_pool": "wsproxy reads files without threads",
    "sendfile": "wsproxy streams files under flow control",
    "tcp_nopush": "wsproxy writes whole heads and chunks",
    "tcp_nodelay": "wsproxy sets TCP_NODELAY",
    "types_hash_max_size": "Python dictionaries need no sizing",
    "types_hash_bucket_size": "Python dictionaries need no sizing",
    "server_names_hash_bucket_size": "Python dictionaries need no sizing",
    "server_names_hash_max_size": "Python dictionaries need no sizing",
    "variables_hash_max_size": "Python dictionaries need no sizing",
    "variables_hash_bucket_size": "Python dictionaries need no sizing",
    "map_hash_bucket_size": "Python dictionaries need no sizing",
    "map_hash_max_size": "Python dictionaries need no sizing",
    "proxy_headers_hash_max_size": "Python dictionaries need no sizing",
    "proxy_headers_hash_bucket_size": "Python dictionaries need no sizing",
    "proxy_buffering": "wsproxy streams responses under flow control",
    "proxy_buffers": "wsproxy streams responses under flow control",
    "proxy_buffer_size": "wsproxy streams responses under flow control",
    "proxy_busy_buffers_size": "wsproxy streams responses under flow control",
    "proxy_request_buffering": "wsproxy streams request bodies under flow control",
    "proxy_max_temp_file_size": "wsproxy keeps no temporary files",
    "proxy_temp_file_write_size": "wsproxy keeps no temporary files",
    "proxy_temp_path": "wsproxy keeps no temporary files",
    "client_body_temp_path": "wsproxy keeps no temporary files",
    "client_body_buffer_size": "wsproxy streams request bodies",
    "client_header_buffer_size": "the header limits are max_request_line and max_header_size",
    "output_buffers": "wsproxy streams under flow control",
    "postpone_output": "wsproxy streams under flow control",
    "open_file_cache": "wsproxy opens each file it serves",
    "open_file_cache_valid": "wsproxy opens each file it serves",
    "open_file_cache_min_uses": "wsproxy opens each file it serves",
    "open_file_cache_errors": "wsproxy opens each file it serves",
    "open_log_file_cache": "wsproxy logs through twistd",
    "aio": "wsproxy reads files without threads",
    "directio": "wsproxy reads files without threads",
    "reset_timedout_connection": "wsproxy aborts timed-out connections",
    "lingering_close": "wsproxy closes after the answer is written",
    "lingering_time": "wsproxy closes after the answer is written",
    "lingering_timeout": "wsproxy closes after the answer is written",
    "keepalive_requests": "wsproxy keeps a connection for any number of requests",
    "keepalive_time": "wsproxy keeps a connection until idle",
    "resolver_timeout": "the system resolver's timeouts apply",
    "proxy_socket_keepalive": "wsproxy's idle limits end dead tunnels",
    "ssl_buffer_size": "wsproxy writes what it has",
    "http2_max_concurrent_streams": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "http2_body_preread_size": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "http2_chunk_size": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "http2_idle_timeout": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "http2_max_field_size": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "http2_max_header_size": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "http2_recv_buffer_size": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "http2_push_preload": "HTTP/2 settings (wsproxy speaks HTTP/1.1)",
    "gzip_types": "follows gzip",
    "gzip_vary": "follows gzip",
    "gzip_proxied": "follows gzip",
    "gzip_comp_level": "follows gzip",
    "gzip_buffers": "follows gzip",
    "gzip_http_version": "follows gzip",
    "gzip_min_length": "follows gzip",
    "gzip_disable": "follows gzip",
    "limit_conn_zone": "read by the limit_conn that uses it",
    "auth_basic_user_file": "follows auth_basic",
    "limit_req_zone": "read by the limit_req that uses it",
    "limit_req_status": "follows limit_req",
    "limit_req_log_level": "follows limit_req",
    "proxy_cache_path": "follows proxy_cache",
    "proxy_cache_key": "follows proxy_cache",
    "proxy_cache_valid": "follows proxy_cache",
    "proxy_cache_bypass": "follows proxy_cache",
    "proxy_no_cache": "follows proxy_cache",
    "proxy_cache_use_stale": "follows proxy_cache",
    "proxy_cache_lock": "follows proxy_cache",
    "proxy_cache_methods": "follows proxy_cache",
    "proxy_cache_min_uses": "follows proxy_cache",
    "proxy_cache_revalidate": "follows proxy_cache",
    "proxy_cache_background_update": "follows proxy_cache",
    "fastcgi_param": "follows fastcgi_pass",
    "fastcgi_index": "follows fastcgi_pass",
    "fastcgi_split_path_info": "follows fastcgi_pass",
    "uwsgi_param": "follows uwsgi_pass",
    "scgi_param": "follows scgi_pass",
    "sub_filter_once": "follows sub_filter",
    "sub_filter_types": "follows sub_filter",
    "ssl_stapling_verify": "follows ssl_stapling",
    "ssi_types": "follows ssi",
    "ssi_silent_errors": "follows ssi",
}

_APPROXIMATED = {
    "user": "twistd --uid/--gid set the user (give them on the command line)",
    "pid": "twistd --pidfile sets the PID file (give it on the command line)",
    "error_log": "wsproxy logs errors to twistd's log (twistd --logfile)",
    "log_format": "wsproxy logs to twistd's log in its own format",
    "default_type": "wsproxy answers application/octet-stream for an unknown extension",
    "server_tokens": "wsproxy's Server header is its own",
    "ssl_session_tickets": "OpenSSL's ticket default applies",
    "ssl_dhparam": "wsproxy uses ECDHE; finite-field DH groups are OpenSSL's",
    "ssl_ecdh_curve": "OpenSSL's default curves apply",
    "ssl_stapling": "no OCSP stapling: clients check revocation themselves",
    "ssl_trusted_certificate": "no OCSP stapling: the chain comes from ssl_certificate",
    "ssl_early_data": "no TLS 1.3 early data: clients send after the handshake",
    "ssl_conf_command": "OpenSSL's defaults apply",
    "http2": "wsproxy speaks HTTP/1.1 (ALPN selects it; clients fall back)",
    "ignore_invalid_headers": "wsproxy refuses malformed header lines",
    "proxy_http_version": "wsproxy speaks HTTP/1.1 to upstreams",
    "proxy_ignore_client_abort": "wsproxy closes the upstream exchange when the client leaves",
    "proxy_pass_header": "wsproxy passes the upstream's headers as they are, except hop-by-hop",
    "proxy_ssl_server_name": "wsproxy always sends the upstream's name in SNI",
    "proxy_ssl_protocols": "OpenSSL's client defaults apply",
    "proxy_ssl_ciphers": "OpenSSL's client defaults apply",
    "proxy_ssl_session_reuse": "wsproxy's own TLS session handling applies",
    "charset": "no charset is added to Content-Type",
    "source_charset": "no charset conversion",
    "keepalive_disable": "wsproxy keeps connections alive for every client",
    "limit_conn_log_level": "wsproxy logs refused connections at its own level",
    "limit_conn_status": "wsproxy closes an extra connection instead of answering",
    "limit_rate": "no rate limit on responses",
    "limit_rate_after": "no rate limit on responses",
    "send_lowat": "wsproxy writes what it has",
    "satisfy": "follows allow/deny and auth directives",
    "log_not_found": "wsproxy logs its own way",
    "log_subrequest": "wsproxy makes no subrequests",
    "etag": "wsproxy always sends ETag for files",
    "if_modified_since": "wsproxy answers If-Modified-Since exactly",
    "msie_padding": "no padding for old browsers",
    "recursive_error_pages": "wsproxy follows error_page at most 10 times",
    "real_ip_recursive": "wsproxy walks X-Forwarded-For through set_real_ip_from",
    "server_name_in_redirect": "wsproxy builds redirects from the Host",
    "chunked_transfer_encoding": "wsproxy chunks bodies of unknown length",
    "http2_push": "no HTTP/2 server push",
    "quic_retry": "no HTTP/3",
    "http3": "no HTTP/3: clients use HTTP/1.1 over TLS",
    "proxy_next_upstream_tries": "wsproxy tries each server of the pool at most once",
    "proxy_next_upstream_timeout": "wsproxy's connect timeout bounds each try",
}

_UNSUPPORTED_TUNING = {
    "load_module": "wsproxy loads no modules; what they add is reported where it is used",
    "env": "environment variables are the service manager's",
    "lock_file": "wsproxy takes no lock files",
    "working_directory": "twistd --rundir sets it",
    "ssl_password_file": "keys must not be encrypted",
    "gzip": "responses are sent uncompressed; clients decode the same content",
    "gzip_static": "the uncompressed file is sent; clients decode the same content",
    "brotli": "responses are sent uncompressed; clients decode the same content",
    "proxy_ignore_headers": "wsproxy reads no X-Accel-* headers",
    "sendfile_max_chunk": "wsproxy streams under flow control",
    "proxy_limit_rate": "no rate limit on responses",
    "debug_connection": "wsproxy has no per-client debug log",
    "status_zone": "no status zones",
}

_UNSUPPORTED_CLIENTS = {
    "if": "nginx's if has no wsproxy equivalent",
    "try_files": "try_files on a server, which nginx applies where no location matches",
    "set": "wsproxy has no variables of its own making",
    "auth_basic": "no HTTP authentication: the location would be open",
    "auth_request": "no authentication subrequests: the location would be open",
    "auth_jwt": "no JWT validation: the location would be open",
    "allow": "no address access lists: the location would be open",
    "deny": "no address access lists: the location would be open",
    "limit_req": "no request rate limit (nginx answers 503 above it)",
    "limit_except": "no per-method limits",
    "proxy_cache": "no response cache",
    "proxy_intercept_errors": "upstream errors are passed on, not replaced by error_page",
    "proxy_cookie_path": "Set-Cookie paths are passed on unchanged",
    "proxy_cookie_domain": "Set-Cookie domains are passed on unchanged",
    "proxy_cookie_flags": "Set-Cookie flags are passed on unchanged",
    "proxy_method": "the client's method goes upstream",
    "proxy_set_body": "the client's body goes upstream",
    "proxy_pass_request_body": "the client's body goes upstream",
    "proxy_pass_request_headers": "the client's headers go upstream",
    "proxy_ssl_certificate": "no client certificate to upstreams: they would refuse",
    "proxy_ssl_certificate_key": "no client certificate to upstreams: they would refuse",
    "proxy_store": "no response store",
    "sub_filter": "responses are passed on unchanged",
    "ssi": "no server-side includes",
    "autoindex": "no directory listings (wsproxy answers 403)",
    "stub_status": "no status page",
    "fastcgi_pass": "wsproxy speaks HTTP to upstreams, not FastCGI",
    "uwsgi_pass": "wsproxy speaks HTTP to upstreams, not uwsgi",
    "scgi_pass": "wsproxy speaks HTTP to upstreams, not SCGI",
    "grpc_pass": "no gRPC proxying",
    "memcached_pass": "no memcached handler",
    "mirror": "no request mirroring",
    "ssl_client_certificate": "no client certificate verification",
    "ssl_verify_client": "no client certificate verification",
    "ssl_verify_depth": "no client certificate verification",
    "secure_link": "no secure links",
    "secure_link_md5": "no secure links",
    "valid_referers": "no referer checks",
    "add_trailer": "no trailers are added",
    "merge_slashes": "wsproxy always merges slashes, as nginx's default",
    "absolute_redirect": "wsproxy's redirects are absolute, as nginx's default",
    "port_in_redirect": "wsproxy's redirects keep the port, as nginx's default",
    "more_set_headers": "headers-more is not available",
    "more_clear_headers": "headers-more is not available",
    "perl": "no embedded Perl",
    "js_content": "no njs",
    "lua_need_request_body": "no Lua",
    "content_by_lua_block": "no Lua",
    "access_by_lua_block": "no Lua",
    "split_clients": "no split clients",
    "geo": "no geo variables",
    "empty_gif": "no built-in GIF",
    "mp4": "no pseudo-streaming",
    "flv": "no pseudo-streaming",
    "image_filter": "no image filter",
    "xslt_stylesheet": "no XSLT",
    "addition_types": "no additions",
    "add_before_body": "no additions",
    "add_after_body": "no additions",
    "stream": "wsproxy proxies HTTP, not raw TCP/UDP",
    "mail": "wsproxy proxies HTTP, not mail",
}

#: Directive arguments that keep nginx's default, and so change nothing.
_DEFAULT_OFF = {
    "proxy_cache": "off",
    "proxy_intercept_errors": "off",
    "auth_basic": "off",
    "autoindex": "off",
    "ssi": "off",
    "proxy_pass_request_body": "on",
    "proxy_pass_request_headers": "on",
    "merge_slashes": "on",
    "absolute_redirect": "on",
    "port_in_redirect": "on",
    "proxy_cookie_path": "off",
    "proxy_cookie_domain": "off",
    "gzip": "off",
    "proxy_ignore_client_abort": "off",
    "server_name_in_redirect": "off",
    "ssl_stapling": "off",
    "ssl_early_data": "off",
    "chunked_transfer_encoding": "on",
    "ignore_invalid_headers": "on",
    "log_not_found": "on",
    "http2": "off",
    "proxy_ssl_server_name": "on",
    "charset": "off",
}

#: Directives read when the servers and locations are built (their entries are made here).
_SCOPE_KEYS = {
    "proxy_read_timeout",
    "proxy_send_timeout",
    "proxy_connect_timeout",
    "send_timeout",
    "client_body_timeout",
    "client_header_timeout",
    "keepalive_timeout",
    "client_max_body_size",
    "large_client_header_buffers",
    "root",
    "index",
    "access_log",
    "underscores_in_headers",
    "set_real_ip_from",
    "real_ip_header",
    "ssl_certificate",
    "ssl_certificate_key",
    "ssl_protocols",
    "ssl_ciphers",
    "ssl_prefer_server_ciphers",
    "ssl_session_cache",
    "ssl_session_timeout",
    "ssl",
    "add_header",
    "proxy_set_header",
    "proxy_hide_header",
    "error_page",
    "proxy_redirect",
    "expires",
    "limit_conn",
    "proxy_next_upstream",
    "proxy_ssl_verify",
    "proxy_ssl_trusted_certificate",
    "proxy_ssl_name",
    "resolver",
}

#: The TLS keys a server takes from its scope.
_REQUEST_TIMEOUTS = (
    "proxy_read_timeout",
    "proxy_send_timeout",
    "send_timeout",
    "client_body_timeout",
)
_UPGRADE_CONNECTION = {"upgrade", "$http_connection"}


class _Converter:
    """
    One conversion: walks the parsed tree once, making a report entry for
    each directive and the tables of the wsproxy document.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, Entry]] = {}
        self.sequence: dict[int, int] = {}
        self.top = _Table()
        self.upstreams: dict[str, _Table] = {}
        self.upstreamSources: dict[str, _Directive] = {}
        self.servers: list[_Table] = []
        self.maps: dict[str, _Directive] = {}
        self.idiomMaps: set[str] = set()
        #: Maps wsproxy's C{[map.NAME]} can say (no C{hostnames}, no C{include}).
        self.convertibleMaps: set[str] = set()
        self.mapTables: dict[str, _Table] = {}
        self.usedMaps: set[str] = set()
        self.limitZones: dict[str, str] = {}
        self.listens: list[tuple[str, _Directive]] = []

    # Report

    def report(self, directive: _Directive, kind: str, detail: str, affects: bool = False, again: bool = False) -> None:
        if id(directive) in self.entries and not again:
            return
        entry = Entry(kind, directive.text, directive.file, directive.line, detail, affects and kind == "unsupported")
        self.entries[id(directive)] = (self.sequence.get(id(directive), 0), entry)

    def reportInside(self, block: Iterable[_Directive], why: str) -> None:
        for directive in block:
            for inner in directive.walk():
                self.report(inner, "unsupported", why)

    def finish(self, tree: list[_Directive]) -> tuple[Entry, ...]:
        for top in tree:
            for directive in top.walk():
                if directive.name in ("add_header", "proxy_set_header"):
                    self.report(
                        directive, "not needed", "no location inherits it (nginx replaces the list where one is set)"
                    )
                self.report(directive, "unsupported", "wsproxy does not know this directive", affects=True)
        ordered = sorted(self.entries.values(), key=lambda item: (KINDS.index(item[1].kind), item[0]))
        return tuple(entry for _, entry in ordered)

    # Main context

    def convert(self, tree: list[_Directive]) -> None:
        for number, directive in enumerate(d for top in tree for d in top.walk()):
            self.sequence[id(directive)] = number
        for directive in tree:
            self.include(directive)
            name = directive.name
            if name == "events":
                self.report(directive, "not needed", "the reactor needs no event settings")
                for child in directive.block or ():
                    self.include(child) or self.simple(child)
            elif name == "http":
                self.report(directive, "converted", "its upstreams and servers: [upstream.NAME] and [[server]]")
                self.http(directive)
            elif name == "worker_processes":
                arg = directive.args[0] if directive.args else "1"
                count = os.cpu_count() or 1 if arg == "auto" else int(arg) if arg.isdigit() else 1
                self.top.set("workers", max(count, 1), directive.where)
                note = f" (auto: this machine's {count} cores, fixed in the file)" if arg == "auto" else ""
                self.report(directive, "converted", f"workers = {max(count, 1)}{note}")
            elif name == "worker_shutdown_timeout" and directive.args:
                self.top.set("shutdown_timeout", _seconds(directive.args[0]), directive.where)
                self.report(directive, "converted", f"shutdown_timeout = {_seconds(directive.args[0])}")
            else:
                self.simple(directive)

    def include(self, directive: _Directive) -> bool:
        if directive.name != "include":
            return False
        if directive.includes:
            self.report(directive, "converted", "read in place: " + ", ".join(directive.includes))
        else:
            self.report(directive, "not needed", "it matches no file")
        return True

    def simple(self, directive: _Directive) -> None:
        """A directive whose entry depends on its name (and arguments) only."""
        name, args = directive.name, directive.args
        if name == "allow" and args == ["all"]:
            self.report(directive, "not needed", "it lets every client in, as wsproxy does")
        elif name == "proxy_http_version" and args == ["1.1"]:
            self.report(directive, "not needed", "wsproxy speaks HTTP/1.1 to upstreams")
        elif name in _DEFAULT_OFF and args and args[0].lower() == _DEFAULT_OFF[name]:
            self.report(directive, "not needed", f"{args[0]} is nginx's default, and wsproxy's behaviour")
        elif name in _NOT_NEEDED:
            self.report(directive, "not needed", _NOT_NEEDED[name])
        elif name in _APPROXIMATED:
            self.report(directive, "approximated", _APPROXIMATED[name])
        elif name in _UNSUPPORTED_TUNING and _UNSUPPORTED_TUNING[name]:
            self.report(directive, "unsupported", _UNSUPPORTED_TUNING[name])
        elif name in _UNSUPPORTED_CLIENTS:
            self.report(directive, "unsupported", _UNSUPPORTED_CLIENTS[name], affects=True)
            if directive.block:
                self.reportInside(directive.block, f"inside {name} ({directive.where})")
        elif directive.block is not None:
            self.report(directive, "unsupported", f"wsproxy does not know the block {name}", affects=True)
            self.reportInside(directive.block, f"inside {name} ({directive.where})")

    # http

    def http(self, http: _Directive) -> None:
        block = http.block or []
        scope = _Scope(None, block)
        for directive in block:
            if directive.name == "limit_conn_zone" and len(directive.args) >= 2:
                zone = next((a[5:].split(":")[0] for a in directive.args if a.startswith("zone=")), "")
                self.limitZones[zone] = directive.args[0]
            elif directive.name == "map" and len(directive.args) == 2 and directive.block is not None:
                self.maps[directive.args[1].lstrip("$").lower()] = directive
                if _isUpgradeMap(directive):
                    self.idiomMaps.add(directive.args[1].lstrip("$").lower())
                elif _convertibleMap(directive):
                    self.convertibleMaps.add(directive.args[1].lstrip("$").lower())
        for directive in block:
            if self.include(directive):
                continue
            if directive.name == "upstream":
                self.upstream(directive)
        for directive in block:
            if directive.name == "server":
                self.server(directive, scope)
            elif directive.name == "types":
                self.report(directive, "approximated", "wsproxy picks MIME types by extension from its own table")
                for entry in directive.block or ():
                    self.report(entry, "approximated", "a MIME type: wsproxy's own table applies")
            elif directive.name in ("upstream", "map", "include"):
                continue
            elif directive.name in _SCOPE_KEYS:
                self.scopeKey(directive)
            else:
                self.simple(directive)
        for variable, directive in self.maps.items():
            self.reportMap(variable, directive)

    def reportMap(self, variable: str, directive: _Directive) -> None:
        if variable in self.idiomMaps:
            self.report(directive, "not needed", "the upgrade idiom: wsproxy forwards upgrades itself")
            for entry in directive.block or ():
                self.report(entry, "not needed", "part of the upgrade idiom")
        elif variable in self.usedMaps and variable in self.convertibleMaps:
            self.convertMap(variable, directive)
        elif variable in self.usedMaps:
            self.report(
                directive,
                "unsupported",
                f"${variable} is used, and its hostnames or include have no equivalent",
                affects=True,
            )
            self.reportInside(directive.block or (), f"inside map ({directive.where})")
        else:
            self.report(directive, "not needed", f"${variable} is not used")
            for entry in directive.block or ():
                self.report(entry, "not needed", f"inside map ({directive.where}), not used")

    def convertMap(self, variable: str, directive: _Directive) -> None:
        """A used C{map} as a C{[map.NAME]} table, entry by entry."""
        table = _Table()
        missing = self.missingVariable(directive.args[0])
        if missing is not None:
            self.report(directive, "unsupported", missing, affects=True)
            self.reportInside(directive.block or (), f"inside map ({directive.where})")
            return
        table.set("source", directive.args[0], directive.where)
        self.report(directive, "converted", f"[map.{variable}]")
        for entry in directive.block or ():
            if entry.name == "volatile":
                self.report(
                    entry, "not needed", "wsproxy works a map out once per request, as nginx's volatile does not"
                )
                continue
            value = entry.args[0] if entry.args else ""
            missing = self.missingVariable(value)
            if missing is not None:
                self.report(entry, "unsupported", missing, affects=True)
            elif entry.name == "default":
                table.set("default", value, entry.where)
                self.report(entry, "converted", f"map.{variable}.default")
            else:
                table.set(("values", entry.name), value, entry.where)
                self.report(entry, "converted", f"map.{variable}.values")
        self.mapTables[variable] = table

    # upstream

    def upstream(self, upstream: _Directive) -> None:
        name = upstream.args[0] if upstream.args else ""
        table = _Table()
        servers: list[str] = []
        first = None
        for directive in upstream.block or ():
            args = directive.args
            if self.include(directive):
                continue
            if directive.name == "server" and args:
                converted = _upstreamServer(args)
                if len(converted) == 2:
                    self.report(directive, "unsupported", str(converted[0]), affects=bool(converted[1]))
                    continue
                first = first or directive
                servers.append(converted[0])
                self.report(directive, converted[1], f"servers: {converted[0]!r}" + converted[2])
            elif directive.name in ("least_conn", "ip_hash"):
                table.set("balance", directive.name, directive.where)
                if directive.name == "ip_hash":
                    detail = 'balance = "ip_hash": one client keeps one server, not always the one nginx picks'
                    self.report(directive, "approximated", detail)
                else:
                    self.report(directive, "converted", 'balance = "least_conn"')
            elif directive.name == "hash" and args:
                table.set("balance", "hash", directive.where)
                table.set("hash", args[0], directive.where)
                if "consistent" in args[1:]:
                    self.report(directive, "converted", f'balance = "hash", hash = {args[0]!r} (consistent)')
                else:
                    detail = f'balance = "hash", hash = {args[0]!r}: a consistent ring, not nginx\'s modulo'
                    self.report(directive, "approximated", detail)
            elif directive.name == "random":
                table.set("balance", "random_two", directive.where)
                if args[:1] == ["two"] and args[1:] in ([], ["least_conn"]):
                    self.report(directive, "converted", 'balance = "random_two"')
                else:
                    self.report(directive, "approximated", 'balance = "random_two" (two random picks, fewer open)')
            elif directive.name in ("keepalive", "keepalive_timeout", "max_fails", "fail_timeout") and args:
                value: Any = int(args[0]) if directive.name == "keepalive" else _seconds(args[0])
                table.set(directive.name, value, directive.where)
                self.report(directive, "converted", f"{directive.name} = {value}")
            elif directive.name == "sticky" and args[:1] == ["cookie"] and len(args) >= 2:
                table.set("sticky_cookie", args[1], directive.where)
                self.report(directive, "approximated", f"sticky_cookie = {args[1]!r} (its other parameters differ)")
            elif directive.name in ("zone", "keepalive_requests", "keepalive_time"):
                self.report(directive, "not needed", "wsproxy's pools need no shared zone or request limit")
            elif directive.name == "resolver" and args:
                table.set("resolver", args[0], directive.where)
                self.report(directive, "converted", f"resolver = {args[0]!r}")
            else:
                self.report(directive, "unsupported", "wsproxy does not know this upstream setting", affects=True)
        if not servers:
            self.report(upstream, "unsupported", "no server wsproxy can reach", affects=True)
            return
        table.items = {("servers",): (servers, first.where if first else upstream.where), **table.items}
        self.upstreams[name] = table
        self.upstreamSources[name] = upstream
        self.report(upstream, "converted", f"[upstream.{name}]")

    # server

    def server(self, server: _Directive, httpScope: _Scope) -> None:
        block = server.block or []
        scope = _Scope(httpScope, block)
        listens = []
        for directive in block:
            if directive.name == "listen":
                listens.append(self.listen(directive))
        if not listens:
            listens.append(("tcp:80", False, False, server))
        sslOn = scope.last("ssl")
        if sslOn is not None and sslOn.args[:1] == ["on"]:
            listens = [(endpoint, True, default, source) for endpoint, _, default, source in listens]
        names: list[str] = []
        for directive in block:
            if directive.name == "server_name":
                names += [n for n in directive.args if n]
                self.report(directive, "converted", f"server_name = {[n for n in directive.args if n]}")
        groups = {tls: [listen for listen in listens if listen[1] == tls] for tls in (False, True)}
        made = []
        for tls, group in groups.items():
            if not group:
                continue
            if tls and not (scope.array("ssl_certificate") and scope.array("ssl_certificate_key")):
                for _, _, _, listen in group:
                    why = "a TLS address without ssl_certificate: nginx fails every handshake on it"
                    self.report(listen, "unsupported", why, affects=True, again=True)
                    self.listens = [(e, d) for e, d in self.listens if d is not listen]
                continue
            table = _Table()
            if len(group) == 1:
                table.set("listen", group[0][0], group[0][3].where)
            else:
                table.set("listen", [listen[0] for listen in group], group[0][3].where)
            if names:
                table.set("server_name", names, next(d.where for d in block if d.name == "server_name"))
            if any(listen[2] for listen in group):
                table.set("default_server", True, next(listen[3].where for listen in group if listen[2]))
            self.serverSettings(table, scope, server, tls)
            made.append(table)
        self.serverHandlers(made, server, scope)
        self.servers.extend(made)
        split = " (split in two: the plain and the TLS addresses)" if len(made) == 2 else ""
        self.report(server, "converted", f"[[server]]{split}")
        for directive in block:
            if directive.block is None and directive.name in _SCOPE_KEYS:
                self.scopeKey(directive)
            elif directive.name not in ("listen", "server_name", "location", "return", "rewrite", "include"):
                self.simple(directive)
            else:
                self.include(directive)

    def listen(self, directive: _Directive) -> tuple[str, bool, bool, _Directive]:
        args = directive.args
        endpoint = _endpoint(args[0]) if args else "tcp:80"
        parameters = args[1:]
        tls = "ssl" in parameters
        default = "default_server" in parameters or "default" in parameters
        notes = []
        kind = "converted"
        for parameter in parameters:
            if parameter in ("ssl", "default_server", "default", "ipv6only=on", "ipv6only=off"):
                continue
            kind = "approximated"
            if parameter == "proxy_protocol":
                notes.append("proxy_protocol: the PROXY header is not read yet (the operations issue adds it)")
            elif parameter == "http2":
                notes.append("http2: wsproxy speaks HTTP/1.1")
            elif parameter == "quic":
                notes.append("quic: no HTTP/3")
            else:
                notes.append(f"{parameter}: socket tuning wsproxy does not set")
        detail = f"listen = {endpoint!r}" + (" with TLS" if tls else "") + "".join(f"; {n}" for n in notes)
        if args and args[0].startswith("localhost:"):
            kind = "approximated"
            detail += "; localhost is bound as 127.0.0.1 only"
        self.report(directive, kind, detail)
        self.listens.append((endpoint, directive))
        return endpoint, tls, default, directive

    def dualStack(self) -> None:
        """
        nginx binds C{listen 80} and C{listen [::]:80} apart (C{ipv6only=on});
        Linux's dual-stack C{[::]} socket would take IPv4 too, so that both
        cannot be bound: the IPv6 address then answers both families.
        """
        every = {listen for server in self.servers for listen in _listens(server)}
        folded = {}
        for endpoint in every:
            match = re.fullmatch(r"tcp:(\d+)", endpoint)
            if match and f"tcp6:{match.group(1)}:interface=\\:\\:" in every:
                folded[endpoint] = f"tcp6:{match.group(1)}:interface=\\:\\:"
        if not folded:
            return
        for server in self.servers:
            listens = list(dict.fromkeys(folded.get(listen, listen) for listen in _listens(server)))
            source = server.items[("listen",)][1]
            server.set("listen", listens[0] if len(listens) == 1 else listens, source)
        for endpoint, directive in self.listens:
            if endpoint in folded:
                detail = (
                    f"listen = {folded[endpoint]!r}: the dual-stack [::] socket takes IPv4 too (nginx binds them apart)"
                )
                self.report(directive, "approximated", detail, again=True)

    def serverSettings(self, table: _Table, scope: _Scope, server: _Directive, tls: bool) -> None:
        """The keys a wsproxy server takes from the nginx server's scope (its connection settings)."""
        for name in ("client_header_timeout", "keepalive_timeout"):
            directive = scope.last(name)
            if directive is not None and directive.args:
                table.set(name, _seconds(directive.args[0]), directive.where)
        buffers = scope.last("large_client_header_buffers")
        if buffers is not None and len(buffers.args) == 2:
            size = _bytes(buffers.args[1])
            table.set("max_request_line", size, buffers.where)
            table.set("max_header_size", size * int(buffers.args[0]), buffers.where)
        underscores = scope.last("underscores_in_headers")
        if underscores is not None and underscores.args[:1] == ["on"]:
            table.set("underscores_in_headers", True, underscores.where)
        trusted = scope.array("set_real_ip_from")
        if trusted:
            table.set("set_real_ip_from", [d.args[0] for d in trusted if d.args], trusted[0].where)
        limit = scope.last("limit_conn")
        if limit is not None and len(limit.args) == 2 and limit.args[1].isdigit():
            if self.limitZones.get(limit.args[0]) in ("$binary_remote_addr", "$remote_addr"):
                table.set("max_connections_per_ip", int(limit.args[1]), limit.where)
        if tls:
            self.tlsSettings(table, scope, server)

    def tlsSettings(self, table: _Table, scope: _Scope, server: _Directive) -> None:
        certificates = scope.array("ssl_certificate")
        keys = scope.array("ssl_certificate_key")
        table.set("ssl_certificate", certificates[0].args[0], certificates[0].where)
        table.set("ssl_certificate_key", keys[0].args[0], keys[0].where)
        for extra in (*certificates[1:], *keys[1:]):
            why = f"a second {extra.name} (another key type): wsproxy uses the first pair"
            self.report(extra, "approximated", why, again=True)
        protocols = scope.last("ssl_protocols")
        if protocols is not None:
            kept = [p for p in protocols.args if p in ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")]
            if kept:
                table.set("ssl_protocols", kept, protocols.where)
        for name in ("ssl_ciphers",):
            directive = scope.last(name)
            if directive is not None and directive.args:
                table.set(name, directive.args[0], directive.where)
        prefer = scope.last("ssl_prefer_server_ciphers")
        if prefer is not None:
            table.set("ssl_prefer_server_ciphers", prefer.args[:1] == ["on"], prefer.where)
        cache = scope.last("ssl_session_cache")
        if cache is not None and cache.args:
            value = next((a for a in cache.args if a.startswith("shared:")), cache.args[0])
            table.set("ssl_session_cache", value, cache.where)
        timeout = scope.last("ssl_session_timeout")
        if timeout is not None and timeout.args:
            table.set("ssl_session_timeout", _seconds(timeout.args[0]), timeout.where)

    def scopeKey(self, directive: _Directive) -> None:
        """The entry of a directive that servers and locations read through their scopes."""
        name, args = directive.name, directive.args
        first = args[0] if args else ""
        if name in _REQUEST_TIMEOUTS or name in ("client_header_timeout", "proxy_connect_timeout"):
            self.report(directive, "converted", f"{name} = {_seconds(first)}")
        elif name == "keepalive_timeout":
            extra = "; the second value (a Keep-Alive header) is not sent" if len(args) > 1 else ""
            self.report(
                directive, "approximated" if extra else "converted", f"keepalive_timeout = {_seconds(first)}{extra}"
            )
        elif name == "client_max_body_size":
            self.report(directive, "converted", f"client_max_body_size = {_bytes(first)}")
        elif name == "large_client_header_buffers":
            detail = "max_request_line and max_header_size (nginx also limits each header line to one buffer)"
            self.report(directive, "approximated", detail)
        elif name in ("root", "index"):
            self.report(directive, "converted", f"{name} = {args if name == 'index' else first!r}")
        elif name == "access_log":
            if first == "off":
                self.report(directive, "converted", "access_log = false")
            else:
                self.report(
                    directive, "approximated", "access_log = true: wsproxy logs to twistd's log, not to " + first
                )
        elif name == "underscores_in_headers":
            self.report(directive, "converted", f"underscores_in_headers = {first == 'on'}".lower())
        elif name == "set_real_ip_from":
            self.report(directive, "converted", f"set_real_ip_from += {first!r}")
        elif name == "real_ip_header":
            if first.lower() == "x-forwarded-for":
                self.report(directive, "not needed", "wsproxy reads X-Forwarded-For from set_real_ip_from clients")
            else:
                self.report(directive, "approximated", f"wsproxy reads X-Forwarded-For, not {first}")
        elif name in ("ssl_certificate", "ssl_certificate_key"):
            if any("$" in a for a in args):
                self.report(directive, "unsupported", "certificates named by variables", affects=True)

            else:
                self.report(directive, "converted", f"{name} = {first!r} on the TLS servers")
        elif name == "ssl_protocols":
            dropped = [p for p in args if p not in ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")]
            if dropped:
                self.report(directive, "approximated", f"ssl_protocols without {', '.join(dropped)} (OpenSSL has none)")
            else:
                self.report(directive, "converted", f"ssl_protocols = {args}")
        elif name in ("ssl_ciphers", "ssl_prefer_server_ciphers", "ssl_session_timeout"):
            self.report(directive, "converted", f"{name} on the TLS servers")
        elif name == "ssl_session_cache":
            self.report(
                directive,
                "approximated",
                f"ssl_session_cache = {' '.join(args)!r}: OpenSSL's own cache in each worker process, "
                "not a cache shared between workers, and not of that size (pyOpenSSL cannot size it)",
            )
        elif name == "ssl":
            self.report(directive, "converted", "the server's addresses are TLS" if first == "on" else "plain")
        elif name == "limit_conn":
            key = self.limitZones.get(first)
            if key in ("$binary_remote_addr", "$remote_addr") and len(args) == 2:
                detail = f"max_connections_per_ip = {args[1]} on the server (nginx counts requests in progress)"
                self.report(directive, "approximated", detail)
            else:
                self.report(directive, "unsupported", f"a connection limit keyed on {key}", affects=True)
        elif name in ("proxy_ssl_verify",):
            if first == "on":
                self.report(directive, "not needed", "wsproxy always verifies TLS upstreams")
            else:
                self.report(directive, "approximated", "wsproxy verifies TLS upstreams always")
        elif name in ("proxy_ssl_trusted_certificate", "proxy_ssl_name"):
            self.report(directive, "converted", f"{name} on the upstreams it proxies to")
        elif name == "resolver":
            self.report(directive, "not needed", "the system resolver is used (an upstream's resolver key sets one)")
        elif name == "proxy_next_upstream":
            if "non_idempotent" in args:
                self.report(directive, "converted", "proxy_next_upstream_non_idempotent = true")
            else:
                self.report(directive, "approximated", "wsproxy tries the next server on errors and timeouts")
        elif name == "expires":
            self.report(directive, "approximated", "add_header Cache-Control (no Expires date; for every status)")
        elif name == "proxy_redirect":
            if first.startswith("~") or len(args) == 2 and "$" in args[0]:
                self.report(directive, "unsupported", "a regex or variable proxy_redirect", affects=True)
            else:
                self.report(
                    directive, "converted", f"proxy_redirect on each location that inherits it: {' '.join(args)!r}"
                )
        elif name == "proxy_hide_header":
            self.report(directive, "converted", f"proxy_hide_header += {first!r} on each location that inherits it")
        elif name == "error_page":
            target = args[-1] if args else ""
            if not target.startswith(("/", "@")):
                self.report(directive, "unsupported", "an error_page that redirects to a URL", affects=True)
            else:
                self.report(directive, "converted", "error_page on each location that inherits it")
        # add_header, proxy_set_header, proxy_hide_header, error_page, proxy_redirect: per location.

    # server handlers

    def serverHandlers(self, tables: list[_Table], server: _Directive, scope: _Scope) -> None:
        """The locations (or the server-wide return) of the server's tables."""
        block = server.block or []
        rewriteLocations: list[_Table] = []
        serverReturn: _Directive | None = None
        hasPriorityLocations = any(d.name == "location" and d.args[:1] in (["="], ["^~"]) for d in block)
        for directive in block:
            if directive.name == "return" and serverReturn is None:
                serverReturn = directive
            elif directive.name == "rewrite":
                if serverReturn is not None:
                    self.report(directive, "not needed", f"after the server's return ({serverReturn.where})")
                    continue
                location = self.serverRewrite(directive, hasPriorityLocations)
                if location is not None:
                    rewriteLocations.append(location)
        locations: list[_Table] = list(rewriteLocations)
        if serverReturn is not None:
            answer = _returnValue(serverReturn.args)
            redirect = answer.split()[0] in ("301", "302", "303", "307", "308") and not rewriteLocations
            if redirect and not (
                set(_variables(answer)) - {"host", "request_uri", "scheme", "server_port", "server_name"}
            ):
                for table in tables:
                    table.set("return", answer, serverReturn.where)
                detail = f"return = {answer!r} on the server"
            else:
                location = _Table()
                location.set("match", "/", serverReturn.where)
                location.set("return", answer, serverReturn.where)
                locations.append(location)
                detail = f'a location "/" with return = {answer!r}'
            self.checkVariables(serverReturn, answer, detail)
            for directive in block:
                if directive.name == "location":
                    for inner in directive.walk():
                        self.report(
                            inner,
                            "not needed",
                            f"unreachable: the server's return ({serverReturn.where}) answers first",
                        )
        else:
            for directive in block:
                if directive.name == "location":
                    self.location(directive, scope, locations, nested=False)
            if not locations:
                locations.append(self.noLocation(server, scope))
        for table in tables:
            table.locations = locations
            if not locations:
                continue
            self.nginxDefaults(table, scope, server)

    def nginxDefaults(self, table: _Table, scope: _Scope, server: _Directive) -> None:
        """The scalar settings nginx inherits into every location, on the server, with nginx's defaults."""
        where = server.where
        body = scope.last("client_max_body_size")
        table.set(
            "client_max_body_size",
            _bytes(body.args[0]) if body else 1024**2,
            body.where if body else f"{where} (nginx's default 1m)",
        )
        connect = scope.last("proxy_connect_timeout")
        table.set(
            "proxy_connect_timeout",
            _seconds(connect.args[0]) if connect else 60,
            connect.where if connect else f"{where} (nginx's default 60s)",
        )
        for name in _REQUEST_TIMEOUTS:
            directive = scope.last(name)
            if directive is not None:
                table.set(name, _seconds(directive.args[0]), directive.where)
        root = scope.last("root")
        if root is not None:
            table.set("root", _prefixed(root.args[0]), root.where)
        index = scope.array("index")
        if index:
            table.set("index", [a for d in index for a in d.args], index[0].where)
        log = scope.last("access_log")
        if log is not None and log.args[:1] == ["off"]:
            table.set("access_log", False, log.where)
        nextUpstream = scope.last("proxy_next_upstream")
        if nextUpstream is not None and "non_idempotent" in nextUpstream.args:
            table.set("proxy_next_upstream_non_idempotent", True, nextUpstream.where)

    def noLocation(self, server: _Directive, scope: _Scope) -> _Table:
        location = _Table()
        location.set("match", "/", server.where)
        if scope.last("root") is None:
            location.set("return", "404", f"{server.where} (no location, no root)")
        return location

    def serverRewrite(self, directive: _Directive, hasPriorityLocations: bool) -> _Table | None:
        """A server-level C{rewrite ... redirect|permanent}: a regex location first in line."""
        args = directive.args
        flag = args[2] if len(args) > 2 else ""
        replacement = args[1] if len(args) > 1 else ""
        absolute = replacement.startswith(("http://", "https://", "$scheme"))
        if flag not in ("redirect", "permanent") and not (absolute and not flag):
            why = "a rewrite that continues with the new URI has no wsproxy equivalent"
            self.report(directive, "unsupported", why, affects=True)
            return None
        if hasPriorityLocations:
            why = "an = or ^~ location would answer before this rewrite's regex location"
            self.report(directive, "unsupported", why, affects=True)
            return None
        if "(?<" in args[0] or "(?P<" in args[0]:
            self.report(directive, "unsupported", "named captures in a rewrite", affects=True)
            return None
        code = "301" if flag == "permanent" else "302"
        if replacement.endswith("?"):
            target = replacement[:-1]
        elif "?" in replacement:
            self.report(
                directive, "unsupported", "a replacement with its own query (nginx appends the client's)", affects=True
            )
            return None
        else:
            target = replacement + "$is_args$args"
        location = _Table()
        location.set("match", f"~ {args[0]}", directive.where)
        location.set("return", f"{code} {target}", directive.where)
        if self.checkVariables(directive, target, f'a location "~ {args[0]}" with return = "{code} {target}"'):
            return location
        return None

    def checkVariables(self, directive: _Directive, text: str, detail: str, kind: str = "converted") -> bool:
        """Report C{directive} as C{kind}, or unsupported for a variable wsproxy lacks; whether it was."""
        missing = self.missingVariable(text)
        if missing is not None:
            self.report(directive, "unsupported", missing, affects=True)
            return False
        self.report(directive, kind, detail)
        return True

    def missingVariable(self, text: str) -> str | None:
        for name in _variables(text):
            if name in self.maps and name not in self.idiomMaps:
                self.usedMaps.add(name)
                if name not in self.convertibleMaps:
                    return f"${name} is a map variable with hostnames or include (no [map] equivalent)"
        try:
            compileTemplate(text, self.convertibleMaps)
        except VariableError as e:
            message = str(e)
            if message.startswith("unknown variable"):
                return f"wsproxy has no {message.removeprefix('unknown variable ')}"
            return message
        return None

    # location

    def location(self, location: _Directive, parent: _Scope, out: list[_Table], nested: bool) -> None:
        block = location.block or []
        scope = _Scope(parent, block)
        match = " ".join(location.args)
        table = _Table()
        table.set("match", match, location.where)
        notes: list[str] = []
        kind = "converted"
        answer = None
        returned = next((d for d in block if d.name == "return"), None)
        rewrites = [d for d in block if d.name == "rewrite"]
        proxy = next((d for d in block if d.name == "proxy_pass"), None)
        proxyURI: str | None = None
        for rewrite in rewrites:
            if returned is not None and block.index(returned) < block.index(rewrite):
                self.report(rewrite, "not needed", f"after the location's return ({returned.where})")
                continue
            converted = self.locationRewrite(rewrite, location, proxy)
            if converted is None:
                continue
            if converted[0] == "return":
                answer = converted[1]
                table.set("return", answer, rewrite.where)
                break
            proxyURI = converted[1]
        if returned is not None and answer is None:
            answer = _returnValue(returned.args)
            table.set("return", answer, returned.where)
            self.checkVariables(returned, answer, f"return = {answer!r}")
        if proxy is not None:
            if answer is not None:
                self.report(proxy, "not needed", "the location's return answers first")
            else:
                self.proxyPass(proxy, scope, table, proxyURI, notes)
        alias = next((d for d in block if d.name == "alias"), None)
        if alias is not None:
            table.set("alias", _prefixed(alias.args[0]), alias.where)
            self.report(alias, "converted", f"alias = {alias.args[0]!r}")
        tryFiles = next((d for d in block if d.name == "try_files"), None)
        if tryFiles is not None:
            table.set("try_files", tryFiles.args, tryFiles.where)
            self.checkVariables(tryFiles, " ".join(tryFiles.args), f"try_files = {tryFiles.args}")
        internal = next((d for d in block if d.name == "internal"), None)
        if internal is not None:
            table.set("internal", True, internal.where)
            self.report(internal, "converted", "internal = true")
        self.locationSettings(table, scope, parent)
        hasHandler = answer is not None or proxy is not None or alias is not None or tryFiles is not None
        if not hasHandler and scope.last("root") is None:
            table.set("return", "404", f"{location.where} (no handler, no root)")
            kind = "approximated"
            notes.append("no handler and no root: nginx serves its default html/ directory; wsproxy answers 404")
        if proxy is not None and answer is None:
            self.headers(table, scope, location, notes)
        self.addHeaders(table, scope)
        errorPages = scope.array("error_page")
        for directive in errorPages:
            codes = [a for a in directive.args[:-1] if a.isdigit()]
            target = " ".join(a for a in directive.args[len(codes) :])
            if target and not target.split()[-1].startswith(("/", "@")):
                continue
            table.set(("error_page", " ".join(codes)), target, directive.where)
        out.append(table)
        detail = f"[[server.location]] match = {match!r}" + "".join(f"; {n}" for n in notes)
        if nested:
            detail += " (nested: flattened, inheriting from its parent)"
        self.report(location, kind, detail)
        for directive in block:
            if self.include(directive):
                continue
            if directive.name == "location":
                if location.args[:1] in (["~"], ["~*"]) or directive.args[:1] not in (["~"], ["~*"]):
                    self.location(directive, scope, out, nested=True)
                else:
                    self.report(directive, "unsupported", "a regex location nested in a prefix location", affects=True)
                    self.reportInside(directive.block or (), f"inside {directive.text} ({directive.where})")
            elif directive.name in _SCOPE_KEYS:
                self.locationKey(directive)
            elif directive.name not in ("return", "rewrite", "proxy_pass", "alias", "try_files", "internal"):
                self.simple(directive)

    def locationKey(self, directive: _Directive) -> None:
        name = directive.name
        if name in (
            "client_header_timeout",
            "keepalive_timeout",
            "large_client_header_buffers",
            "underscores_in_headers",
            "set_real_ip_from",
            "limit_conn",
        ) or name.startswith("ssl"):
            self.report(directive, "approximated", f"{name} in a location: wsproxy takes it from the server")
        else:
            self.scopeKey(directive)

    def locationRewrite(
        self, rewrite: _Directive, location: _Directive, proxy: _Directive | None
    ) -> tuple[str, str] | None:
        """
        The rewrites of a location that wsproxy can express: one that
        redirects every URI of the location without captures (a return), and
        C{rewrite ^/PREFIX/(.*)$ /NEW/$1 break} before a C{proxy_pass}
        without URI in a C{location /PREFIX/} (a proxy_pass URI).
        """
        args = rewrite.args
        regex, replacement = args[0], args[1] if len(args) > 1 else ""
        flag = args[2] if len(args) > 2 else ""
        prefix = (
            location.args[-1]
            if location.args[:1] not in (["~"], ["~*"], ["@"]) and not location.args[0].startswith("@")
            else None
        )
        everything = regex in ("^", "^.*$", "^(.*)$", ".*", "^/.*$", "^/") or (
            prefix is not None and regex == "^" + re.escape(prefix).replace("\\/", "/")
        )
        if (
            everything
            and "$" not in replacement.replace("$scheme", "").replace("$host", "").replace("$request_uri", "")
            and flag in ("redirect", "permanent")
        ):
            code = "301" if flag == "permanent" else "302"
            target = (
                replacement[:-1]
                if replacement.endswith("?")
                else replacement + ("" if "?" in replacement else "$is_args$args")
            )
            answer = f"{code} {target}"
            self.checkVariables(rewrite, target, f"return = {answer!r}")
            return "return", answer
        if flag == "break" and proxy is not None and prefix is not None and prefix.endswith("/"):
            stripped = re.fullmatch(r"\^" + re.escape(prefix).replace("\\/", "/") + r"\(\.\*\)\$?", regex)
            target = re.fullmatch(r"(/[^$?]*)\$1", replacement)
            if stripped and target and "$" not in proxy.args[0] and "/" not in proxy.args[0].split("://", 1)[-1]:
                self.report(rewrite, "converted", f"the proxy_pass URI {target.group(1)!r}")
                return "proxy", target.group(1)
        self.report(rewrite, "unsupported", "a rewrite wsproxy's locations cannot express", affects=True)
        return None

    def proxyPass(
        self, proxy: _Directive, scope: _Scope, table: _Table, proxyURI: str | None, notes: list[str]
    ) -> None:
        url = proxy.args[0] if proxy.args else ""
        if "$" in url:
            self.report(proxy, "unsupported", "a proxy_pass with variables", affects=True)
            return
        if url.startswith(("http://unix:", "https://unix:")):
            self.report(proxy, "unsupported", "an upstream on a UNIX socket", affects=True)
            return
        scheme, _, rest = url.partition("://")
        authority, slash, path = rest.partition("/")
        if proxyURI is not None:
            path, slash = proxyURI[1:], "/"
        if authority in self.upstreams:
            if scheme == "https":
                self.upstreams[authority].set("tls", True, proxy.where)
            written = f"http://{authority}{slash}{path}"
            host = authority
        else:
            portless = ":" not in authority.rsplit("]", 1)[-1]
            if portless and "." not in authority and authority != "localhost" and not authority.startswith("["):
                # nginx resolves a bare name at start; wsproxy wants an upstream for it.
                port = 443 if scheme == "https" else 80
                upstream = _Table()
                upstream.set("servers", [f"{authority}:{port}"], proxy.where)
                if scheme == "https":
                    upstream.set("tls", True, proxy.where)
                self.upstreams[authority] = upstream
                written = f"http://{authority}{slash}{path}"
            else:
                written = f"{scheme}://{authority}{slash}{path}"
            host = authority
        table.set("proxy_pass", written, proxy.where)
        explicitHost = any(d.args and d.args[0].lower() == "host" for d in scope.array("proxy_set_header"))
        detail = f"proxy_pass = {written!r}"
        if not explicitHost:
            table.set(("proxy_set_header", "Host"), host, f"{proxy.where} (nginx's default Host $proxy_host)")
            detail += f"; Host = {host!r} (nginx's default $proxy_host)"
        self.report(proxy, "converted", detail)
        for name in ("proxy_ssl_trusted_certificate", "proxy_ssl_name"):
            directive = scope.last(name)
            if directive is not None and authority in self.upstreams:
                self.upstreams[authority].set(name, directive.args[0], directive.where)

    def locationSettings(self, table: _Table, scope: _Scope, parent: _Scope) -> None:
        """Scalar settings the location sets itself (or a parent location between it and the server)."""
        serverScope = parent
        while serverScope.parent is not None and serverScope.parent.parent is not None:
            serverScope = serverScope.parent
        for name in (*_REQUEST_TIMEOUTS, "proxy_connect_timeout", "client_max_body_size", "root", "access_log"):
            mine, servers = scope.last(name), serverScope.last(name)
            if mine is None or mine is servers:
                continue
            if name == "client_max_body_size":
                table.set(name, _bytes(mine.args[0]), mine.where)
            elif name == "root":
                table.set(name, _prefixed(mine.args[0]), mine.where)
            elif name == "access_log":
                table.set(name, mine.args[:1] != ["off"], mine.where)
            else:
                table.set(name, _seconds(mine.args[0]), mine.where)
        index = scope.array("index")
        if index and index != serverScope.array("index"):
            table.set("index", [a for d in index for a in d.args], index[0].where)
        redirect = scope.array("proxy_redirect")
        if redirect:
            pairs = [d for d in redirect if len(d.args) == 2]
            if redirect[-1].args[:1] in (["off"], ["default"]):
                table.set("proxy_redirect", redirect[-1].args[0], redirect[-1].where)
            elif pairs and not any(d.args[0].startswith("~") for d in pairs):
                table.set("proxy_redirect", [" ".join(d.args) for d in pairs], pairs[0].where)
        hidden = scope.array("proxy_hide_header")
        if hidden:
            table.set("proxy_hide_header", [d.args[0] for d in hidden], hidden[0].where)

    def headers(self, table: _Table, scope: _Scope, location: _Directive, notes: list[str]) -> None:
        """
        nginx's effective C{proxy_set_header} list for this location, all of
        it on the location; the upgrade headers decide C{upgrade_protocols}.
        """
        upgrade = connection = False
        for directive in scope.array("proxy_set_header"):
            if len(directive.args) < 2:
                continue
            name, value = directive.args[0], directive.args[1]
            lower = name.lower()
            if lower == "upgrade":
                upgrade = "$http_upgrade" in value.lower() or bool(value and "$" not in value)
                self.report(directive, "not needed", "wsproxy forwards the client's Upgrade itself")
                continue
            if lower == "connection":
                variables = _variables(value)
                connection = value.lower() in _UPGRADE_CONNECTION or any(v in self.idiomMaps for v in variables)
                detail = "wsproxy manages Connection itself (upgrades and keep-alive)"
                if (
                    variables
                    and not any(v in self.idiomMaps for v in variables)
                    and value.lower() != "$http_connection"
                ):
                    self.missingVariable(value)
                self.report(directive, "not needed", detail)
                continue
            if "$proxy_host" in value:
                value = value.replace("$proxy_host", table.items[("proxy_pass",)][0].split("://", 1)[1].split("/")[0])
            missing = self.missingVariable(value)
            if missing is not None:
                self.report(directive, "unsupported", missing, affects=True)
                continue
            if lower == "host" and value.lower() in ("$host", "$http_host"):
                self.report(
                    directive, "converted", f"proxy_set_header.Host = {value!r} (on each location that inherits it)"
                )
            else:
                self.report(
                    directive, "converted", f"proxy_set_header.{name} = {value!r} (on each location that inherits it)"
                )
            table.set(("proxy_set_header", name), value, directive.where)
        if not (upgrade and connection):
            table.set("upgrade_protocols", [], f"{location.where} (nginx forwards no upgrade here)")
            notes.append(
                "upgrade_protocols = []: nginx would not upgrade here (no proxy_set_header Upgrade and Connection)"
            )
            return
        # nginx closes an upgraded connection after proxy_read_timeout (60 s
        # by default) without a byte from the upstream; wsproxy's tunnels
        # have their own idle limit, which counts silence both ways.
        readTimeout = scope.last("proxy_read_timeout")
        seconds = _seconds(readTimeout.args[0]) if readTimeout is not None and readTimeout.args else 60
        source = readTimeout.where if readTimeout is not None else f"{location.where} (nginx's default 60s)"
        table.set("websocket_idle_timeout", seconds, source)
        notes.append(
            f"websocket_idle_timeout = {seconds:g}: nginx's proxy_read_timeout on the upgraded connection "
            "(approximated: wsproxy counts silence either way, nginx the upstream's only)"
        )

    def addHeaders(self, table: _Table, scope: _Scope) -> None:
        """nginx's effective C{add_header} list (and C{expires}) for this location, all of it on the location."""
        for directive in scope.array("add_header"):
            if len(directive.args) < 2:
                continue
            name, value = directive.args[0], directive.args[1]
            if "$" in value:
                missing = self.missingVariable(value) or "wsproxy's add_header takes no variables"
                self.report(
                    directive, "unsupported", f"{missing}; add_header values are literal in wsproxy", affects=True
                )
                continue
            table.set(("add_header", name), value, directive.where)
            if directive.args[2:3] == ["always"]:
                self.report(directive, "converted", f"add_header.{name} on each location that inherits it")
            else:
                detail = f"add_header.{name}: nginx adds it to 2xx/3xx answers only, wsproxy to every answer"
                self.report(directive, "approximated", detail)
        expires = scope.last("expires")
        if expires is not None and expires.args and expires.args[0] != "off":
            value = expires.args[-1]
            if value == "epoch":
                control = "no-cache"
            elif value == "max":
                control = "max-age=315360000"
            else:
                try:
                    control = f"max-age={int(_seconds(value.lstrip('+')))}"
                except ValueError:
                    return
            table.set(("add_header", "Cache-Control"), control, expires.where)


#: Where nginx looks for a relative root or alias: its prefix, as Debian builds it.
NGINX_PREFIX = "/usr/share/nginx/"


def _prefixed(path: str) -> str:
    return path if path.startswith("/") else NGINX_PREFIX + path


def _listens(server: _Table) -> list[str]:
    listen = server.get("listen")
    return [listen] if isinstance(listen, str) else list(listen)


def _convertibleMap(directive: _Directive) -> bool:
    """Whether a C{map} says only what C{[map.NAME]} says: keys, values, a default."""
    return all(
        entry.block is None
        and entry.name not in ("hostnames", "include")
        and len(entry.args) == 1
        or entry.name == "volatile"
        for entry in directive.block or ()
    )


def _isUpgradeMap(directive: _Directive) -> bool:
    """
    C{map $http_upgrade $x { default upgrade; '' close; }}, the idiom of
    nginx's WebSocket guide, or ASP.NET's C{map $http_connection $x}: a
    C{Connection} value made from the client's upgrade request, which
    wsproxy makes itself.
    """
    return directive.args[0].lower() in ("$http_upgrade", "$http_connection")


def _upstreamServer(args: list[str]) -> tuple[str, str, str] | tuple[str, bool]:
    """
    An upstream C{server} line as wsproxy's C{"host:port params"}, its kind
    and a note; or (why, affectsClients) when it cannot be converted.
    """
    address = args[0]
    if address.startswith("unix:"):
        return ("an upstream on a UNIX socket", True)
    if not re.search(r":\d+$", address):
        address += ":80"
    kept, dropped = [], []
    for parameter in args[1:]:
        name = parameter.partition("=")[0]
        if name in ("weight", "max_fails", "max_conns") or parameter in ("backup", "down", "resolve"):
            kept.append(parameter)
        elif name == "fail_timeout":
            kept.append(f"fail_timeout={_seconds(parameter.partition('=')[2])}")
        else:
            dropped.append(parameter)
    note = f" ({', '.join(dropped)} not kept)" if dropped else ""
    return " ".join([address, *kept]), "approximated" if dropped else "converted", note


def _endpoint(address: str) -> str:
    """nginx's C{listen} address as a Twisted endpoint string."""
    if address.startswith("unix:"):
        return address
    if address.startswith("["):
        host, _, port = address[1:].partition("]")
        port = port.lstrip(":") or "80"
        return f"tcp6:{port}:interface=" + host.replace(":", "\\:")
    if address.isdigit():
        return f"tcp:{address}"
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "80")
    if host in ("*", "0.0.0.0", ""):
        return f"tcp:{port}"
    if host == "localhost":
        host = "127.0.0.1"
    return f"tcp:{port}:interface={host}"


def _returnValue(args: list[str]) -> str:
    """nginx's C{return} arguments as wsproxy's C{return} string."""
    if len(args) == 1 and not args[0].isdigit():
        return f"302 {args[0]}"
    text = " ".join(args[:1] + [args[1].replace("\\n", "").replace("\\r", "")] if len(args) > 1 else args)
    return text.strip()


def _render(converter: _Converter) -> tuple[dict[str, Any], str]:
    document: dict[str, Any] = converter.top.document()
    lines = ["# Converted from nginx by wsproxy-from-nginx; each key names its source.", *converter.top.lines()]
    if converter.upstreams:
        document["upstream"] = {name: table.document() for name, table in converter.upstreams.items()}
        for name, table in converter.upstreams.items():
            lines += ["", f"[upstream.{_tomlKey(name)}]", *table.lines()]
    if converter.mapTables:
        document["map"] = {name: table.document() for name, table in converter.mapTables.items()}
        for name, table in converter.mapTables.items():
            lines += ["", f"[map.{_tomlKey(name)}]", *table.lines()]
    document["server"] = [server.document() for server in converter.servers]
    for server in converter.servers:
        lines += ["", "[[server]]", *server.lines()]
        for location in server.locations:
            lines += ["", "  [[server.location]]", *("  " + line for line in location.lines())]
    return document, "\n".join(lines) + "\n"


def convertFile(path: str | Path) -> Conversion:
    """
    Convert the nginx configuration at C{path} (and the files it includes).

    @raise ConfigError: if nginx would refuse it too (a syntax error, an
        include that cannot be read, a TLS listener without certificate).
    """
    tree = _read(str(path))
    converter = _Converter()
    try:
        converter.convert(tree)
        converter.dualStack()
    except (ValueError, IndexError) as e:
        raise ConfigError(str(path), "(nginx)", f"cannot convert: {e}") from None
    report = converter.finish(tree)
    document, toml = _render(converter)
    return Conversion(document, report, toml)


def formatReport(conversion: Conversion) -> str:
    """The report, grouped by kind (in L{KINDS} order), each entry with its C{file:line}."""
    lines = []
    for kind in KINDS:
        entries = [e for e in conversion.report if e.kind == kind]
        if not entries:
            continue
        lines.append(f"{kind} ({len(entries)}):")
        for entry in entries:
            mark = " [changes what clients receive]" if entry.affectsClients else ""
            lines.append(f"  {entry.where}: {entry.directive}: {entry.detail}{mark}")
    return "\n".join(lines) + "\n"


def printReport(path: str | Path, out: Any) -> None:
    """
    For C{--check}: if the file at C{path} is an nginx configuration, write
    its conversion report to C{out}; a TOML file writes nothing.

    @raise ConfigError: if it is nginx and cannot be converted.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return
    if looksLikeNginx(text):
        out.write(f"wsproxy: {path}: an nginx configuration, converted:\n{formatReport(convertFile(path))}")


def main(argv: Sequence[str] | None = None) -> int:
    """C{wsproxy-from-nginx FILE [-o wsproxy.toml] [--accept-unsupported]}."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="wsproxy-from-nginx", description="Convert an nginx configuration to wsproxy's TOML, with a report."
    )
    parser.add_argument("file", help="the nginx configuration (nginx.conf)")
    parser.add_argument("-o", "--output", help="write the TOML here instead of standard output")
    parser.add_argument(
        "--accept-unsupported",
        action="store_true",
        help="convert even when unsupported directives change what clients receive",
    )
    options = parser.parse_args(argv)
    try:
        conversion = convertFile(options.file)
    except ConfigError as e:
        sys.stderr.write(f"wsproxy-from-nginx: {e}\n")
        return 1
    sys.stderr.write(formatReport(conversion))
    if conversion.blocking and not options.accept_unsupported:
        sys.stderr.write(f"wsproxy-from-nginx: {ConversionRefused(conversion.blocking)}\n")
        sys.stderr.write("wsproxy-from-nginx: nothing written (--accept-unsupported converts anyway)\n")
        return 1
    if options.output:
        Path(options.output).write_text(conversion.toml)
    else:
        sys.stdout.write(conversion.toml)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
