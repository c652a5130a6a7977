"""The docs cite tests as proof; every cited test must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def _citations(text: str) -> list[tuple[str, str]]:
    """(file, test) pairs; ``::name`` after a cited file reuses that file."""
    found = []
    current = ""
    for match in re.finditer(r"(test_\w+\.py)?::(test_\w+)", text):
        current = match.group(1) or current
        found.append((current, match.group(2)))
    return found


def test_cited_tests_exist() -> None:
    for page in ("explanation/cancellation.rst", "explanation/delivery.rst"):
        text = (ROOT / "docs" / page).read_text()
        citations = _citations(text)
        assert citations, page
        for file, name in citations:
            assert name in _test_names(ROOT / "tests" / file), f"{page} cites {file}::{name}"


def test_cancellation_table_covers_every_event_and_phase() -> None:
    text = (ROOT / "docs" / "explanation" / "cancellation.rst").read_text()
    events = [
        "Caller cancel", "Task timeout", "``stop()``", "SIGTERM", "Second signal",
        "``StopTaskWorker``", "Lost connection", "Worker ``kill -9``", "Server restart",
        "Lease expiry",
    ]  # fmt: skip
    rows = re.split(r"\n   \* -[ ]?", text)[2:]
    for event in events:
        phases = []
        current = None
        for row in rows:
            head, *cells = row.split("\n     - ")
            if head.strip():
                current = head.strip()
            if current and current.startswith(event):
                phases.append(cells[0])
        assert len(phases) >= 5, (event, phases)
