"""The public surface: names users look for, a sorted and complete __all__."""

from __future__ import annotations

import subprocess
import sys
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


PURE_MODULES = (
    "_exceptions", "_states", "_models", "_serialization", "_rules", "_context", "_policy",
    "_definition",
)  # fmt: skip
IO_LIBRARIES = {"trio", "httpx", "trio_websocket", "hypercorn", "starlette", "sqlite3", "psycopg"}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """The top-level libraries a package module imports, and the package modules it imports."""
    import ast

    package = Path(trio_taskworker.__file__).parent
    tree = ast.parse((package / f"{module}.py").read_text())
    libraries: set[str] = set()
    relatives: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            libraries.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            libraries.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                relatives.add(node.module.split(".")[0])
            else:
                relatives.update(alias.name for alias in node.names)
    return libraries, relatives


def test_pure_modules_import_no_io() -> None:
    """The pure layer imports no I/O library, not even through another module."""
    for module in PURE_MODULES:
        seen: set[str] = set()
        todo = [module]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            libraries, relatives = _imports(current)
            assert not libraries & IO_LIBRARIES, (module, current, libraries & IO_LIBRARIES)
            todo.extend(relatives)
        # Everything a pure module reaches is itself pure.
        assert seen <= {*PURE_MODULES, "_version"}, (module, seen - set(PURE_MODULES))


def test_the_purity_check_follows_relative_imports() -> None:
    """The check above would catch ``_task``, which reaches httpx through ``_client``."""
    relatives = _imports("_task")[1]
    assert "_client" in relatives and "httpx" in _imports("_client")[0]


def test_clients_and_workers_do_not_load_the_server() -> None:
    # A fresh interpreter: what importing the package (and the CLI a worker runs) loads.
    code = (
        "import sys, trio_taskworker, trio_taskworker._cli\n"
        "heavy = {'starlette', 'hypercorn', 'psycopg', 'psycopg_pool', 'prometheus_client'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
        "from trio_taskworker import TaskServer\n"
        "from trio_taskworker._server import TaskServer as Real\n"
        "print(TaskServer is Real)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
    assert not hasattr(trio_taskworker, "NoSuchName")
