"""The in-process server for the repository's own tests.

It is the public harness of :mod:`trio_taskworker.testing`; ``now`` is the
clock that harness's server uses by default, for tests that write to the
store directly.
"""

from __future__ import annotations

from trio_taskworker.testing import InProcessServer
from trio_taskworker.testing import trio_wall_time as now

__all__ = ["InProcessServer", "now"]
