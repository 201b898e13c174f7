"""
Configuration: the issue's example file loads as written; every mistake is
one line naming the file, the key and the problem.
"""

from __future__ import annotations

import pickle

import pytest

from wsproxy.config import ConfigError, UpstreamAddress, loadConfig, parseUpstreamAddress

EXAMPLE = """
[upstream.app]                       # nginx: upstream app { server ...; server ...; }
servers = ["127.0.0.1:9001", "127.0.0.1:9002"]

[[server]]                           # nginx: server { listen ...; location / { proxy_pass http://app; } }
listen = "tcp:8080:interface=127.0.0.1"   # any Twisted server endpoint description
proxy_pass = "http://app"
proxy_connect_timeout = 5            # seconds
proxy_read_timeout = 60              # waiting for the upstream's response head
"""


def write(tmp_path, text: str):
    path = tmp_path / "wsproxy.toml"
    path.write_text(text)
    return path


def problem(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        loadConfig(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


def test_the_example_file_loads_as_written(tmp_path):
    config = loadConfig(write(tmp_path, EXAMPLE))
    assert [str(a) for a in config.upstreams["app"].servers] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    (server,) = config.servers
    assert server.listen == "tcp:8080:interface=127.0.0.1"
    assert server.upstream == "app"
    assert (server.proxy_connect_timeout, server.proxy_read_timeout) == (5.0, 60.0)
    assert server.websocket_idle_timeout == 0


def test_unknown_key(tmp_path):
    assert problem(tmp_path, EXAMPLE + "proxy_buffering = true\n") == "server[0].proxy_buffering: unknown key"


def test_wrong_type(tmp_path):
    text = EXAMPLE.replace("proxy_read_timeout = 60", "proxy_read_timeout = true")
    assert (
        problem(tmp_path, text)
        == "server[0].proxy_read_timeout: expected an integer or a number or a string, got a boolean"
    )


def test_durations_and_sizes_take_nginx_units(tmp_path):
    text = EXAMPLE.replace("proxy_read_timeout = 60", 'proxy_read_timeout = "2m"\nclient_max_body_size = "10m"')
    (server,) = loadConfig(write(tmp_path, text)).servers
    assert server.proxy_read_timeout == 120.0
    assert server.client_max_body_size == 10 * 1024 * 1024
    assert problem(tmp_path, EXAMPLE.replace("= 60", '= "soon"')).startswith(
        "server[0].proxy_read_timeout: not a duration"
    )


def test_proxy_pass_naming_no_upstream(tmp_path):
    text = EXAMPLE.replace('proxy_pass = "http://app"', 'proxy_pass = "http://api"')
    assert problem(tmp_path, text) == "server[0].proxy_pass: no [upstream.api] (known: app)"


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError) as caught:
        loadConfig(tmp_path / "missing.toml")
    assert str(caught.value) == f"{tmp_path / 'missing.toml'}: (file): cannot read: No such file or directory"
    assert problem(tmp_path, "[[server]\n").startswith("(syntax): ")


def test_bad_upstream_servers(tmp_path):
    assert problem(tmp_path, EXAMPLE.replace('"127.0.0.1:9002"', '"127.0.0.1"')) == (
        "upstream.app.servers: missing port in '127.0.0.1' (use host:port)"
    )
    assert problem(tmp_path, EXAMPLE.replace('"127.0.0.1:9002"', '"127.0.0.1:99999"')).startswith(
        "upstream.app.servers: bad port"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:80", UpstreamAddress("127.0.0.1", 80)),
        ("[::1]:8443", UpstreamAddress("::1", 8443)),
        ("https://App.Internal:8443", UpstreamAddress("app.internal", 8443, tls=True)),
        ("https://app.internal", UpstreamAddress("app.internal", 443, tls=True)),
        ("http://app:81", UpstreamAddress("app", 81)),
    ],
)
def test_upstream_addresses(text, expected):
    assert parseUpstreamAddress(text) == expected


def test_a_listener_needs_proxy_pass_or_return(tmp_path):
    text = '[upstream.app]\nservers = ["127.0.0.1:1"]\n[[server]]\nlisten = "tcp:80"\n'
    assert problem(tmp_path, text).startswith("server[0].proxy_pass: is required")


def test_a_configuration_needs_a_server(tmp_path):
    assert problem(tmp_path, '[upstream.app]\nservers = ["127.0.0.1:1"]\n') == (
        "server: at least one [[server]] block is required"
    )


def test_a_configuration_survives_pickling(tmp_path):
    """The parent of C{workers = N} sends its workers the configuration it checked, pickled."""
    text = (
        EXAMPLE
        + 'add_header = { "X-A" = "1" }\n[[server]]\nlisten = "tcp:8081"\nreturn = "308 https://$host$request_uri"\n'
    )
    config = loadConfig(write(tmp_path, text))
    assert pickle.loads(pickle.dumps(config)) == config


def test_a_server_name_must_be_ascii(tmp_path):
    """An HTTP/1.0 request without Host is forwarded with it: it must be encodable."""
    message = problem(tmp_path, EXAMPLE + 'server_name = "bücher.example"\n')
    assert message.startswith("server[0].server_name: must be ASCII")
    assert "punycode" in message
