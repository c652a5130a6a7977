"""The ``trio-taskworker`` command line.

::

    trio-taskworker server start [--host H] [--port P] [--data-dir DIR | --database-url URL]
                                 [--replica-lease SECONDS]
                                 [--api-key KEY[:ROLE+ROLE]]... [--insecure]
                                 [--certfile PEM --keyfile PEM]
    trio-taskworker db upgrade [--data-dir DIR | --database-url URL]
    trio-taskworker task serve ENTRYPOINT... [--module MOD] [--limit N]
                                             [--status-server-port P]
                                             [--shutdown-timeout S]
    trio-taskworker run ls [--state S] [--task KEY] [--tag T] [--limit N] [--json]
    trio-taskworker run show RUN_ID [--json]
    trio-taskworker run retry RUN_ID
    trio-taskworker run cancel RUN_ID
    trio-taskworker worker ls [--json]
    trio-taskworker task ls [--json]

The commands that talk to a server take ``--api-url`` (default
``$TRIO_TASKWORKER_API_URL``) and send ``$TRIO_TASKWORKER_API_KEY``. It may
list several replicas of one server, separated by commas: a worker fails over
across them, and the other commands use the first that answers.

An ENTRYPOINT is ``pkg.mod:fn`` or ``path/to/mod.py:fn``. Errors print one
line to stderr and exit 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from ._definition import module_name_for_path
from ._exceptions import TaskWorkerError, leaves
from ._inspect import InspectError
from ._models import DEFAULT_REPLICA_LEASE, MAX_WAIT_SECONDS
from ._states import TaskRunState
from ._task import Task
from ._version import __version__

__all__ = ["load_entrypoint", "load_module_tasks", "main"]


class CLIError(Exception):
    """A problem to report in one line, with exit code 1."""


def _import(module_name: str, root: Path | None = None) -> Any:
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CLIError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise CLIError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from None


def load_entrypoint(entrypoint: str) -> Task[Any, Any]:
    """Load the task named by ``pkg.mod:fn`` or ``path/to/mod.py:fn``.

    A file is imported under its package-qualified module name, so its
    tasks have the same keys as when imported by name.
    """
    module_part, sep, attr = entrypoint.rpartition(":")
    if not sep or not module_part or not attr:
        raise CLIError(f"entrypoint {entrypoint!r} must look like 'pkg.mod:fn' or 'file.py:fn'")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise CLIError(f"entrypoint {entrypoint!r}: no file {module_part!r}")
        name, root = module_name_for_path(path)
        module = _import(name, root)
    else:
        module = _import(module_part)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(
                f"entrypoint {entrypoint!r}: {module.__name__} has no {attr!r}"
            ) from None
    if not isinstance(obj, Task):
        raise CLIError(f"entrypoint {entrypoint!r} is not a task; decorate it with @task")
    return obj


def load_module_tasks(module_name: str) -> list[Task[Any, Any]]:
    """Every task defined at the top level of a module."""
    module = _import(module_name)
    tasks = [v for v in vars(module).values() if isinstance(v, Task)]
    if not tasks:
        raise CLIError(f"module {module_name!r} defines no tasks")
    return tasks


def _whole(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[low, high]``, described as ``what``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number

    return parse


_port = _whole(0, 65535, "a port number (0 to 65535)")
_count = _whole(0, 2**31, "a whole number, 0 or more")
_positive = _whole(1, 2**31, "a positive integer or 'none'")


def _limit(value: str) -> int | None:
    return None if value.lower() == "none" else _positive(value)


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError("seconds must be 0 or more")
    return number


def _positive_seconds(value: str) -> float:
    number = _seconds(value)
    if number == 0:
        raise argparse.ArgumentTypeError("seconds must be greater than 0")
    return number


#: Units of a ``--retention`` duration, in seconds.
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def _duration(value: str) -> float | None:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or plain seconds; ``0`` or
    ``forever`` is None (the server checks the upper bound)."""
    text = value.strip().lower()
    if text == "forever":
        return None
    unit = text[-1:] if text[-1:] in _DURATION_UNITS else "s"
    number = text[:-1] if text[-1:] in _DURATION_UNITS else text
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 7d, 12h, 30m, 3600 (seconds), 0 or forever,"
            f" got {value!r}"
        )
    return seconds or None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-taskworker", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    groups = parser.add_subparsers(dest="group", required=True)

    server = groups.add_parser("server", help="run the server").add_subparsers(
        dest="command", required=True
    )
    start = server.add_parser("start", help="start the server and serve until SIGINT/SIGTERM")
    start.add_argument("--host", default="127.0.0.1")
    start.add_argument("--port", type=_port, default=4200, help="0 picks a free port")
    start.add_argument(
        "--lease-seconds",
        type=_positive_seconds,
        default=30.0,
        help="how long a silent worker keeps its leases (default 30)",
    )
    start.add_argument(
        "--replica-lease",
        type=_positive_seconds,
        default=DEFAULT_REPLICA_LEASE,
        metavar="SECONDS",
        help="with --database-url: how long the runs of a replica that stopped renewing its"
        f" lease wait before another replica frees them (default {DEFAULT_REPLICA_LEASE:g})",
    )
    start.add_argument(
        "--max-wait",
        type=_positive_seconds,
        default=MAX_WAIT_SECONDS,
        metavar="SECONDS",
        help="hold a wait request at most this long, whatever it asks (clients ask again;"
        f" for proxies that cut idle connections; default {MAX_WAIT_SECONDS:g})",
    )
    start.add_argument(
        "--max-redeliveries",
        type=_count,
        default=3,
        help="redeliveries of a run whose worker vanished, for tasks that set none (default 3)",
    )
    start.add_argument(
        "--retention",
        type=_duration,
        default="7d",
        metavar="DURATION",
        help="delete runs that ended longer ago, and unreferenced blobs: 7d, 12h, 30m,"
        " 3600 (seconds); 0 or forever keeps everything (default 7d)",
    )
    start.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the SQLite file lives (default $TRIO_TASKWORKER_HOME or ~/.trio-taskworker)",
    )
    _database_url_option(start)
    start.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY[:ROLE+ROLE]",
        help="require this key (repeatable; roles submit, work, admin; no roles: all);"
        " default $TRIO_TASKWORKER_SERVER_API_KEY (comma-separated)",
    )
    start.add_argument(
        "--insecure",
        action="store_true",
        help="allow a --host other than loopback without an API key",
    )
    start.add_argument("--certfile", type=Path, default=None, help="PEM certificate: serve https")
    start.add_argument("--keyfile", type=Path, default=None, help="PEM private key of --certfile")

    db = groups.add_parser("db", help="the server's database").add_subparsers(
        dest="command", required=True
    )
    upgrade = db.add_parser(
        "upgrade", help="create or upgrade the schema, then exit (servers do it on start too)"
    )
    upgrade.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the SQLite data directory (default $TRIO_TASKWORKER_HOME or ~/.trio-taskworker)",
    )
    _database_url_option(upgrade)

    task = groups.add_parser("task", help="serve tasks").add_subparsers(
        dest="command", required=True
    )
    serve = task.add_parser("serve", help="run a task worker until SIGINT/SIGTERM")
    serve.add_argument("entrypoints", nargs="*", metavar="ENTRYPOINT")
    serve.add_argument("--module", action="append", default=[], help="serve every task of MOD")
    serve.add_argument("--limit", type=_limit, default=10, help="runs at once, or 'none'")
    serve.add_argument("--status-server-port", type=_port, default=None)
    serve.add_argument("--shutdown-timeout", type=_seconds, default=30.0)
    serve.add_argument(
        "--api-url",
        default=None,
        help="server URL, or replicas separated by commas (default $TRIO_TASKWORKER_API_URL)",
    )
    _client_command(task, "ls", "what each task key is doing (admin role)", json=True)

    run = groups.add_parser("run", help="see and act on runs").add_subparsers(
        dest="command", required=True
    )
    ls = _client_command(run, "ls", "list runs, newest first (admin role)", json=True)
    ls.add_argument("--state", type=_state, default=None, help="only runs in this state")
    ls.add_argument("--task", default=None, metavar="KEY", help="only runs of this task key")
    ls.add_argument("--tag", default=None, help="only runs with this tag")
    ls.add_argument(
        "--limit", type=_whole(1, 1000, "1 to 1000"), default=20, help="at most N (default 20)"
    )
    show = _client_command(run, "show", "a run's fields, history, error and logs", json=True)
    retry = _client_command(run, "retry", "queue a FAILED, CRASHED or CANCELLED run again")
    cancel = _client_command(run, "cancel", "cancel a run")
    for command in (show, retry, cancel):
        command.add_argument(
            "run_id", metavar="RUN_ID", help="a run id, or its last 8 hex digits (admin role)"
        )

    worker = groups.add_parser("worker", help="see workers").add_subparsers(
        dest="command", required=True
    )
    _client_command(worker, "ls", "the connected workers (admin role)", json=True)
    return parser


def _client_command(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    *,
    json: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand that talks to the server: ``--api-url``, and ``--json`` if asked."""
    command = group.add_parser(name, help=help, description=help)
    command.add_argument(
        "--api-url",
        default=None,
        help="server URL, or replicas separated by commas (default $TRIO_TASKWORKER_API_URL)",
    )
    if json:
        command.add_argument("--json", action="store_true", help="print JSON for programs")
    return command


def _state(value: str) -> TaskRunState:
    try:
        return TaskRunState(value.upper())
    except ValueError:
        names = ", ".join(TaskRunState)
        raise argparse.ArgumentTypeError(f"expected one of {names}, got {value!r}") from None


def _inspect(args: argparse.Namespace) -> None:
    """``run ls|show|retry|cancel``, ``worker ls``, ``task ls``: ask, then print."""
    import datetime
    import io
    import shutil

    from . import _inspect as ins
    from ._client import answering_url

    if isinstance(sys.stdout, io.TextIOWrapper):
        # Escaped text is printable, but perhaps not in this terminal's encoding.
        sys.stdout.reconfigure(errors="backslashreplace")
    width = shutil.get_terminal_size((80, 24)).columns
    now = datetime.datetime.now(datetime.UTC)
    # These commands talk to one server: of several replicas, the first that answers.
    with ins.open_inspector(answering_url(args.api_url)) as api:
        command = (args.group, args.command)
        if command == ("run", "ls"):
            runs = api.list_runs(
                state=args.state, task_key=args.task, tag=args.tag, limit=args.limit
            )
            print(ins.runs_json(runs) if args.json else ins.runs_text(runs, now, width))
        elif command == ("run", "show"):
            run = api.read_run(api.resolve(args.run_id))
            history, logs = api.history(run.id), api.logs(run.id)
            if args.json:
                print(ins.run_json(run, history, logs))
            else:
                print(ins.run_text(run, history, logs, now))
        elif command in (("run", "retry"), ("run", "cancel")):
            run_id = api.resolve(args.run_id)
            run = api.retry(run_id) if args.command == "retry" else api.cancel(run_id)
            print(f"run {run.id} is {run.state}")
        elif command == ("worker", "ls"):
            workers = api.workers()
            print(
                ins.workers_json(workers) if args.json else ins.workers_text(workers, now, width)
            )
        else:
            tasks = api.tasks()
            print(ins.tasks_json(tasks) if args.json else ins.tasks_text(tasks, width))


def _database_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="keep runs in this PostgreSQL database (postgresql://USER@HOST:PORT/DB)"
        " instead of SQLite; default $TRIO_TASKWORKER_DATABASE_URL",
    )


def _database_url(args: argparse.Namespace) -> str | None:
    """The PostgreSQL URL of ``--database-url`` or the environment; None: SQLite.

    A URL goes in the environment to keep its password out of ``ps``; a flag wins.
    """
    url: str | None = args.database_url or os.environ.get("TRIO_TASKWORKER_DATABASE_URL")
    if url and args.data_dir is not None:
        raise CLIError("give --data-dir (SQLite) or a database URL (PostgreSQL), not both")
    return url or None


async def _upgrade_database(args: argparse.Namespace) -> None:
    from ._server import SQLiteStore, default_data_dir
    from ._server._postgres import PostgresStore, is_postgres_url, redact_conninfo
    from ._server._server import lock_data_dir
    from ._server._store import SCHEMA_VERSION

    url = _database_url(args)
    store: SQLiteStore | PostgresStore
    if url is not None:
        if not is_postgres_url(url):
            raise CLIError(f"not a PostgreSQL URL: {redact_conninfo(url)!r}")
        store, where = PostgresStore(url), redact_conninfo(url)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            nursery.cancel_scope.cancel()
    else:
        data_dir = args.data_dir or default_data_dir()
        # Not beside a running server: it owns the file while it runs.
        with lock_data_dir(data_dir):
            store, where = SQLiteStore(data_dir / "runs.sqlite3"), str(data_dir)
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                nursery.cancel_scope.cancel()
    print(f"schema version {SCHEMA_VERSION} is ready in {where}", flush=True)


async def _run_server(args: argparse.Namespace) -> None:
    from ._server import TaskServer
    from ._server._postgres import redact_conninfo

    kwargs: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "lease_seconds": args.lease_seconds,
        "replica_lease_seconds": args.replica_lease,
        "max_wait_seconds": args.max_wait,
        "default_max_redeliveries": args.max_redeliveries,
        "retention": args.retention,
        "insecure": args.insecure,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
    }
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    kwargs["database_url"] = _database_url(args)
    # The environment is for keys that should not show in `ps`; a flag wins.
    env_keys = os.environ.get("TRIO_TASKWORKER_SERVER_API_KEY", "").strip()
    kwargs["api_keys"] = args.api_key or ([env_keys] if env_keys else [])
    server = TaskServer(**kwargs)
    # Signals are caught before the ready line, so a supervisor that signals as
    # soon as it reads the line still gets a clean shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(server.run)
            where = (
                server.data_dir
                if server.database_url is None
                else redact_conninfo(server.database_url)
            )
            print(f"trio_taskworker server ready at {url} (data in {where})", flush=True)
            async for signum in signals:
                logging.getLogger(__name__).info("signal %s: shutting down", signum)
                await server.stop()
                break


def _serve_tasks(args: argparse.Namespace) -> None:
    from ._worker import TaskWorker

    tasks = [load_entrypoint(e) for e in args.entrypoints]
    for module in args.module:
        tasks.extend(load_module_tasks(module))
    if not tasks:
        raise CLIError("give at least one ENTRYPOINT or --module")
    worker = TaskWorker(
        *dict.fromkeys(tasks),
        limit=args.limit,
        shutdown_timeout=args.shutdown_timeout,
        api_url=args.api_url,
        status_server_port=args.status_server_port,
    )
    trio.run(worker.start)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if logging.getLevelName(args.log_level.upper()) != logging.DEBUG:
        # httpx logs every request at INFO; that is chatter, not news. --log-level
        # DEBUG shows it again.
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # The pool warns at each failed connection attempt while the server
        # waits for the database; the server's own line says what happened.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        if args.group == "server":
            trio.run(_run_server, args)
        elif args.group == "db":
            trio.run(_upgrade_database, args)
        elif args.group == "task" and args.command == "serve":
            _serve_tasks(args)
        else:
            _inspect(args)
    except (CLIError, TaskWorkerError, InspectError) as exc:
        print(f"trio-taskworker: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``run ls | head``): nothing to say, and nowhere
        # to say it. Point stdout at /dev/null so the interpreter's own flush at
        # exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"trio-taskworker: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # Errors raised inside nurseries (a port in use, say) arrive grouped, and
        # two tasks may fail at once. Report every error when all are ones the
        # user can act on; if any is not (a bug, a KeyboardInterrupt), re-raise
        # the whole group so that its traceback shows them all.
        known, rest = group.split((CLIError, TaskWorkerError, OSError))
        if known is None or rest is not None:
            raise
        for leaf in leaves(known):
            print(f"trio-taskworker: error: {leaf}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
