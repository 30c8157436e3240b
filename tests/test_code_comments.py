"""Comments and docstrings of the product code say why, not how fast: no measured figures, commit hashes,
dates, "was X, now Y" history or bench/RESULTS.md section references.

A measured figure in a comment is true of one machine on one day and silently wrong after the next change;
the benchmarks and their page (bench/RESULTS.md, docs/benchmarks.md) are where figures live and are rerun.
Fast: reads the sources, starts nothing.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREES = ("predictors", "streaming", "training")

FIGURE = re.compile(
    r"(?<![\w.])[~≈]?\d(?:[\d,.]*\d)?\s?(?:-|to|–)\s?\d(?:[\d,.]*\d)?\s?(?:µs|us|ms|%)(?!\w)"  # 5-8 %, 10 to 20 ms
    r"|(?<![\w.])\d(?:[\d,.]*\d)?\s?(?:µs|us|ms|req/s|msg/s|rows/s|%|MB|GB|x|×)(?![\w/])"  # 40 µs, 12 %, 3x
    r"(?!\s*(?:intervals?|confidence))",  # a 95 % interval is a statistical level, not a measurement
)
HASH = re.compile(r"(?<![\w.:/-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")
RESULTS_SECTION = re.compile(r"RESULTS\.md\s*§|RESULTS\.md,?\s+(?:section|§)")
DATE = re.compile(r"\b20[2-9]\d-[01]\d(?:-[0-3]\d)?\b")
HISTORY = re.compile(r"\bwas\s+[^.;:]{1,40}?,\s*now\b|\bused to (?:take|cost|be)\b", re.IGNORECASE)
CHECKS = {"figure": FIGURE, "hash": HASH, "RESULTS section": RESULTS_SECTION, "date": DATE, "history": HISTORY}

ALLOWED: dict[str, int] = {}
"""Files whose owners are editing them in parallel, with the hits they still carry: path -> hits left. A
file with more hits than its entry fails; lower an entry (delete it at 0) when its file is cleaned."""


def comment_and_docstring_lines(source: str) -> list[tuple[int, str]]:
    """(line, text) of every ``#`` comment and every string statement (docstrings, attribute docstrings)."""
    found: list[tuple[int, str]] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            for offset, line in enumerate(node.value.value.splitlines()):
                found.append((node.lineno + offset, line))
    return found


def hits(path: Path) -> list[str]:
    """``path:line: kind: text`` for every figure, hash, date, history or RESULTS reference in its comments."""
    out = []
    for line, text in comment_and_docstring_lines(path.read_text(encoding="utf-8")):
        for kind, pattern in CHECKS.items():
            match = pattern.search(text)
            if match:
                out.append(f"{path.relative_to(REPO)}:{line}: {kind} {match.group(0)!r}: {text.strip()[:120]}")
    return out


def _sources() -> list[Path]:
    return sorted(p for tree in TREES for p in (REPO / tree).rglob("*.py") if ".venv" not in p.parts)


def test_the_patterns_catch_what_they_are_for() -> None:
    caught = ["about 40 µs per call", "5-8 % of the CPU", "3x faster", "(bench/RESULTS.md §3)", "since 2026-01-04",
              "commit 89be870 moved it", "1,200 req/s on one core", "it was 12 ms, now 3"]
    for text in caught:
        assert any(p.search(text) for p in CHECKS.values()), text
    kept = ["a 10 MiB cap", "95 % intervals", "helm 4.2.x",
            "timeout_s: float = 5.0", "the V2 protocol", "max_pixels: 16_000_000", "IPv4 first",
            "sha256 of the artifact", "HTTP 503", "decode_deadline_s", "one decoding thread", "fp64 inputs"]
    for text in kept:
        assert not any(p.search(text) for p in CHECKS.values()), text


@pytest.mark.parametrize("tree", TREES)
def test_no_measured_figures_in_comments_or_docstrings(tree: str) -> None:
    problems = []
    for path in (p for p in _sources() if p.relative_to(REPO).parts[0] == tree):
        rel = str(path.relative_to(REPO))
        found = hits(path)
        allowed = ALLOWED.get(rel, 0)
        if len(found) > allowed:
            problems.extend(found if allowed == 0 else [f"{rel}: {len(found)} hits, {allowed} allowed", *found])
    assert not problems, "say why, not how fast (no figures, hashes, dates or history):\n" + "\n".join(problems)
