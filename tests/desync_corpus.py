"""Loader for the HTTP desync corpus of aws/http-desync-guardian.

The corpus lives in ``tests/data/http-desync-guardian/`` (158 request cases in
nine YAML files, Apache-2.0, copied verbatim; see the LICENSE, NOTICE and
README.md beside them).  Each case gives a request line (method, URI,
version), a list of header fields and the tier the whole request is expected
to get:

* ``Compliant`` / ``Acceptable``: a proxy forwards it (normalised if needed);
* ``Ambiguous``: a proxy rejects it, or forwards it only in an unambiguous,
  normalised form;
* ``Severe``: a proxy answers 400 and closes the client connection,
  forwarding nothing.

How the strings are decoded
---------------------------
The corpus is read the way its own test harness reads it
(``src/request_analyzer.rs``, ``file_tests``/``extract_value!``):

1. YAML first.  Double-quoted scalars carry YAML escapes (``"\\x01"``,
   ``"\\t"``, ``"\\r\\n"``, ``"\\xa0"`` ...) and keep leading/trailing
   whitespace; plain scalars are taken as their source text (``1000`` is the
   string ``"1000"``, never an int that could be re-rendered differently).
2. Then the harness's own ``unescape_value`` on every name, value, URI,
   method and version: ``\\xHH`` -> code point 0xHH, ``\\b \\f \\n \\r \\t``
   -> the control character, ``\\<c>`` -> ``<c>``.  This matters only where a
   backslash survives step 1: the plain scalar ``uri: /foo/bar\\t/baz``
   (edge-cases.yaml) holds a real TAB, and the "Compliant URL" case's ``\\"``
   is a plain ``"``.

Code points below 256 are written as that single byte (Latin-1), so
``"\\xa0"`` is the obs-text byte 0xA0; code points from 256 up (``ſ``, ``ı``,
``―``, Cyrillic in a URI) are written as UTF-8.

Usage::

    from desync_corpus import loadCases
    for case in loadCases():
        wire = case.toBytes()                          # head only
        wire = case.toBytes(body=case.framedBody())    # head + lenient body
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CORPUS_DIR", "TIERS", "DesyncCase", "loadCases"]

#: Directory holding the copied corpus (no dependency on ../shared).
CORPUS_DIR: Path = Path(__file__).resolve().parent / "data" / "http-desync-guardian"

#: The four request tiers, from safest to most dangerous.
TIERS: tuple[str, ...] = ("Compliant", "Acceptable", "Ambiguous", "Severe")

_NULL_TAG = "tag:yaml.org,2002:null"
_OWS = " \t"
# HTTP/1.x with a minor version >= 1 is processed as HTTP/1.1 (RFC 9110 2.5).
_HTTP11_LIKE = re.compile(r"HTTP/1\.[1-9][0-9]*")


class _CorpusLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that resolves no implicit types except null.

    Same safety as ``yaml.safe_load`` (only plain data is constructed), but a
    plain scalar such as ``1000`` or ``010`` stays the exact source text,
    which is what a header value on the wire is.  Null is kept so that an
    empty ``headers:`` means "no headers".
    """


_CorpusLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag == _NULL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _unescape(text: str) -> str:
    """Apply the corpus harness's ``unescape_value`` (see module docstring).

    Raises ``ValueError`` on a malformed escape (a trailing backslash or
    ``\\x`` not followed by two hex digits), as the harness would panic.
    """
    if "\\" not in text:
        return text
    simple = {"b": "\x08", "f": "\x0c", "n": "\n", "r": "\r", "t": "\t"}
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(text):
            raise ValueError(f"malformed escape at end of {text!r}")
        nxt = text[i + 1]
        if nxt == "x":
            digits = text[i + 2 : i + 4]
            if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"malformed \\x escape in {text!r}")
            out.append(chr(int(digits, 16)))
            i += 4
        else:
            out.append(simple.get(nxt, nxt))
            i += 2
    return "".join(out)


def _wire(text: str) -> bytes:
    """Encode ``text`` byte-exactly: Latin-1 below U+0100, UTF-8 otherwise."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(ch.encode("latin-1") if ord(ch) < 0x100 else ch.encode("utf-8") for ch in text)


@dataclass(frozen=True)
class DesyncCase:
    """One request case of the corpus.

    ``file`` is the YAML file name (e.g. ``"severe.yaml"``), ``index`` the
    case's position in that file (names are not unique: ``acceptable.yaml``
    has two cases called "Get with a body and Content-Length:0"), ``tier`` the
    expected request tier (one of :data:`TIERS`), ``reason`` the guardian's
    classification reason (informative only).  ``method``, ``uri``,
    ``version`` and the ``(name, value)`` pairs of ``headers`` are decoded
    strings, exactly as the corpus means them: control characters, odd
    whitespace and non-ASCII included, leading/trailing whitespace preserved.
    """

    file: str
    name: str
    tier: str
    method: str
    uri: str
    version: str
    headers: tuple[tuple[str, str], ...]
    reason: str = ""
    index: int = 0

    @property
    def caseId(self) -> str:
        """A unique, stable id such as ``"severe.yaml#3"`` (for test ids)."""
        return f"{self.file}#{self.index}"

    def hasHeader(self, fieldName: str) -> bool:
        """True if a header's name equals ``fieldName`` exactly, ignoring ASCII case."""
        wanted = fieldName.lower()
        return any(n.lower() == wanted for n, _ in self.headers)

    def needsHost(self) -> bool:
        """True if :meth:`toBytes` adds a ``Host`` header.

        That is when the case has no header named exactly ``Host`` (any case)
        and its version, stripped of SP/HTAB, is ``HTTP/1.1`` -- or
        ``HTTP/1.x`` with x > 1, which RFC 9110 section 2.5 says to process as
        HTTP/1.1.  So "Extra spaces in version" (``"HTTP/1.1 "``) and
        "Unknown but OK HTTP/1.2" get one, and a strict proxy's verdict on them
        turns on the version alone, not on a missing Host.  HTTP/1.0,
        HTTP/0.9, the empty version and ``"HTTP/1.1 HTTP/1.1"`` get none.
        """
        return not self.hasHeader("host") and bool(_HTTP11_LIKE.fullmatch(self.version.strip(_OWS)))

    def toBytes(self, host: str = "example.com", body: bytes | None = None) -> bytes:
        """Render the request as the bytes a client would send.

        Layout: ``method SP uri SP version CRLF``, then one
        ``name ": " value CRLF`` line per header in corpus order, then
        ``CRLF``, then ``body``.  This is the corpus harness's own raw form
        (``"{} {} {}\\r\\n"``, ``"{}: {}\\r\\n"``): exactly one SP after the
        colon, nothing trimmed, so an empty version still leaves the SP before
        it (``b"GET /foo/bar \\r\\n"``) and an empty URI gives two SPs.  Text
        is encoded with Latin-1 for code points < 256, UTF-8 otherwise.

        A ``Host: <host>`` line is inserted as the first header only when
        :meth:`needsHost` is true: the case has no Host header and is
        HTTP/1.1 (see there); the corpus itself never carries one except in
        "Bad method".  Being first, it puts every corpus header line after
        another field line: a name with leading whitespace (``" Content-Length"``,
        always the first header of its case) is then an obs-fold continuing
        ``Host``, never whitespace right after the start-line (which RFC 9112
        section 2.2 would let a recipient silently skip).

        ``body`` defaults to empty: the bytes end right after the blank line,
        whatever Content-Length or Transfer-Encoding says.  The proxy's
        verdict must depend on the head alone (a rejection comes at once; a
        forwarded request is then simply waiting for its body), and this keeps
        "Large Size OK" (Content-Length 4000000) cheap.  Pass
        ``body=case.framedBody()`` for a body that completes the message the
        way a lenient parser would frame it, or any bytes of your own, which
        are appended verbatim.
        """
        lines = [_wire(f"{self.method} {self.uri} {self.version}")]
        if self.needsHost():
            lines.append(b"Host: " + _wire(host))
        lines.extend(_wire(f"{n}: {v}") for n, v in self.headers)
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    def framedBody(self) -> bytes:
        """A body consistent with what a lenient HTTP/1.1 parser would read.

        Header names and values are compared after stripping SP/HTAB, ignoring
        ASCII case.  If the last transfer coding over all Transfer-Encoding
        fields (parameters after ``;`` dropped) is ``chunked``, the body is
        the empty chunked body ``b"0\\r\\n\\r\\n"`` (Transfer-Encoding wins
        over Content-Length, RFC 9112 section 6.3).  Otherwise, if some other
        Transfer-Encoding is present, ``b""``.  Otherwise the first
        Content-Length whose stripped value is 1 to 18 digits gives that many
        ``b"x"`` bytes.  Otherwise ``b""``.  For Ambiguous and Severe cases
        this is only one of the readings a desync exploits; it exists so that
        forwarded (Compliant/Acceptable) cases can be sent complete.
        """
        codings: list[str] = []
        lengths: list[str] = []
        for name, value in self.headers:
            key = name.strip(_OWS).lower()
            if key == "transfer-encoding":
                codings.extend(c.split(";", 1)[0].strip(_OWS).lower() for c in value.split(",") if c.strip(_OWS))
            elif key == "content-length":
                lengths.append(value.strip(_OWS))
        if codings:
            return b"0\r\n\r\n" if codings[-1] == "chunked" else b""
        for length in lengths:
            # More than 18 digits is no length any parser should honour.
            if length.isascii() and length.isdigit() and len(length) <= 18:
                return b"x" * int(length)
        return b""


def _field(raw: dict[str, Any], key: str, where: str) -> str:
    """Return ``raw[key]`` as a decoded string, or raise ``ValueError``."""
    value = raw.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a scalar, got {value!r}")
    return _unescape(value)


def _loadFile(path: Path) -> list[DesyncCase]:
    """Load the cases of one corpus YAML file, in file order."""
    docs = yaml.load(path.read_text(encoding="utf-8"), Loader=_CorpusLoader)
    if not isinstance(docs, list):
        raise ValueError(f"{path.name}: top level must be a list of cases")
    cases: list[DesyncCase] = []
    for index, raw in enumerate(docs):
        where = f"{path.name}#{index}"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ValueError(f"{where}: a case must be a mapping with a name")
        expected = raw.get("expected") or {}
        tier = expected.get("tier") if isinstance(expected, dict) else None
        if tier not in TIERS:
            raise ValueError(f"{where}: expected.tier {tier!r} not one of {TIERS}")
        headers = tuple((_field(h, "name", where), _field(h, "value", where)) for h in (raw.get("headers") or []))
        cases.append(
            DesyncCase(
                file=path.name,
                name=raw["name"],
                tier=tier,
                method=_field(raw, "method", where),
                uri=_field(raw, "uri", where),
                version=_field(raw, "version", where),
                headers=headers,
                reason=str(expected.get("reason", "")),
                index=index,
            )
        )
    return cases


def loadCases(directory: Path | str | None = None) -> list[DesyncCase]:
    """Load every case of the corpus (158 in total), sorted by file name.

    ``directory`` defaults to :data:`CORPUS_DIR`; every ``*.yaml`` file in it
    is read, cases keeping their order within a file.
    """
    base = Path(directory) if directory is not None else CORPUS_DIR
    files = sorted(base.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no corpus YAML files in {base}")
    return [case for path in files for case in _loadFile(path)]
