"""
nginx as the oracle for the variables of L{wsproxy.variables}: one nginx
answers C{location /v} with C{return 200 "<template>"}, and for the same
request bytes the template expanded by wsproxy (over the proxy's own
parser) must be what nginx sent back.  The same goes for configuration
errors: nginx refuses a template (C{nginx -t}) exactly when
L{compileTemplate} does.

nginx listens on a UNIX socket in the test's directory, as in
C{test_nginx_oracle}.  Not compared here, because the installed nginx (1.22)
differs from current nginx and from wsproxy: a header sent twice under a
name other than C{Cookie} and C{X-Forwarded-For}, which nginx 1.22 gives
the first value of and 1.23 and later join (C{test_variables} covers it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nginxprocess import NginxProcess, configurationTest, httpConfiguration

from wsproxy.http import parseRequestHead
from wsproxy.variables import RequestContext, VariableError, compileTemplate

SERVER_NAME = "oracle.test"

TEMPLATE = (
    "$arg_a|$arg_B|${arg_c}x|$Arg_Longer_Name|$http_x_y|$HTTP_X_Y|$http_my_header|$http_cookie|"
    "$http_x_forwarded_for|$cookie_a|$cookie_b|$cookie_Mixed|$host|$http_host|$request_uri|$args|"
    "$query_string|$is_args|$request_method|$content_length|$content_type|$server_name|<$1$2>|$host$is_args"
)

HTTP = """
    access_log off;
    server {{
        listen unix:{prefix}/nginx.sock;
        server_name {serverName};
        location /v {{ return 200 '{template}'; }}
    }}
"""

#: Request heads (without the blank line); each is sent with Connection: close.
REQUESTS = [
    b"GET /v HTTP/1.1\r\nHost: example.com",
    b"GET /v?a=1&a=2&B=3&c= HTTP/1.1\r\nHost: Example.COM.:8080",
    b"GET /v?xa=1&a=%20+x&b HTTP/1.1\r\nHost: [::1]:80",
    b"GET /v?a=b=c&&c=d;e&longer_name=L&LONGER_NAME=M HTTP/1.1\r\nHost: 192.0.2.1",
    b"GET /v?ba=1&A=2&b=&c HTTP/1.1\r\nHost: h",
    b"GET /v? HTTP/1.1\r\nHost: h",
    b"GET /v?a HTTP/1.1\r\nHost: h",
    b"GET http://Abs.Example:81/v?a=9 HTTP/1.1\r\nHost: other.example",
    b"GET /v?a=1 HTTP/1.0",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: a=1; b=2",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: a = 1 ;b= 2 ",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: b=3\r\nCookie: a=1; b=2",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: aa=1; a=2; mixed=M",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: a=1,b=2",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: x=1, a=2",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: a; a=1",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: a;a=1; b=2",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: b; a=1; MIXED=m",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: a=\r\nCookie: a=2; b",
    b"GET /v HTTP/1.1\r\nHost: h\r\nCookie: A=x",
    b"GET /v HTTP/1.1\r\nHost: h\r\nx-Y: 1\r\nMy-Header: m",
    b"GET /v HTTP/1.1\r\nHost: h\r\nX_Y: u\r\nMy_Header: m",
    b"GET /v HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2, 3.3.3.3",
    b"POST /v?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Type: text/plain; charset=utf-8",
]

#: Templates nginx refuses or accepts; C{compileTemplate} must agree.
CONFIG_CASES = [
    ("a$", False),
    ("$$", False),
    ("a $ b", False),
    ("${}", False),
    ("${host", False),
    ("${ho-st}", False),
    ("$ho-st", False),
    ("$0", False),
    ("${1}", False),
    ("$unknown", False),
    ("$1", True),
    ("$12", True),
    ("$HOST", True),
    ("${Arg_A}x", True),
    ("https://$host$request_uri", True),
    ("$request_id", True),
    ("$http_x_y$cookie_c$arg_d", True),
    ("100%-{}", True),
]


def configuration(prefix: Path, template: str) -> str:
    """An nginx.conf whose C{location /v} answers with C{template}."""
    return httpConfiguration(prefix, HTTP.format(prefix=prefix, serverName=SERVER_NAME, template=template))


class Nginx(NginxProcess):
    """A real nginx answering with one template, in the foreground."""

    def __init__(self, prefix: Path, template: str) -> None:
        super().__init__(prefix, configuration(prefix, template))
        self.waitStarted()


def accepts(prefix: Path, template: str) -> bool:
    """Whether C{nginx -t} accepts the configuration with C{template}."""
    return configurationTest(prefix, configuration(prefix, template)).returncode == 0


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory):
    server = Nginx(tmp_path_factory.mktemp("nginx"), TEMPLATE)
    yield server
    server.stop()


def wsproxyExpansion(head: bytes, body: bytes) -> bytes:
    request = parseRequestHead(head)
    path, _, args = request.path.partition(b"?")
    ctx = RequestContext(
        request,
        clientAddress="unix:",
        clientPort=0,
        serverPort=0,
        scheme=b"http",
        serverName=SERVER_NAME.encode(),
        uri=path,
        args=args,
        forwardedFor=b"unix:",
    )
    return compileTemplate(TEMPLATE).expand(ctx)


@pytest.mark.parametrize("head", REQUESTS, ids=range(len(REQUESTS)))
def test_expansions_are_what_nginx_returns(nginx: Nginx, head: bytes) -> None:
    body = b"abc" if head.startswith(b"POST") else b""
    request = head + b"\r\nConnection: close\r\n\r\n"
    response = nginx.fetch(request + body)
    status, _, rest = response.partition(b"\r\n")
    assert status.split(b" ")[1] == b"200", response
    fromNginx = rest.partition(b"\r\n\r\n")[2]
    assert wsproxyExpansion(request, body) == fromNginx


@pytest.mark.parametrize(("template", "valid"), CONFIG_CASES, ids=[case[0] for case in CONFIG_CASES])
def test_templates_are_refused_as_nginx_refuses_them(tmp_path: Path, template: str, valid: bool) -> None:
    assert accepts(tmp_path, template) is valid, "what nginx does here"
    if valid:
        compileTemplate(template)
    else:
        with pytest.raises(VariableError):
            compileTemplate(template)
