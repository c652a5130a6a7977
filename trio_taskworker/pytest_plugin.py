"""The pytest plugin of trio_taskworker: the ``task_cluster`` fixture.

pytest loads it through the package's ``pytest11`` entry point, so installing
trio_taskworker is enough. Loading it imports the trio_taskworker package
(about 0.2 s at start-up); the testing module, with the in-memory cluster, is
imported when a test first asks for the fixture (``-p no:trio_taskworker``
turns the plugin off).
The fixture is async, so a test that uses it needs pytest-trio: set
``trio_mode = true`` or mark the test ``@pytest.mark.trio``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import TaskCluster

__all__ = ["task_cluster"]


@pytest.fixture
async def task_cluster() -> AsyncIterator[TaskCluster]:
    """An in-memory server with no worker yet, for the duration of the test.

    Start workers with ``await task_cluster.start_worker(my_task)``. Inside the
    test, ``delay``/``map`` and every future's ``result``/``wait``/``cancel``
    go to the cluster. Ask for ``autojump_clock`` in the test's own parameters
    to run it on virtual time. See :func:`trio_taskworker.testing.open_test_cluster`.
    """
    from .testing import open_test_cluster

    async with open_test_cluster() as cluster:
        yield cluster
