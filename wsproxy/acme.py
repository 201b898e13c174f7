# -*- test-case-name: tests.test_acme -*-
"""
Let's Encrypt HTTP-01 challenge files, read from a certbot webroot.

C{certbot certonly --webroot -w ROOT} writes each challenge to
C{ROOT/.well-known/acme-challenge/TOKEN}, and the redirect listener serves
it from there (its C{acme_challenge_root}).  Only such a file may ever be
read: the token is checked against the ACME alphabet, so it cannot name
another directory, and no symbolic link is followed anywhere below the
root.  The path is walked one component at a time, each opened with
C{O_NOFOLLOW} relative to its parent's descriptor: a symlinked
C{acme-challenge} (or C{.well-known}) directory pointing outside the
webroot, left there by a deployment script or planted by whoever can write
to the webroot, must not turn the listener into a reader of that other
directory.  The root itself is the administrator's choice and may be a
link.

Whatever cannot be served is a 404, and says nothing about why to the
client.  The log does: a refused symbolic link is a warning (certbot fails
to renew and the administrator needs to know why), and a failure that
points at the server (an unreadable or missing webroot, an I/O error) is
an error.
"""

from __future__ import annotations

import errno
import os
import re
import stat

from twisted.logger import Logger

from .http import HTTPError

__all__ = ["readChallenge"]

log = Logger()

#: The characters of an ACME token (RFC 8555 §8.3: base64url, no padding).
#: None of them is C{.}, C{/}, C{%} or C{\\}: no traversal, encoded or not.
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")

#: Why a challenge file may fail to open that says nothing about the
#: server: it is missing, or a directory is in the way.  A 256-byte token is
#: one byte longer than most file systems allow a name to be.
_EXPECTED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})
#: What C{open} answers for a symbolic link with C{O_NOFOLLOW}: ELOOP
#: (EMLINK on FreeBSD), or ENOTDIR on Linux when C{O_DIRECTORY} is given.
_MAYBE_LINK = frozenset({errno.ELOOP, errno.EMLINK, errno.ENOTDIR})

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
#: C{O_NONBLOCK}: opening a FIFO for reading would otherwise wait for a writer.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)


def readChallenge(root: str, token: bytes, maxSize: int = 65536) -> bytes:
    """
    The contents of C{ROOT/.well-known/acme-challenge/TOKEN}, at most
    C{maxSize} bytes of it.

    @param root: the webroot given to certbot.
    @param token: the last path segment of the request, without its query.
    @raise HTTPError: 404 if C{token} is no ACME token, or if the file is
        missing, is not a regular file, or is reached through a symbolic
        link below C{root}.  A symbolic link is logged as a warning (the
        administrator may have made it and wonder why renewals fail); an
        unexpected failure, or a missing webroot, as an error.
    """
    if not _TOKEN.fullmatch(token):
        raise HTTPError(404, "no such challenge")
    name = token.decode("ascii")
    descriptors: list[int] = []
    # The component being opened, for the log.
    component = root
    try:
        # The webroot must be there: its absence is a fault worth logging,
        # whereas a missing .well-known only means no challenge is pending.
        descriptors.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
        for component in (".well-known", "acme-challenge"):
            descriptors.append(os.open(component, _DIRECTORY, dir_fd=descriptors[-1]))
        component = name
        fd = os.open(name, _FILE, dir_fd=descriptors[-1])
        descriptors.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HTTPError(404, "no such challenge")
        return _readAtMost(fd, maxSize)
    except OSError as e:
        if descriptors and e.errno in _MAYBE_LINK and _isLink(component, descriptors[-1]):
            log.warn(
                "ACME challenge {token} refused: {component} under {root} is a symbolic link, which is never followed",
                token=name,
                component=component,
                root=root,
            )
        elif not descriptors or e.errno not in _EXPECTED:
            log.error(
                "cannot read ACME challenge {token} under {root}: {why}",
                token=name,
                root=root,
                why=e.strerror or str(e),
            )
        raise HTTPError(404, "no such challenge") from None
    finally:
        for descriptor in reversed(descriptors):
            os.close(descriptor)


def _isLink(name: str, directory: int) -> bool:
    """Whether C{name} in C{directory} is a symbolic link; only to say so in the log."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _readAtMost(fd: int, maxSize: int) -> bytes:
    """Up to C{maxSize} bytes from C{fd}, reading on until the end of the file."""
    pieces = []
    remaining = maxSize
    while remaining > 0:
        piece = os.read(fd, remaining)
        if not piece:
            break
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)
