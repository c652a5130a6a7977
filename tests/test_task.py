from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trio_taskworker import ConfigurationError, Task, task
from trio_taskworker._cli import CLIError, load_entrypoint, load_module_tasks


@task
async def add(x: int, y: int = 1) -> int:
    return x + y


@task(name="say", retries=2, retry_delay_seconds=0.5, timeout_seconds=30, tags=["io"])
def say(message: str) -> str:
    return message.upper()


def test_options_and_key() -> None:
    assert isinstance(add, Task)
    assert add.key == f"{__name__}:add"
    assert add.is_async and not say.is_async
    opts = say.options
    assert (say.name, opts.retries, opts.retry_delay_seconds, opts.timeout_seconds, opts.tags) == (
        "say",
        2,
        0.5,
        30.0,
        ("io",),
    )


async def test_calling_runs_in_process() -> None:
    assert await add(1, 2) == 3
    assert say("hi") == "HI"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retry_delay_seconds": -1}, "retry_delay_seconds"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": float("nan")}, "timeout_seconds"),
        ({"tags": "io"}, "tags"),
        ({"max_redeliveries": -2}, "max_redeliveries"),
    ],
)
def test_bad_options(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        task(**kwargs)(lambda: None)  # type: ignore[call-overload]


async def test_bad_arguments_fail_before_sending() -> None:
    # No server runs in this test: a TypeError proves nothing was sent.
    with pytest.raises(TypeError, match=r"add\(\).*missing a required argument: 'x'"):
        await add.delay()
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        await add.delay(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        add.delay_sync(1, 2, 3)  # type: ignore[call-arg]


async def test_bad_map_and_schedule_fail_before_sending() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        await add.map([1, 2], [1])
    with pytest.raises(ValueError, match="at least one iterable"):
        await add.map()
    with pytest.raises(TypeError):
        await add.map([1], [2], [3])
    with pytest.raises(ValueError, match="timezone-aware"):
        await add.apply_async((1,), scheduled_time=datetime.datetime(2030, 1, 1))


def _write_package(root: Path) -> Path:
    pkg = root / "src" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "jobs.py").write_text(
        textwrap.dedent(
            """
            from trio_taskworker import task

            @task
            def double(x):
                return 2 * x

            if __name__ == "__main__":
                print(double.key)
            """
        )
    )
    return pkg / "jobs.py"


def test_key_same_by_path_module_and_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = _write_package(tmp_path)
    by_path = load_entrypoint(f"{jobs}:double")
    assert by_path.key == "mypkg.jobs:double"
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    by_module = load_entrypoint("mypkg.jobs:double")
    assert by_module.key == by_path.key
    # Run as a script, the module is __main__, yet the key must not change.
    script = subprocess.run(
        [sys.executable, str(jobs)], capture_output=True, text=True, check=True
    )
    assert script.stdout.strip() == by_path.key
    as_module = subprocess.run(
        [sys.executable, "-m", "mypkg.jobs"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path / "src",
    )
    assert as_module.stdout.strip() == by_path.key


def test_bad_entrypoints(tmp_path: Path) -> None:
    jobs = _write_package(tmp_path)
    with pytest.raises(CLIError, match="must look like"):
        load_entrypoint("nocolon")
    with pytest.raises(CLIError, match="cannot import module 'no_such_module_xyz'"):
        load_entrypoint("no_such_module_xyz:fn")
    with pytest.raises(CLIError, match="no file"):
        load_entrypoint(f"{tmp_path}/missing.py:fn")
    with pytest.raises(CLIError, match="has no 'nothing'"):
        load_entrypoint(f"{jobs}:nothing")
    with pytest.raises(CLIError, match="not a task"):
        load_entrypoint(f"{jobs}:task")
    with pytest.raises(CLIError, match="defines no tasks"):
        load_module_tasks("json")
