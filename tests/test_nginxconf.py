"""
wsproxy.nginxconf: nginx configurations converted with crossplane, every
directive in the report, the converted document valid for wsproxy; the
seed's nginx.conf run as it is (placeholders, certificate paths and ports
rewritten) on real sockets with real TLS and a real WebSocket peer; the
console script and C{twistd wsproxy --config nginx.conf --check} as an
operator runs them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import crossplane
import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support import (
    ENVIRONMENT,
    LOOPBACK,
    TWISTD,
    connectRaw,
    listenEcho,
    listenScripted,
    ok,
    upgradeRequest,
)
from test_tls import PKI, TLSClient, connectTLS, headers
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from wsproxy import tap
from wsproxy.config import ConfigError, loadConfig, parseConfig
from wsproxy.listeners import ProxyService
from wsproxy.nginxconf import (
    KINDS,
    Conversion,
    ConversionRefused,
    Entry,
    convertFile,
    formatReport,
    looksLikeNginx,
)

REPO = Path(__file__).resolve().parent.parent
SEED = Path(__file__).parent / "data" / "nginx" / "seed.conf"
HSTS = b"max-age=31536000"


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(trustme.CA(), tmp_path)


def convert(tmp_path: Path, text: str, **others: str) -> Conversion:
    """Write C{text} as nginx.conf (and C{others}, by relative path) and convert it."""
    for name, content in others.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return convertFile(path)


def entry(conversion: Conversion, directive: str) -> Entry:
    """The one entry whose directive is C{directive} or starts with it and a space."""
    found = [e for e in conversion.report if e.directive == directive or e.directive.startswith(directive + " ")]
    assert len(found) == 1, (directive, found)
    return found[0]


def locations(conversion: Conversion, server: int = 0) -> dict[str, dict[str, Any]]:
    return {table["match"]: table for table in conversion.document["server"][server].get("location", [])}


def site(body: str, http: str = "") -> str:
    return f"events {{}}\nhttp {{\n{http}\n  upstream app {{ server 127.0.0.1:9000; }}\n  server {{\n{body}\n  }}\n}}\n"


UPGRADE = "proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade;"


# Recognising nginx


@pytest.mark.parametrize(
    "text",
    [
        "events {}\nhttp { server { listen 80; } }\n",
        "worker_processes 2;\n",
        "server {\n    listen 80;\n    location / { proxy_pass http://a; }\n}\n",
        "# a site\nupstream app { server 10.0.0.1:80; }\n",
    ],
)
def test_nginx_is_recognised_by_content(text):
    assert looksLikeNginx(text)


@pytest.mark.parametrize(
    "text",
    [
        '[[server]]\nlisten = "tcp:80"\nproxy_pass = "http://a"\n',
        'workers = 2\n[upstream.app]\nservers = ["a:1"]\n',
        '# location / { } in a comment\n[[server]]\nlisten = "tcp:80"\n',
        "",
    ],
)
def test_toml_is_not_taken_for_nginx(text):
    assert not looksLikeNginx(text)


# The report


RICH = """
user www-data;
worker_processes 2;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;
events { worker_connections 768; multi_accept on; }
http {
  sendfile on;
  tcp_nopush on;
  types_hash_max_size 2048;
  include mime.types;
  default_type application/octet-stream;
  access_log /var/log/nginx/access.log;
  gzip on;
  gzip_types text/plain;
  client_max_body_size 10m;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  upstream app { least_conn; server 127.0.0.1:9000 weight=3 max_fails=2 fail_timeout=5s; server 127.0.0.1:9001 backup; keepalive 8; }
  include conf.d/*.conf;
}
"""
SITE = """
server {
  listen 127.0.0.1:8080 default_server;
  server_name example.com www.example.com;
  proxy_read_timeout 1h;
  location / { proxy_pass http://app; proxy_set_header Host $host; }
  location /ws/ { proxy_pass http://app; proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade; }
  location = /old { return 301 /new; }
  location ~* \\.(png|css)$ { root /tmp; expires 7d; }
}
"""
MIME = "types { text/html html; image/png png; }\n"


def crossplaneDirectives(path: Path) -> int:
    """How many directives crossplane reads from C{path} and its includes."""
    payload = crossplane.parse(str(path), check_ctx=False)

    def count(items: list[dict[str, Any]]) -> int:
        return sum(1 + count(item.get("block", [])) for item in items)

    return sum(count(config["parsed"]) for config in payload["config"])


def test_every_directive_has_exactly_one_entry(tmp_path):
    conversion = convert(tmp_path, RICH, **{"conf.d__site.conf": SITE, "mime.types": MIME})
    assert len(conversion.report) == crossplaneDirectives(tmp_path / "nginx.conf")
    assert len({(e.file, e.line, e.directive) for e in conversion.report}) == len(conversion.report)
    assert {e.kind for e in conversion.report} <= set(KINDS)
    assert not conversion.blocking
    parseConfig(conversion.document)


def test_the_kinds_of_the_common_directives(tmp_path):
    conversion = convert(tmp_path, RICH, **{"conf.d__site.conf": SITE, "mime.types": MIME})
    kinds = {
        "worker_processes 2": "converted",
        "user www-data": "approximated",
        "pid /run/nginx.pid": "approximated",
        "error_log": "approximated",
        "worker_connections": "not needed",
        "sendfile on": "not needed",
        "access_log /var/log/nginx/access.log": "approximated",
        "gzip on": "unsupported",
        "gzip_types": "not needed",
        "map $http_upgrade $connection_upgrade": "not needed",
        "proxy_http_version 1.1": "not needed",
        "proxy_set_header Upgrade": "not needed",
        "proxy_set_header Connection $connection_upgrade": "not needed",
        "least_conn": "converted",
        "keepalive 8": "converted",
        "expires 7d": "approximated",
        "types": "approximated",
        "include conf.d/*.conf": "converted",
    }
    for directive, kind in kinds.items():
        assert entry(conversion, directive).kind == kind, entry(conversion, directive)
    assert not entry(conversion, "gzip on").affectsClients
    assert entry(conversion, "worker_processes").detail == "workers = 2"
    site = entry(conversion, "listen 127.0.0.1:8080")
    assert site.file.endswith("conf.d/site.conf") and site.line == 3


def test_the_report_is_grouped_by_kind_with_file_and_line(tmp_path):
    conversion = convert(tmp_path, RICH, **{"conf.d__site.conf": SITE, "mime.types": MIME})
    text = formatReport(conversion)
    headings = [line.split(" (")[0] for line in text.splitlines() if not line.startswith(" ")]
    assert headings == [kind for kind in KINDS if any(e.kind == kind for e in conversion.report)]
    for line in text.splitlines():
        if line.startswith(" "):
            assert re.match(r"  \S+:\d+: ", line), line
    assert formatReport(convertFile(tmp_path / "nginx.conf")) == text


def test_the_toml_names_the_source_of_every_key_and_is_the_document(tmp_path):
    conversion = convert(tmp_path, RICH, **{"conf.d__site.conf": SITE, "mime.types": MIME})
    assert tomllib.loads(conversion.toml) == conversion.document
    keys = [line for line in conversion.toml.splitlines() if re.match(r"\s*[\w\"-].* = ", line)]
    assert keys
    for line in keys:
        assert re.search(r"  # \S+:\d+", line), line
    assert any("conf.d/site.conf:" in line for line in keys)


# Includes


def test_includes_follow_globs_relative_to_the_main_file(tmp_path):
    conversion = convert(
        tmp_path,
        "events {}\nhttp {\n  include sites/*.conf;\n  include none/*.conf;\n}\n",
        **{
            "sites__a.conf": "server { listen 8081; location / { return 200 a; } }\n",
            "sites__b.conf": "server { listen 8082; include snippets/common.conf; location / { return 200 b; } }\n",
            "snippets__common.conf": "add_header X-Common yes always;\n",
        },
    )
    assert [s["listen"] for s in conversion.document["server"]] == ["tcp:8081", "tcp:8082"]
    assert locations(conversion, 1)["/"]["add_header"] == {"X-Common": "yes"}
    assert "add_header" not in locations(conversion, 0)["/"]
    assert entry(conversion, "include none/*.conf").kind == "not needed"
    common = entry(conversion, "add_header X-Common")
    assert common.file.endswith("snippets/common.conf") and common.line == 1


def test_a_missing_include_or_bad_syntax_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"nginx.conf:2: \(nginx syntax\): .*missing.conf"):
        convert(tmp_path, "events {}\ninclude missing.conf;\n")
    with pytest.raises(ConfigError, match=r"nginx.conf:\d: \(nginx syntax\): "):
        convert(tmp_path, "events {}\nhttp { server { listen 80 }\n")


# Upstreams


def test_upstream_balancing_and_server_parameters(tmp_path):
    conversion = convert(
        tmp_path,
        """events {}
http {
  upstream a { hash $request_uri consistent; server 10.0.0.1:80 weight=2 max_conns=10; server 10.0.0.2 down; }
  upstream b { ip_hash; server b1.internal:8080 fail_timeout=30s max_fails=3; keepalive_timeout 30s; }
  upstream c { random two least_conn; server 10.0.0.3:80; zone c 64k; }
  upstream d { server unix:/run/app.sock; }
  server { listen 80; location / { proxy_pass http://a; } }
}
""",
    )
    upstreams = conversion.document["upstream"]
    assert upstreams["a"] == {
        "servers": ["10.0.0.1:80 weight=2 max_conns=10", "10.0.0.2:80 down"],
        "balance": "hash",
        "hash": "$request_uri",
    }
    assert upstreams["b"] == {
        "servers": ["b1.internal:8080 fail_timeout=30 max_fails=3"],
        "balance": "ip_hash",
        "keepalive_timeout": 30,
    }
    assert upstreams["c"]["balance"] == "random_two"
    assert "d" not in upstreams
    assert entry(conversion, "ip_hash").kind == "approximated"
    assert entry(conversion, "hash $request_uri consistent").kind == "converted"
    assert entry(conversion, "zone c").kind == "not needed"
    assert entry(conversion, "server unix:/run/app.sock").affectsClients
    assert entry(conversion, "upstream d").affectsClients
    config = parseConfig(conversion.document)
    assert config.upstreams["a"].servers[1].down


def test_a_bare_name_in_proxy_pass_becomes_an_upstream(tmp_path):
    conversion = convert(tmp_path, "events {}\nhttp { server { listen 80; location / { proxy_pass http://web; } } }\n")
    assert conversion.document["upstream"] == {"web": {"servers": ["web:80"]}}
    assert locations(conversion)["/"]["proxy_set_header"] == {"Host": "web"}
    parseConfig(conversion.document)


# Servers and listen


@pytest.mark.parametrize(
    "listen, endpoint",
    [
        ("80", "tcp:80"),
        ("*:8080", "tcp:8080"),
        ("127.0.0.1:8080", "tcp:8080:interface=127.0.0.1"),
        ("[::1]:8080", "tcp6:8080:interface=\\:\\:1"),
        ("[::]:443", "tcp6:443:interface=\\:\\:"),
        ("unix:/run/wsproxy.sock", "unix:/run/wsproxy.sock"),
    ],
)
def test_listen_addresses_as_endpoints(tmp_path, listen, endpoint):
    conversion = convert(tmp_path, site(f"listen {listen}; location / {{ return 204; }}"))
    assert conversion.document["server"][0]["listen"] == endpoint
    assert entry(conversion, "listen").kind == "converted"


def test_ipv4_and_ipv6_wildcards_become_one_dual_stack_address(tmp_path):
    conversion = convert(tmp_path, site("listen 80; listen [::]:80; location / { return 204; }"))
    assert conversion.document["server"][0]["listen"] == "tcp6:80:interface=\\:\\:"
    assert entry(conversion, "listen 80").kind == "approximated"
    assert "dual-stack" in entry(conversion, "listen 80").detail


def test_plain_and_tls_addresses_of_one_server_are_split(tmp_path, pki):
    certificate, key, _ = pki.issue("site", "example.com")
    conversion = convert(
        tmp_path,
        site(
            f"listen 80 default_server; listen 443 ssl; server_name example.com;"
            f"ssl_certificate {certificate}; ssl_certificate_key {key}; ssl_session_timeout 5m;"
            "location / { proxy_pass http://app; }"
        ),
    )
    plain, tls = conversion.document["server"]
    assert plain["listen"] == "tcp:80" and plain["default_server"] is True and "ssl_certificate" not in plain
    assert tls["listen"] == "tcp:443" and "default_server" not in tls
    assert tls["ssl_certificate"] == certificate and tls["ssl_session_timeout"] == 300
    assert plain["location"] == tls["location"]
    assert ["split in two" in e.detail for e in conversion.report if e.directive == "server"] == [True]
    config = parseConfig(conversion.document)
    assert [block.isTLS for block in config.servers] == [False, True]


def test_proxy_protocol_is_approximated(tmp_path):
    conversion = convert(tmp_path, site("listen 8080 proxy_protocol; location / { return 204; }"))
    assert entry(conversion, "listen 8080 proxy_protocol").kind == "approximated"
    assert "PROXY header" in entry(conversion, "listen").detail


def test_a_tls_address_without_certificate_stops_the_run(tmp_path):
    conversion = convert(tmp_path, site("listen 8080; listen 443 ssl; location / { return 204; }"))
    assert [e.directive for e in conversion.blocking] == ["listen 443 ssl"]
    assert "without ssl_certificate" in conversion.blocking[0].detail
    assert [server["listen"] for server in conversion.document["server"]] == ["tcp:8080"]


def test_connection_settings_and_limits(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; client_header_timeout 10s; keepalive_timeout 30; large_client_header_buffers 4 16k;"
            "underscores_in_headers on; set_real_ip_from 10.0.0.0/8; real_ip_header X-Forwarded-For;"
            "limit_conn perip 5; location / { proxy_pass http://app; }",
            http="limit_conn_zone $binary_remote_addr zone=perip:10m;",
        ),
    )
    server = conversion.document["server"][0]
    assert server["client_header_timeout"] == 10 and server["keepalive_timeout"] == 30
    assert server["max_request_line"] == 16384 and server["max_header_size"] == 65536
    assert server["underscores_in_headers"] is True and server["set_real_ip_from"] == ["10.0.0.0/8"]
    assert server["max_connections_per_ip"] == 5
    assert entry(conversion, "limit_conn perip 5").kind == "approximated"
    assert entry(conversion, "real_ip_header").kind == "not needed"
    parseConfig(conversion.document)


# Locations and handlers


def test_location_modifiers_and_handlers(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            """listen 80; root /tmp; error_page 502 503 /50x.html;
            location = /exact { return 200 "exactly"; }
            location ^~ /static/ { alias /tmp/; }
            location ~ ^/api/(v\\d)/ { proxy_pass http://app; }
            location ~* \\.PNG$ { try_files $uri =404; }
            location / { try_files $uri $uri/ @app; }
            location @app { proxy_pass http://127.0.0.1:9001; internal; }
            location /old { return https://example.com/new; }"""
        ),
    )
    found = locations(conversion)
    assert list(found) == ["= /exact", "^~ /static/", "~ ^/api/(v\\d)/", "~* \\.PNG$", "/", "@app", "/old"]
    assert found["= /exact"]["return"] == "200 exactly"
    assert found["^~ /static/"]["alias"] == "/tmp/"
    assert found["/"]["try_files"] == ["$uri", "$uri/", "@app"]
    assert found["@app"]["internal"] is True and found["@app"]["proxy_pass"] == "http://127.0.0.1:9001"
    assert found["/old"]["return"] == "302 https://example.com/new"
    assert found["/"]["error_page"] == {"502 503": "/50x.html"}
    assert conversion.document["server"][0]["root"] == "/tmp"
    parseConfig(conversion.document)


def test_a_server_return_with_locations_answers_everything(tmp_path):
    conversion = convert(tmp_path, site("listen 80 default_server; return 444; location / { proxy_pass http://app; }"))
    assert locations(conversion) == {"/": {"match": "/", "return": "444"}}
    assert entry(conversion, "proxy_pass").kind == "not needed"
    assert "unreachable" in entry(conversion, "location /").detail


def test_a_redirect_server_stays_a_redirect_server(tmp_path):
    conversion = convert(tmp_path, site("listen 80; return 301 https://$host$request_uri;"))
    assert conversion.document["server"][0] == {"listen": "tcp:80", "return": "301 https://$host$request_uri"}
    assert parseConfig(conversion.document).servers[0].isRedirect


def test_nested_locations_are_flattened_with_their_parents_settings(tmp_path):
    conversion = convert(
        tmp_path,
        site("listen 80; location /app/ { proxy_read_timeout 5m; location /app/ws/ { proxy_pass http://app; } }"),
    )
    nested = locations(conversion)["/app/ws/"]
    assert nested["proxy_read_timeout"] == 300
    assert "nested" in entry(conversion, "location /app/ws/").detail


# The upgrade rule


def test_only_locations_that_send_the_upgrade_headers_upgrade(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            f"listen 80; location /ws/ {{ proxy_pass http://app; {UPGRADE} }}"
            "location /api/ { proxy_pass http://app; proxy_set_header Upgrade $http_upgrade; }"
            "location /static/ { root /tmp; }"
        ),
    )
    found = locations(conversion)
    assert "upgrade_protocols" not in found["/ws/"]
    assert found["/api/"]["upgrade_protocols"] == []
    assert "upgrade_protocols" not in found["/static/"]
    assert "upgrade_protocols = []" in entry(conversion, "location /api/").detail
    assert "Upgrade" not in found["/ws/"].get("proxy_set_header", {})


def test_the_map_idiom_under_any_name(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; location / { proxy_pass http://app; proxy_set_header Upgrade $http_upgrade;"
            "proxy_set_header Connection $upgrade_to; }",
            http="map $http_upgrade $upgrade_to { default upgrade; '' close; }",
        ),
    )
    assert "upgrade_protocols" not in locations(conversion)["/"]
    assert entry(conversion, "map").kind == "not needed"
    assert entry(conversion, "default upgrade").kind == "not needed"


def test_a_map_used_in_a_header_is_converted_and_an_unused_one_is_not_needed(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; location / { proxy_pass http://app; proxy_set_header X-Tier $tier; }",
            http='map $http_x_plan $tier { default free; pro "paid-$host"; ~*^ent enterprise; }\n'
            "map $uri $unused { default 1; }",
        ),
    )
    assert entry(conversion, "map $http_x_plan").kind == "converted"
    assert entry(conversion, "pro").detail == "map.tier.values"
    assert conversion.document["map"] == {
        "tier": {"source": "$http_x_plan", "default": "free", "values": {"pro": "paid-$host", "~*^ent": "enterprise"}}
    }
    assert entry(conversion, "proxy_set_header X-Tier").kind == "converted"
    assert entry(conversion, "map $uri").kind == "not needed"
    assert not conversion.blocking
    config = parseConfig(conversion.document, "(converted)")
    assert [variable.name for variable in config.maps] == ["tier"]
    assert "[map.tier]" in conversion.toml


def test_a_map_with_hostnames_stays_unsupported(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; location / { proxy_pass http://app; proxy_set_header X-Site $site; }",
            http="map $http_host $site { hostnames; default a; *.example.com b; }",
        ),
    )
    assert entry(conversion, "map $http_host").affectsClients
    assert "$site" in entry(conversion, "proxy_set_header X-Site").detail


# Inheritance: nginx replaces, wsproxy merges


def test_headers_follow_nginx_replacement_rather_than_wsproxy_merging(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            """listen 80;
            add_header Strict-Transport-Security "max-age=31536000" always;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_hide_header X-Powered-By;
            location / { proxy_pass http://app; }
            location /own/ { proxy_pass http://app; add_header X-Frame-Options DENY always;
                             proxy_set_header X-Own 1; proxy_hide_header X-Debug; }""",
            http="add_header X-Http-Level 1 always;",
        ),
    )
    server = parseConfig(conversion.document).servers[0]
    blocks = {location.match: location.block for location in server.locations}
    assert blocks["/"].add_header == (("Strict-Transport-Security", "max-age=31536000"),)
    assert blocks["/own/"].add_header == (("X-Frame-Options", "DENY"),)
    assert dict(blocks["/"].proxy_set_header) == {"X-Real-IP": "$remote_addr", "Host": "app"}
    assert dict(blocks["/own/"].proxy_set_header) == {"X-Own": "1", "Host": "app"}
    assert blocks["/"].proxy_hide_header == ("X-Powered-By",)
    assert blocks["/own/"].proxy_hide_header == ("X-Debug",)
    assert server.add_header == () and server.proxy_set_header == ()
    assert entry(conversion, "add_header X-Http-Level").kind == "not needed"


def test_add_header_without_always_is_approximated_and_variables_are_unsupported(tmp_path):
    conversion = convert(
        tmp_path,
        site("listen 80; location / { proxy_pass http://app; add_header X-A 1; add_header X-Id $request_id always; }"),
    )
    assert entry(conversion, "add_header X-A 1").kind == "approximated"
    assert "2xx/3xx" in entry(conversion, "add_header X-A 1").detail
    assert entry(conversion, "add_header X-Id").affectsClients


def test_the_host_nginx_sends_by_default(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; location /a/ { proxy_pass http://app; } location /b/ { proxy_pass http://127.0.0.1:9002/v2/; }"
            "location /c/ { proxy_pass http://app; proxy_set_header Host $host; }"
        ),
    )
    found = locations(conversion)
    assert found["/a/"]["proxy_set_header"] == {"Host": "app"}
    assert found["/b/"]["proxy_set_header"] == {"Host": "127.0.0.1:9002"}
    assert found["/c/"]["proxy_set_header"] == {"Host": "$host"}
    details = [e.detail for e in conversion.report if e.directive == "proxy_pass http://app"]
    assert ["$proxy_host" in detail for detail in details] == [True, False]


def test_nginx_defaults_that_differ_from_wsproxy_are_written(tmp_path):
    conversion = convert(tmp_path, site("listen 80; location / { proxy_pass http://app; }"))
    server = parseConfig(conversion.document).servers[0]
    assert server.locations[0].block.client_max_body_size == 1024**2
    assert server.locations[0].block.proxy_connect_timeout == 60
    assert "nginx's default" in conversion.toml


def test_timeouts_inherit_and_a_location_overrides(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; location / { proxy_pass http://app; } location /ws/ { proxy_pass http://app; proxy_read_timeout 1d; }",
            http="proxy_read_timeout 120s; client_max_body_size 0;",
        ),
    )
    blocks = {loc.match: loc.block for loc in parseConfig(conversion.document).servers[0].locations}
    assert blocks["/"].proxy_read_timeout == 120 and blocks["/ws/"].proxy_read_timeout == 86400
    assert blocks["/"].client_max_body_size == 0


# rewrite, if, and what stops a run


def test_server_rewrites_that_redirect_become_regex_locations(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; rewrite ^/old/(.*)$ /new/$1 permanent; rewrite ^/tmp$ https://example.com/t? redirect;"
            "location / { proxy_pass http://app; }"
        ),
    )
    found = locations(conversion)
    assert list(found)[:2] == ["~ ^/old/(.*)$", "~ ^/tmp$"]
    assert found["~ ^/old/(.*)$"]["return"] == "301 /new/$1$is_args$args"
    assert found["~ ^/tmp$"]["return"] == "302 https://example.com/t"
    assert not conversion.blocking


def test_a_rewrite_that_continues_stops_the_run(tmp_path):
    conversion = convert(
        tmp_path, site("listen 80; rewrite ^/a/(.*)$ /b/$1 last; location / { proxy_pass http://app; }")
    )
    assert entry(conversion, "rewrite").affectsClients


def test_a_rewrite_that_strips_the_prefix_before_proxy_pass(tmp_path):
    conversion = convert(
        tmp_path, site("listen 80; location /api/ { rewrite ^/api/(.*)$ /$1 break; proxy_pass http://app; }")
    )
    assert locations(conversion)["/api/"]["proxy_pass"] == "http://app/"
    assert entry(conversion, "rewrite").kind == "converted"


@pytest.mark.parametrize(
    "directive",
    [
        "if ($host = example.com) { return 301 https://$host$request_uri; }",
        'auth_basic "private"; auth_basic_user_file /etc/htpasswd;',
        "limit_req zone=one burst=5;",
        "proxy_cache cache;",
        "set $x 1;",
        "sub_filter a b;",
        "deny all;",
        "proxy_set_header X-Addr $server_addr;",
        "no_such_directive 1;",
    ],
)
def test_directives_that_change_what_clients_receive_stop_the_run(tmp_path, directive):
    conversion = convert(tmp_path, site(f"listen 80; location / {{ proxy_pass http://app; {directive} }}"))
    assert conversion.blocking
    first = conversion.blocking[0]
    assert first.kind == "unsupported" and first.file.endswith("nginx.conf")
    refused = ConversionRefused(conversion.blocking)
    assert refused.entries == conversion.blocking
    assert f"{first.file}:{first.line}: {first.directive}" in str(refused)


def test_an_unknown_variable_is_named(tmp_path):
    conversion = convert(
        tmp_path, site("listen 80; location / { proxy_pass http://app; proxy_set_header X-A $server_addr; }")
    )
    assert "$server_addr" in entry(conversion, "proxy_set_header X-A").detail


def test_the_inside_of_an_if_is_reported_too(tmp_path):
    conversion = convert(
        tmp_path,
        site("listen 80; if ($scheme = http) { return 301 https://$host$request_uri; } location / { return 204; }"),
    )
    inner = [e for e in conversion.report if e.directive.startswith("return 301")]
    assert len(inner) == 1 and inner[0].kind == "unsupported" and "inside if" in inner[0].detail
    assert not inner[0].affectsClients and entry(conversion, "if").affectsClients


# Direct use: loadConfig and twistd


def test_load_config_refuses_blocking_directives_in_one_line(tmp_path):
    path = tmp_path / "nginx.conf"
    path.write_text(site("listen 80; location / { proxy_pass http://app; auth_basic x; } location /b/ { set $a 1; }"))
    with pytest.raises(ConfigError) as caught:
        loadConfig(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {path}:6: auth_basic x: ")
    assert "(2 such directive(s)" in message
    config = loadConfig(path, acceptUnsupported=True)
    assert config.servers[0].locations[0].block.upstream == "app"


def seedText(pki: PKI, upstream: int) -> str:
    """The seed's nginx.conf with its placeholders, certificate paths and ports rewritten, nothing else."""
    certificate, key, _ = pki.issue("fullchain", "localhost", "127.0.0.1")
    text = SEED.read_text()
    replacements = {
        "[APP INSTANCE IP]:[APP PORT]": f"127.0.0.1:{upstream}",
        "/etc/letsencrypt/live/[DOMAIN]/fullchain.pem": certificate,
        "/etc/letsencrypt/live/[DOMAIN]/privkey.pem": key,
        "listen 80;": "listen 127.0.0.1:0;",
        "listen 443 ssl;": "listen 127.0.0.1:0 ssl;",
    }
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_the_seed_converts_with_nothing_blocking(tmp_path, pki):
    path = tmp_path / "nginx.conf"
    path.write_text(seedText(pki, 9000))
    conversion = convertFile(path)
    assert not conversion.blocking
    assert {e.kind for e in conversion.report} == {"converted", "not needed", "approximated"}
    assert entry(conversion, "ssl_session_cache shared:SSL:10m").kind == "approximated"
    assert "10m" in entry(conversion, "ssl_session_cache").detail
    redirect, tls = conversion.document["server"]
    assert redirect == {"listen": "tcp:0:interface=127.0.0.1", "return": "308 https://$host$request_uri"}
    assert tls["ssl_protocols"] == ["TLSv1", "TLSv1.1", "TLSv1.2"]
    assert tls["location"][0]["add_header"] == {"Strict-Transport-Security": "max-age=31536000"}
    assert "upgrade_protocols" not in tls["location"][0]


async def startSeed(cleanup, pki: PKI, tmp_path: Path, upstream: int) -> tuple[int, int]:
    path = tmp_path / "nginx.conf"
    path.write_text(seedText(pki, upstream))
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    top = cleanup.service(tap.makeService(options, reactor))
    top.startService()
    proxy = list(top)[0]
    assert isinstance(proxy, ProxyService)
    redirectPort, tlsPort = [(await listener.listeningPort()).getHost().port for listener in proxy.listeners]
    return redirectPort, tlsPort


@pytest_twisted.ensureDeferred
async def test_the_seed_runs_redirect_tls_settings_and_hsts(cleanup, pki, tmp_path):
    port, factory = listenScripted(lambda request, connection: ok(b"from the app"))
    cleanup.port(port)
    redirectPort, tlsPort = await startSeed(cleanup, pki, tmp_path, port.getHost().port)

    client = await connectRaw(redirectPort)
    client.transport.write(b"GET /a?b=c HTTP/1.1\r\nHost: Example.COM\r\nConnection: close\r\n\r\n")
    redirect = await client.waitClosed()
    assert redirect.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert headers(redirect)[b"location"] == b"https://example.com/a?b=c"
    assert b"strict-transport-security" not in headers(redirect)

    result = await TLSClient(pki.caFile).connect(tlsPort)
    assert result.version == "TLSv1.2"  # the seed's ssl_protocols stop at TLSv1.2
    assert "GCM" in result.cipher  # ECDH+AESGCM first, the server's preference
    assert result.response.startswith(b"HTTP/1.1 200 OK\r\n") and result.response.endswith(b"from the app")
    assert headers(result.response)[b"strict-transport-security"] == HSTS
    upstreamHead = headers(factory.requests[0])
    assert upstreamHead[b"host"] == b"localhost"  # proxy_set_header Host $host


@pytest_twisted.ensureDeferred
async def test_the_seed_carries_a_websocket_to_an_autobahn_echo(cleanup, pki, tmp_path):
    echo = cleanup.port(listenEcho())
    _, tlsPort = await startSeed(cleanup, pki, tmp_path, echo.getHost().port)
    received: list[tuple[bytes, bool]] = []
    opened: Deferred = Deferred()
    done: Deferred = Deferred()

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            opened.callback(self)
            self.sendMessage("héllo".encode(), isBinary=False)
            self.sendMessage(bytes(range(256)) * 64, isBinary=True)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            received.append((payload, isBinary))
            if len(received) == 2:
                self.sendClose(1000)

        def onClose(self, wasClean: bool, code: int, reason: str) -> None:
            done.callback((wasClean, code))

    factory = WebSocketClientFactory(f"wss://localhost:{tlsPort}/ws")
    factory.protocol = Client
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pki.caPEM))
    await wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, tlsPort)).connect(factory)
    client = await opened.addTimeout(10, reactor)
    assert client.http_headers["strict-transport-security"] == HSTS.decode()
    assert await done.addTimeout(10, reactor) == (True, 1000)
    assert received == [("héllo".encode(), False), (bytes(range(256)) * 64, True)]


def upgradeSite(pki: PKI, upstream: int, tls: bool) -> str:
    certificate, key, _ = pki.issue("site", "localhost")
    ssl = f" ssl; ssl_certificate {certificate}; ssl_certificate_key {key}" if tls else ""
    return f"""events {{}}
http {{
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:0{ssl};
    location /ws/ {{ proxy_pass http://127.0.0.1:{upstream}; proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade; }}
    location /api/ {{ proxy_pass http://127.0.0.1:{upstream}; }}
  }}
}}
"""


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_a_location_without_the_upgrade_headers_does_not_upgrade(cleanup, pki, tmp_path, tls):
    port, factory = listenScripted(lambda request, connection: ok(b"plain"))
    cleanup.port(port)
    path = tmp_path / "nginx.conf"
    path.write_text(upgradeSite(pki, port.getHost().port, tls))
    service = cleanup.service(ProxyService(loadConfig(path), reactor))
    service.startService()
    proxyPort = (await service.listeners[0].listeningPort()).getHost().port
    for target, upgraded in ((b"/api/x", False), (b"/ws/x", True)):
        client = await (connectTLS(proxyPort, pki.caPEM) if tls else connectRaw(proxyPort))
        try:
            client.transport.write(upgradeRequest(target))
            assert b"plain" in await client.waitFor(b"plain", timeout=10)
        finally:
            client.transport.abortConnection()
        head = headers(factory.requests[-1])
        assert (b"upgrade" in head) is upgraded, factory.requests[-1]
        assert head[b"host"] == b"127.0.0.1:%d" % port.getHost().port  # nginx's $proxy_host


@pytest_twisted.ensureDeferred
async def test_a_converted_server_rewrite_redirects_with_its_captures(cleanup, tmp_path):
    path = tmp_path / "nginx.conf"
    path.write_text(site("listen 127.0.0.1:0; rewrite ^/old/(.*)$ /new/$1 permanent; location / { return 204; }"))
    service = cleanup.service(ProxyService(loadConfig(path), reactor))
    service.startService()
    proxyPort = (await service.listeners[0].listeningPort()).getHost().port
    client = await connectRaw(proxyPort)
    client.transport.write(b"GET /old/a/b?x=1 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    answer = await client.waitClosed()
    assert answer.startswith(b"HTTP/1.1 301 ")
    assert headers(answer)[b"location"] == b"http://example.com:%d/new/a/b?x=1" % proxyPort


# As an operator runs it


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=ENVIRONMENT)


def test_the_console_script_is_declared():
    assert '"wsproxy-from-nginx = wsproxy.nginxconf:main"' in (REPO / "setup.py").read_text()


def test_the_console_script_writes_toml_and_the_report(tmp_path, pki):
    path = tmp_path / "nginx.conf"
    path.write_text(seedText(pki, 9000))
    out = tmp_path / "wsproxy.toml"
    result = run(sys.executable, "-m", "wsproxy.nginxconf", str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("converted (")
    assert f"{path}:41: location /: " in result.stderr
    assert tomllib.loads(out.read_text()) == convertFile(path).document
    assert loadConfig(out).servers[1].isTLS

    toStdout = run(sys.executable, "-m", "wsproxy.nginxconf", str(path))
    assert toStdout.returncode == 0 and toStdout.stdout == out.read_text()


def test_the_console_script_refuses_blocking_directives(tmp_path):
    path = tmp_path / "nginx.conf"
    path.write_text(site("listen 80; location / { proxy_pass http://app; limit_req zone=z; }"))
    out = tmp_path / "wsproxy.toml"
    result = run(sys.executable, "-m", "wsproxy.nginxconf", str(path), "-o", str(out))
    assert result.returncode == 1
    assert f"  {path}:6: limit_req zone=z: " in result.stderr.split("change what clients receive:")[-1]
    assert not out.exists()
    accepted = run(sys.executable, "-m", "wsproxy.nginxconf", str(path), "-o", str(out), "--accept-unsupported")
    assert accepted.returncode == 0 and out.exists()


def test_twistd_check_prints_the_report_then_the_routing_table(tmp_path, pki):
    path = tmp_path / "nginx.conf"
    path.write_text(seedText(pki, 9000))
    result = run(TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(path), "--check")
    assert result.returncode == 0, result.stderr
    report, _, table = result.stdout.partition("the configuration is valid")
    assert report.startswith(f"wsproxy: {path}: an nginx configuration, converted:\nconverted (")
    assert "ssl_session_cache shared:SSL:10m" in report
    assert "(every request)  -> return 308 https://$host$request_uri" in table
    assert "/                        -> proxy_pass http://app" in table


def test_twistd_refuses_blocking_directives_in_one_line_unless_accepted(tmp_path):
    path = tmp_path / "nginx.conf"
    path.write_text(site("listen 127.0.0.1:0; location / { proxy_pass http://app; auth_basic x; }"))
    result = run(TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"wsproxy: {path}: {path}:6: auth_basic x: unsupported, and it changes what clients receive: "
        "no HTTP authentication: the location would be open (1 such directive(s); --check lists them, "
        "--accept-unsupported runs without them)"
    ]
    checked = run(TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(path), "--check", "--accept-unsupported")
    assert checked.returncode == 0, checked.stderr
    assert "[changes what clients receive]" in checked.stdout


def test_the_aspnet_connection_map_is_the_upgrade_idiom_too(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            "listen 80; location / { proxy_pass http://app; proxy_set_header Upgrade $http_upgrade;"
            "proxy_set_header Connection $connection_upgrade; allow all; }",
            http='map $http_connection $connection_upgrade { "~*Upgrade" $http_connection; default keep-alive; }',
        ),
    )
    assert "upgrade_protocols" not in locations(conversion)["/"]
    assert not conversion.blocking
    assert entry(conversion, "allow all").kind == "not needed"


def test_a_second_certificate_pair_is_approximated(tmp_path, pki):
    rsa, rsaKey, _ = pki.issue("rsa", "example.com")
    other, otherKey, _ = pki.issue("other", "example.com")
    conversion = convert(
        tmp_path,
        site(
            f"listen 443 ssl; ssl_certificate {rsa}; ssl_certificate_key {rsaKey};"
            f"ssl_certificate {other}; ssl_certificate_key {otherKey}; location / {{ return 204; }}"
        ),
    )
    server = conversion.document["server"][0]
    assert (server["ssl_certificate"], server["ssl_certificate_key"]) == (rsa, rsaKey)
    assert entry(conversion, f"ssl_certificate {other}").kind == "approximated"
    assert entry(conversion, f"ssl_certificate {rsa}").kind == "converted"


def test_a_server_without_listen_joins_the_dual_stack_address(tmp_path):
    conversion = convert(
        tmp_path,
        "events {}\nhttp {\n  server { listen [::]:80; server_name a; location / { return 204; } }\n"
        "  server { server_name b; location / { return 204; } }\n}\n",
    )
    assert [s["listen"] for s in conversion.document["server"]] == ["tcp6:80:interface=\\:\\:"] * 2
    parseConfig(conversion.document)


def test_an_upgrading_location_idles_out_as_nginx_does(tmp_path):
    conversion = convert(
        tmp_path,
        site(
            f"listen 80;\n location /ws/ {{ proxy_pass http://app; {UPGRADE} proxy_read_timeout 1d; }}\n"
            f" location /live/ {{ proxy_pass http://app; {UPGRADE} }}\n"
            " location / { proxy_pass http://app; proxy_read_timeout 5m; }"
        ),
    )
    tables = locations(conversion)
    assert tables["/ws/"]["websocket_idle_timeout"] == 86400
    assert tables["/live/"]["websocket_idle_timeout"] == 60, "nginx's default proxy_read_timeout"
    assert "websocket_idle_timeout" not in tables["/"], "a location that does not upgrade has no tunnels"
    assert "websocket_idle_timeout = 86400" in entry(conversion, "location /ws/").detail
