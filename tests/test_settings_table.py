"""docs/settings.md is generated from the settings models, is current, and lists every ``KCP_*`` variable the
code names; and no module of the server reads a ``KCP_*`` variable by hand.

Fast: no server, one subprocess for the generator's ``--check``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "settings.md"
SCRIPT = REPO / "scripts" / "settings-table.py"
VARIABLE = re.compile(r"\bKCP_[A-Z0-9_]*[A-Z0-9]\b")
NOT_SETTINGS = re.compile(r"^KCP_TEST_")
"""Variables of the chart's test pods (``helm test``), read by the test image, not by the server or bridge."""
HAND_READ = re.compile(r"""(os\.environ(\.get)?\s*[\[(]\s*f?["']KCP_|os\.getenv\(\s*f?["']KCP_)""")


def _sources() -> list[Path]:
    """The code, the chart and the images: a variable set anywhere there must be one the table explains."""
    code = [p for top in ("predictors", "streaming") for p in (REPO / top).rglob("*.py")]
    deployment = [p for top in ("helm", "docker") for p in (REPO / top).rglob("*") if p.is_file()
                  and p.suffix in {".yaml", ".yml", ".tpl", ".json", ""}]
    return sorted(code + deployment)


def test_docs_settings_md_is_current() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, (f"{done.stderr}\n{done.stdout[-4000:]}\n"
                                  "run: .venv/bin/python scripts/settings-table.py")


def test_every_variable_the_code_or_the_chart_names_is_in_the_table() -> None:
    documented = set(VARIABLE.findall(DOC.read_text(encoding="utf-8")))
    named: dict[str, str] = {}
    for path in _sources():
        for name in VARIABLE.findall(path.read_text(encoding="utf-8", errors="replace")):
            if not NOT_SETTINGS.match(name):
                named.setdefault(name, str(path.relative_to(REPO)))
    missing = {name: where for name, where in named.items() if name not in documented}
    assert not missing, f"KCP_* variables named in code but not in docs/settings.md (add a settings field): {missing}"


def test_the_server_reads_its_variables_only_through_its_settings_model() -> None:
    """``predictors.settings`` is the one place: a variable read elsewhere would be missing from the table,
    unvalidated, and could disagree with the flag of the same setting."""
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted((REPO / "predictors").rglob("*.py")) if path.name != "settings.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if HAND_READ.search(line)]
    assert not found, "\n".join(found)
