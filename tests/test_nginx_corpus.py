"""
The converter over a corpus of real nginx configurations (see
C{tests/data/nginx/corpus/README.md}): each one converts, every directive
crossplane sees in it has an entry in the report at its own C{file:line},
and the report is pinned in the configuration's C{report.txt}.

A changed report fails the test; C{WSPROXY_REGEN=1} rewrites the pinned
reports (and the test then compares against what it wrote), for when a
change of the converter is meant.  The report is made from the corpus
directory with relative paths, so that the pinned text names the files as
the corpus does, whatever the checkout's location.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crossplane
import pytest

from wsproxy.nginxconf import Conversion, convertFile, formatReport

CORPUS = Path(__file__).parent / "data" / "nginx" / "corpus"
NAMES = sorted(entry.name for entry in CORPUS.iterdir() if entry.is_dir())
REGENERATE = os.environ.get("WSPROXY_REGEN") == "1"
KINDS = ("converted", "not needed", "approximated", "unsupported")


def directives(parsed: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every directive of a crossplane block, blocks' contents included, in file order."""
    for directive in parsed:
        if directive["directive"] == "#":
            # crossplane hands out a comment met inside a directive's arguments even when asked for none.
            continue
        yield directive
        yield from directives(directive.get("block") or [])


def seen(name: str) -> Counter[tuple[str, int, str]]:
    """C{(file, line, directive)} of every directive crossplane sees in configuration C{name}."""
    payload = crossplane.parse(os.path.join(name, "nginx.conf"))
    assert payload["status"] == "ok", payload["errors"]
    found: Counter[tuple[str, int, str]] = Counter()
    for config in payload["config"]:
        for directive in directives(config["parsed"]):
            found[(os.path.normpath(config["file"]), directive["line"], directive["directive"])] += 1
    return found


def convert(name: str) -> Conversion:
    """The conversion of configuration C{name}, run from the corpus directory (the current one)."""
    return convertFile(os.path.join(name, "nginx.conf"))


def reportText(conversion: Conversion) -> str:
    """The report of C{conversion}, with the corpus directory's absolute path left out if it appears."""
    return formatReport(conversion).replace(str(CORPUS.resolve()) + os.sep, "").replace(str(CORPUS) + os.sep, "")


@pytest.fixture
def inCorpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CORPUS)


def test_the_corpus_is_large_enough_and_documented():
    assert len(NAMES) >= 30
    index = (CORPUS / "README.md").read_text()
    for name in NAMES:
        assert (CORPUS / name / "nginx.conf").is_file(), name
        source = (CORPUS / name / "SOURCE.md").read_text()
        assert "**Source:**" in source and "**License:**" in source and "**Style:**" in source, name
        assert f"| {name} |" in index, name


def where(entry: Any) -> tuple[str, int, str]:
    """
    C{(file, line, directive name)} of a report entry, its file relative to
    the corpus directory, the name unquoted as crossplane gives it (a
    C{map}'s C{''} entry).
    """
    file = os.path.relpath(entry.file) if os.path.isabs(entry.file) else entry.file
    return (os.path.normpath(file), entry.line, entry.directive.split(" ", 1)[0].strip("'\""))


@pytest.mark.parametrize("name", NAMES)
def test_every_directive_is_reported(name, inCorpus):
    """As many entries as crossplane sees directives, for each directive name at each C{file:line}."""
    conversion = convert(name)
    reported = Counter(where(entry) for entry in conversion.report)
    missing = [
        f"{file}:{line} {directive} (seen {count}, reported {reported[(file, line, directive)]})"
        for (file, line, directive), count in seen(name).items()
        if reported[(file, line, directive)] < count
    ]
    assert not missing, f"{name}: {len(missing)} directives without a report entry:\n" + "\n".join(missing)
    assert {entry.kind for entry in conversion.report} <= set(KINDS)


@pytest.mark.parametrize("name", NAMES)
def test_report_is_pinned(name, inCorpus):
    text = reportText(convert(name))
    pinned = CORPUS / name / "report.txt"
    if REGENERATE:
        pinned.write_text(text)
    assert pinned.exists(), f"{name}: no pinned report; run with WSPROXY_REGEN=1 to write it"
    assert text == pinned.read_text(), f"{name}: the report differs from {pinned.relative_to(CORPUS.parent)}"


def test_corpus_directive_counts(inCorpus, capsys):
    """The per-kind directive counts over the corpus: every kind occurs, and the total matches crossplane's count."""
    kinds: Counter[str] = Counter()
    blocking = 0
    total = 0
    for name in NAMES:
        conversion = convert(name)
        kinds.update(entry.kind for entry in conversion.report)
        blocking += bool(conversion.blocking)
        total += sum(seen(name).values())
    with capsys.disabled():
        print(
            f"\nnginx corpus: {len(NAMES)} configurations, {total} directives; report entries by kind: "
            + ", ".join(f"{kind} {kinds[kind]}" for kind in KINDS)
            + f"; {blocking} configurations need --accept-unsupported"
        )
    assert set(kinds) <= set(KINDS)
    assert all(kinds[kind] for kind in KINDS), kinds
    assert sum(kinds.values()) >= total
