"""Every shell command and example request in README.md and docs/*.md, run against a live server.

A fenced block whose info string is ``bash`` or ``python`` is runnable: it is run as written, with the
documented ports (8080 for REST, 8081 for gRPC, on ``localhost`` or ``127.0.0.1``) replaced by those of a
server this module starts on the committed packages in ``models/``. A runnable block that needs what a test
cannot give it here (a cluster, a broker, a long training run, a server of its own) is preceded by
``<!-- not-run: <reason> -->``; the reason must be there and must not be empty. Other blocks (``json``,
``yaml``, ``text``, ``promql``...) show answers and configuration and are not run.

Blocks run in page order, README.md first, each in a shell of its own (``bash -euo pipefail``; a ``python``
block in the test's interpreter), against one server, so a block may use what an earlier one sent (feedback
for a version before the comparison of versions). They run from a directory that holds ``models/``, links to
``helm/``, ``tests/``, ``manifests/`` and ``pyproject.toml``, and ``digit.png``, a real MNIST test digit drawn
dark on light as a photo would show it. A block passes when it exits 0 and prints no JSON error answer
(``"error": "..."``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures.digits import load_test_digits
from tests.fixtures.server import TRAINED_MODELS, ServerHandle, start_model_server

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = ("bash", "python")
README_MAX_LINES = 300
BLOCK_TIMEOUT_S = 120
ERROR_ANSWER = re.compile(r'"error"\s*:\s*"')

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not-run:(?P<reason>.*?)-->\s*\Z", re.DOTALL)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    body: str
    not_run: str | None

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()]
        marker = NOT_RUN.search(before)
        found.append(Block(page, before.count("\n") + 1, match.group("info").strip().split(" ")[0],
                           match.group("body"), marker.group("reason").strip() if marker else None))
    return found


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language in RUNNABLE and b.not_run is None]


def test_the_pages_exist_and_the_readme_is_short() -> None:
    names = {p.name for p in PAGES}
    for page in ("serving.md", "feedback.md", "streaming.md", "deployment.md", "operations.md", "benchmarks.md",
                 "development.md"):
        assert page in names, f"docs/{page} is missing"
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_block_that_is_not_run_says_why(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for block in blocks(page):
        if block.not_run is not None:
            assert block.not_run, f"{block.where()}: a not-run marker without a reason"
            assert block.language in RUNNABLE, (f"{block.where()}: a not-run marker on a {block.language!r} block, "
                                                f"which is never run anyway")
    markers = len(re.findall(r"^<!--\s*not-run:", text, flags=re.M))
    marked = sum(b.not_run is not None for b in blocks(page))
    assert markers == marked, f"{page.name}: a not-run marker that does not stand right before a code block"
    assert text.count("```") % 2 == 0, f"{page.name}: an unclosed code fence"


def test_the_readme_and_the_api_pages_run_examples() -> None:
    """The pages that describe calls show runnable ones, so the test below checks something."""
    for name in ("README.md", "serving.md", "feedback.md", "operations.md"):
        page = next(p for p in PAGES if p.name == name)
        assert runnable(page), f"{name} has no runnable example"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The committed packages, served with a feedback database of this module's own."""
    with start_model_server(TRAINED_MODELS, tmp_path_factory.mktemp("docs-server")) as handle:
        yield handle


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the examples run, as from the repository root: ``models/`` (the committed packages), ``helm/``,
    ``tests/``, ``manifests/`` and ``pyproject.toml`` (links into the repository), and
    digit.png, a real MNIST test 7, dark ink on light paper, 4× its size."""
    work = tmp_path_factory.mktemp("docs-work")
    (work / "models").symlink_to(TRAINED_MODELS.resolve(), target_is_directory=True)
    for name in ("helm", "tests", "manifests", "pyproject.toml"):  # read by the deployment and lint examples
        (work / name).symlink_to(REPO / name)
    digits, labels = load_test_digits(1)
    seven = digits[list(labels).index(7)]
    Image.fromarray(255 - seven).resize((112, 112), Image.Resampling.BICUBIC).save(work / "digit.png")
    return work


def localize(body: str, server: ServerHandle) -> str:
    for host in ("localhost", "127.0.0.1"):
        body = re.sub(rf"\b{re.escape(host)}:8080\b", f"127.0.0.1:{server.http_port}", body)
        body = re.sub(rf"\b{re.escape(host)}:8081\b", f"127.0.0.1:{server.grpc_port}", body)
    return body


def run_block(block: Block, server: ServerHandle, workdir: Path) -> subprocess.CompletedProcess:
    body = localize(block.body, server)
    path = f"{Path(sys.executable).parent}:{REPO / '.tools' / 'bin'}:{os.environ['PATH']}"  # python, helm as make has
    env = {**os.environ, "PATH": path, "OPENBLAS_NUM_THREADS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("KCP_API_KEY", None)
    command = ["bash", "-euo", "pipefail", "-c", body] if block.language == "bash" else [sys.executable, "-c", body]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_runnable_block_runs(page: Path, server: ServerHandle, workdir: Path) -> None:
    for block in runnable(page):
        result = run_block(block, server, workdir)
        shown = f"{block.where()} ({block.language}):\n{block.body}\n--- stdout:\n{result.stdout[-3000:]}" \
                f"\n--- stderr:\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"exit {result.returncode} in {shown}"
        assert not ERROR_ANSWER.search(result.stdout), f"an error answer in {shown}"
