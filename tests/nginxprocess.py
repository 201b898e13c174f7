"""
A real nginx for the tests.  Where nginx's behaviour is the specification
(routing, variables, static files, the converter, what is forwarded and
logged) nginx is the oracle: the same requests go to it and to wsproxy, or
the same configuration to C{nginx -t} and to wsproxy's own checks, and the
two must agree.  The nginx is Debian's package, which the README's test
command installs; a missing nginx fails the tests rather than skipping them.

An nginx here runs in the foreground as a child of the test, in a
temporary prefix of its own, and listens on UNIX sockets in it, so that no
port has to be guessed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from support import until
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

#: Debian's nginx; the README's test command installs it.
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

#: What a missing nginx fails with.
MISSING = "the nginx oracle needs Debian's nginx: apt-get install -y nginx"

#: An nginx.conf around the body of its C{http} block; see L{httpConfiguration}.
PROLOGUE = """
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {errorLog};
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
}}
"""


def httpConfiguration(prefix: Path, http: str, errorLog: str | None = None) -> str:
    """
    A whole nginx.conf for an nginx in C{prefix}: one worker, running as
    root as the tests do (so that it may read the files they make), its
    pid file and its temporary directories in C{prefix}, and C{http} as
    the body of the C{http} block.

    @param prefix: The directory nginx runs in.
    @param http: The directives of the C{http} block (servers, logs, maps).
    @param errorLog: The arguments of C{error_log}; by default
        C{<prefix>/error.log} at level C{info}.
    @return: The configuration's text.
    """
    if errorLog is None:
        errorLog = f"{prefix}/error.log info"
    return PROLOGUE.format(prefix=prefix, errorLog=errorLog, http=http.strip("\n"))


def configurationTest(prefix: Path, conf: str) -> subprocess.CompletedProcess[bytes]:
    """
    Ask C{nginx -t} about a configuration, written as C{nginx.conf} in
    C{prefix}.

    @param prefix: The directory nginx would run in; made if missing.
    @param conf: The whole nginx.conf.
    @return: The finished C{nginx -t}: its exit status says whether nginx
        accepts C{conf}, its standard error why not.
    """
    assert Path(NGINX).exists(), MISSING
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(conf, encoding="utf-8")
    return subprocess.run(
        [NGINX, "-t", "-q", "-e", "stderr", "-p", str(prefix), "-c", str(config)], capture_output=True, timeout=30
    )


def accepting(path: Path) -> bool:
    """
    Whether something accepts connections on the UNIX socket C{path}:
    nginx creates the file before it listens on it.
    """
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class NginxProcess:
    """
    A real nginx in the foreground, started on creation: its configuration
    is C{nginx.conf} in its prefix, what it writes to its standard error
    is kept in C{stderr.log} there.

    @ivar config: The configuration file.
    @ivar sockets: The UNIX sockets nginx must accept connections on to
        count as started.
    @ivar socket: The first of them.
    @ivar process: The nginx process.
    """

    def __init__(
        self,
        prefix: Path,
        conf: str,
        sockets: Sequence[Path] = (),
        errorLog: str = "stderr",
        directives: str = "",
    ) -> None:
        """
        Write C{conf} and start nginx on it.

        @param prefix: The directory nginx runs in; made if missing.
        @param conf: The whole nginx.conf, such as L{httpConfiguration}
            makes.
        @param sockets: What nginx listens on; by default C{nginx.sock} in
            C{prefix}.
        @param errorLog: Where nginx logs before it has read C{conf}, and
            where a C{conf} without C{error_log} has it log (C{-e}).
        @param directives: Main-context directives given on the command
            line after C{daemon off;} (C{-g}), for a C{conf} without them.
        """
        assert Path(NGINX).exists(), MISSING
        prefix.mkdir(parents=True, exist_ok=True)
        self.config = prefix / "nginx.conf"
        self.config.write_text(conf, encoding="utf-8")
        self.sockets = list(sockets) or [prefix / "nginx.sock"]
        self.socket = self.sockets[0]
        self._stderr = prefix / "stderr.log"
        command = [NGINX, "-p", str(prefix), "-c", str(self.config), "-e", errorLog, "-g", f"daemon off; {directives}"]
        with self._stderr.open("wb") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)

    def errors(self) -> str:
        """
        @return: What nginx has written to its standard error so far.
        """
        return self._stderr.read_text(errors="replace")

    def _listening(self) -> bool:
        """
        Whether nginx accepts connections on all its sockets.

        @raise AssertionError: nginx has exited, with what it said.
        """
        exited = self.process.poll()
        assert exited is None, f"nginx ({self.config}) exited with {exited}:\n{self.errors()}"
        return all(accepting(path) for path in self.sockets)

    async def started(self, timeout: float = 10) -> None:
        """
        Wait, running the reactor, until nginx accepts connections on all
        its sockets.

        @param timeout: How many seconds nginx has to get there.
        @raise AssertionError: nginx has exited, or it is not listening in
            time (and is stopped); with what it said.
        """
        listening = await until(self._listening, timeout)
        if not listening:
            self.stop()
        assert listening, f"nginx ({self.config}) not listening in time:\n{self.errors()}"

    def waitStarted(self, timeout: float = 10) -> None:
        """
        L{started}, blocking, for a test that does not run the reactor.
        """
        deadline = time.monotonic() + timeout
        while not self._listening():
            if time.monotonic() >= deadline:
                self.stop()
                raise AssertionError(f"nginx ({self.config}) not listening in time:\n{self.errors()}")
            time.sleep(0.01)

    def fetch(self, request: bytes) -> bytes:
        """
        Send C{request} on L{socket} and read until nginx closes, blocking,
        for a test that does not run the reactor.

        @param request: The bytes to send.
        @return: All nginx sent back.
        """
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(10)
            connection.connect(str(self.socket))
            connection.sendall(request)
            received = []
            while chunk := connection.recv(65536):
                received.append(chunk)
        return b"".join(received)

    def stop(self) -> None:
        """
        Stop nginx, if it still runs, and wait until it has exited.
        """
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)


@implementer(IOpenSSLClientConnectionCreator)
class SNIOnly:
    """
    A TLS client that sends C{name} as SNI and trusts whatever certificate
    comes back: for comparing how servers route by name, not for checking
    certificates.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def clientConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        connection = SSL.Connection(context, None)
        connection.set_tlsext_host_name(self.name.encode("ascii"))
        connection.set_app_data(protocol)
        return connection
