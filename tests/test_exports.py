"""The public surface: names users look for, a sorted and complete __all__."""

from __future__ import annotations

import tomllib
from pathlib import Path

import trio_taskworker

PREFECT_NAMES = {"TaskWorker", "serve", "StopTaskWorker", "should_try_to_read_parameters"}
ISSUE_NAMES = {"task", "TaskRunFuture", "TaskRun", "TaskRunState"}


def test_public_names_present() -> None:
    missing = (PREFECT_NAMES | ISSUE_NAMES) - set(trio_taskworker.__all__)
    assert not missing
    for name in trio_taskworker.__all__:
        assert hasattr(trio_taskworker, name), name


def test_all_is_sorted_and_complete() -> None:
    exported = trio_taskworker.__all__
    assert exported == sorted(exported)
    public = {
        name
        for name, value in vars(trio_taskworker).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("trio_taskworker")
    }
    assert public <= set(exported)


def test_exceptions_share_one_root() -> None:
    for name in trio_taskworker.__all__:
        value = getattr(trio_taskworker, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, trio_taskworker.TaskWorkerError), name


def test_version_matches_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert trio_taskworker.__version__ == pyproject["project"]["version"]


def test_pure_modules_import_no_io() -> None:
    """The pure layer must not import trio, httpx or a database driver."""
    import ast

    package = Path(trio_taskworker.__file__).parent
    for module in ("_exceptions", "_states", "_models", "_serialization", "_task"):
        tree = ast.parse((package / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        assert not names & {"trio", "httpx", "trio_websocket", "sqlite3", "psycopg"}, module
