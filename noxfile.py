"""Developer sessions. `python -m nox -s tests` is the README's test command."""

from __future__ import annotations

import random

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.default_venv_backend = "venv"

LINT = ["ruff>=0.6"]
TYPES = ["mypy>=1.11"]
DOCS = ["sphinx>=7.2"]
PEERS = ["dramatiq[redis]", "celery[redis]", "huey", "redis"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: unit, in-process integration and end-to-end.

    First ``.ci/services`` installs and starts what the tests use when it is
    missing: Debian's Chromium and PostgreSQL on 127.0.0.1:5432.
    """
    session.run("bash", ".ci/services", external=True)
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def explore(session: nox.Session) -> None:
    """Search many random interleavings of the cancellation table's events.

    ``tests/test_explore.py`` under Hypothesis's ``explore`` profile: 3000 programs
    by default (``TRIO_TASKWORKER_EXPLORE_EXAMPLES``), from a seed printed first,
    so that a run can be repeated with ``-- --hypothesis-seed=N``. A failing
    program is shrunk and printed as code, for ``test_explored_regressions.py``.
    ``nox -s tests`` runs the same test on a small fixed set.
    """
    session.install("-e", ".[test]")
    args = list(session.posargs)
    if not any(a.startswith("--hypothesis-seed") for a in args):
        seed = random.randrange(2**32)
        session.log(f"hypothesis seed: {seed}")
        args.append(f"--hypothesis-seed={seed}")
    session.run(
        "pytest",
        "-q",
        "-o",
        "timeout=0",
        "--hypothesis-show-statistics",
        "tests/test_explore.py",
        *args,
        env={"TRIO_TASKWORKER_EXPLORE": "explore"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*LINT)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, and on the tests that check its public types."""
    session.install("-e", ".[test]", *TYPES)  # the pytest plugin module imports pytest
    session.run("mypy")
    session.run("mypy", "tests/test_futures_api.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs, warnings as errors."""
    session.install("-e", ".", *DOCS)
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def demo(session: nox.Session) -> None:
    """The quickstart: a server, a worker, a few runs and their results."""
    session.install(".")
    session.run("python", "examples/demo.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput, latency, RSS, idle cost and the peers on this machine, as one JSON.

    Arguments after ``--`` go to benchmarks/bench.py: ``--runs N``, ``--no-peers``,
    ``--backlog 1000000`` (the 1M-backlog figure, several minutes), ``--postgres
    [URL]`` (one and two server replicas on a fresh PostgreSQL database, default
    on 127.0.0.1:5432; the peers are then skipped unless ``--peers`` names them),
    ``--help``. The peers (Dramatiq, Celery on Redis at 127.0.0.1:6379; Huey on
    SQLite) are skipped, each with its reason in the JSON, when their service
    does not answer.
    """
    session.install(".[postgres]", *PEERS)
    session.run("python", "benchmarks/bench.py", *session.posargs)
