"""
L{wsproxy.acme.readChallenge}: a certbot webroot's challenge files are
served, and nothing else is, whatever the token and whatever symbolic
links lie below the webroot.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.logger import Logger

from wsproxy import acme
from wsproxy.acme import readChallenge
from wsproxy.http import HTTPError

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
CONTENT = (TOKEN + ".thumbprint").encode()
SECRET = b"private key material"


@pytest.fixture
def webroot(tmp_path: Path) -> Path:
    """A certbot webroot with one challenge, and a secret outside it laid out like a webroot."""
    root = tmp_path / "www"
    challenges = root / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / TOKEN).write_bytes(CONTENT)
    outside = tmp_path / "outside" / ".well-known" / "acme-challenge"
    outside.mkdir(parents=True)
    (outside / "secret").write_bytes(SECRET)
    return root


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The events L{wsproxy.acme} logs."""
    events: list[dict] = []
    monkeypatch.setattr(acme, "log", Logger(namespace="wsproxy.acme", observer=events.append))
    return events


def refusal(root: Path | str, token: bytes) -> str:
    with pytest.raises(HTTPError) as raised:
        readChallenge(str(root), token)
    assert raised.value.status == 404
    return raised.value.message


def openDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_challenge_file_is_served(webroot, logged):
    assert readChallenge(str(webroot), TOKEN.encode()) == CONTENT
    assert logged == []


def test_at_most_max_size_bytes_are_read(webroot):
    assert readChallenge(str(webroot), TOKEN.encode(), maxSize=5) == CONTENT[:5]


def test_a_root_that_is_itself_a_link_is_followed(webroot, tmp_path):
    """The root is the administrator's choice; only what lies below it must be no link."""
    (tmp_path / "alias").symlink_to(webroot)
    assert readChallenge(str(tmp_path / "alias"), TOKEN.encode()) == CONTENT


def test_a_missing_challenge_is_404_and_not_logged(webroot, logged):
    assert refusal(webroot, b"missing") == "no such challenge"
    assert logged == []


def test_no_pending_challenge_at_all_is_404_and_not_logged(tmp_path, logged):
    assert refusal(tmp_path, TOKEN.encode()) == "no such challenge"
    assert logged == []


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b".",
        b"..",
        b"../secret",
        b"../../outside/.well-known/acme-challenge/secret",
        b"%2e%2e",
        b"%2e%2e%2fsecret",
        b"..%2fsecret",
        b"..\\secret",
        b"a/b",
        b"/etc/passwd",
        b"tok.en",
        b"tok en",
        b"tok\x00en",
        b"\xc3\xa9",
        b"a" * 257,
    ],
)
def test_a_token_outside_the_acme_alphabet_is_404(webroot, token):
    assert refusal(webroot, token) == "no such challenge"


def test_a_256_character_token_is_404_and_not_logged(webroot, logged):
    """Longer than a file name may be (ENAMETOOLONG): a client's doing, not the server's fault."""
    assert refusal(webroot, b"a" * 256) == "no such challenge"
    assert logged == []


def test_a_linked_acme_challenge_directory_is_404(webroot, tmp_path, logged):
    """The certbot-webroot trap: acme-challenge -> a directory outside the root, whose file exists."""
    challenges = webroot / ".well-known" / "acme-challenge"
    (challenges / TOKEN).unlink()
    challenges.rmdir()
    challenges.symlink_to(tmp_path / "outside" / ".well-known" / "acme-challenge")
    assert (challenges / "secret").read_bytes() == SECRET
    assert refusal(webroot, b"secret") == "no such challenge"
    assert [(e["log_level"].name, e["component"]) for e in logged] == [("warn", "acme-challenge")]


def test_a_linked_well_known_directory_is_404(webroot, tmp_path, logged):
    wellKnown = webroot / ".well-known"
    (wellKnown / "acme-challenge" / TOKEN).unlink()
    (wellKnown / "acme-challenge").rmdir()
    wellKnown.rmdir()
    wellKnown.symlink_to(tmp_path / "outside" / ".well-known")
    assert (wellKnown / "acme-challenge" / "secret").read_bytes() == SECRET
    assert refusal(webroot, b"secret") == "no such challenge"
    assert [(e["log_level"].name, e["component"]) for e in logged] == [("warn", ".well-known")]


def test_a_linked_challenge_file_is_404(webroot, tmp_path, logged):
    link = webroot / ".well-known" / "acme-challenge" / "linked"
    link.symlink_to(tmp_path / "outside" / ".well-known" / "acme-challenge" / "secret")
    assert link.read_bytes() == SECRET
    assert refusal(webroot, b"linked") == "no such challenge"
    assert [(e["log_level"].name, e["component"]) for e in logged] == [("warn", "linked")]


def test_a_link_to_a_file_inside_the_root_is_404_too(webroot):
    (webroot / ".well-known" / "acme-challenge" / "alias").symlink_to(TOKEN)
    assert refusal(webroot, b"alias") == "no such challenge"


def test_a_dangling_link_is_404(webroot, logged):
    (webroot / ".well-known" / "acme-challenge" / "dangling").symlink_to("/nonexistent/file")
    assert refusal(webroot, b"dangling") == "no such challenge"
    assert [e["log_level"].name for e in logged] == ["warn"]


def test_a_directory_named_like_a_token_is_404(webroot, logged):
    (webroot / ".well-known" / "acme-challenge" / "directory").mkdir()
    assert refusal(webroot, b"directory") == "no such challenge"
    assert logged == []


def test_a_fifo_is_404_without_blocking(webroot):
    """Opening a FIFO for reading waits for a writer, unless it is opened non-blocking."""
    os.mkfifo(webroot / ".well-known" / "acme-challenge" / "fifo")
    outcome: list[str] = []
    reader = threading.Thread(target=lambda: outcome.append(refusal(webroot, b"fifo")), daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():
        # Unblock the reader so the thread can end, then fail.
        with open(webroot / ".well-known" / "acme-challenge" / "fifo", "wb"):
            pass
        pytest.fail("readChallenge blocked on a FIFO")
    assert outcome == ["no such challenge"]


def test_every_descriptor_is_closed(webroot, tmp_path):
    (webroot / ".well-known" / "acme-challenge" / "directory").mkdir()
    (webroot / ".well-known" / "acme-challenge" / "linked").symlink_to(TOKEN)
    before = openDescriptors()
    for _ in range(20):
        readChallenge(str(webroot), TOKEN.encode())
        for token in (b"missing", b"directory", b"linked", b"a" * 256):
            refusal(webroot, token)
        refusal(tmp_path / "nowhere", TOKEN.encode())
    assert openDescriptors() == before


def test_a_missing_webroot_is_404_and_logged(tmp_path, logged):
    assert refusal(tmp_path / "nowhere", TOKEN.encode()) == "no such challenge"
    assert [event["why"] for event in logged] == [os.strerror(errno.ENOENT)]


def test_an_unexpected_error_is_logged_then_404(webroot, logged, monkeypatch):
    """An I/O error reading a challenge is the server's problem: logged, and still only a 404 to the client."""

    def failingRead(fd: int, size: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(acme, "os", SimpleNamespace(**{**vars(os), "read": failingRead}))
    before = openDescriptors()
    assert refusal(webroot, TOKEN.encode()) == "no such challenge"
    assert openDescriptors() == before
    assert len(logged) == 1
    event = logged[0]
    assert (event["token"], event["root"], event["why"]) == (TOKEN, str(webroot), os.strerror(errno.EIO))
    assert event["log_level"].name == "error"
