"""Process helpers for the benchmarks: RSS and CPU from /proc, and stopping by PID.

Linux only (it reads /proc). Every process a benchmark starts is stopped here by
its own PID, and so are the children it forked, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of durations in seconds, in milliseconds."""
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49] * 1000, 2),
        "p90_ms": round(cuts[89] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def rate(runs: int, seconds: float) -> dict[str, float]:
    return {
        "runs": runs,
        "seconds": round(seconds, 3),
        "runs_per_second": round(runs / seconds, 1),
    }


def memory(pid: int) -> dict[str, float]:
    """Resident set now (VmRSS) and its peak so far (VmHWM), in MB (10^6 bytes)."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / 1e6
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


def memory_of_tree(pid: int) -> dict[str, float]:
    """Summed VmRSS of a process and its descendants, in MB (shared pages counted twice)."""
    pids = [pid, *descendants(pid)]
    total = 0.0
    for p in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, KeyError):
            total += memory(p)["rss_mb"]
    return {"rss_mb": round(total, 1), "processes": len(pids)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # After "pid (comm) ": state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_percent(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU over the next ``seconds``, as % of one core."""
    began = time.monotonic()
    before = [cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    after = [cpu_seconds(p) for p in pids]
    elapsed = time.monotonic() - began
    return [round(100 * (a - b) / elapsed, 2) for a, b in zip(after, before, strict=True)]


def descendants(pid: int) -> list[int]:
    """The PIDs of a process's children, their children, and so on."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in (t / "children").read_text().split()]
            except FileNotFoundError:
                continue
            for kid in kids:
                if kid not in found:
                    found.append(kid)
                    todo.append(kid)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 30.0) -> None:
    """SIGTERM the process, wait, then SIGKILL it and any child it left, all by PID."""
    kids = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 10
    for kid in kids:
        while _alive(kid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(kid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)


def machine_busy_seconds() -> float:
    """CPU time all cores have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user).
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    return busy / _TICKS


class CpuWatch:
    """Where the CPU went while a measurement ran: named processes, and everything else.

    ``elsewhere`` is the machine's busy time not spent in the named processes
    (other users' jobs, the kernel, Redis): the noise behind a figure.
    """

    def __init__(self, pids: dict[str, int | list[int]]) -> None:
        self.pids = {name: [p] if isinstance(p, int) else list(p) for name, p in pids.items()}
        self.began = time.monotonic()
        self.machine = machine_busy_seconds()
        self.each = {name: self._used(ps) for name, ps in self.pids.items()}

    @staticmethod
    def _used(pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(FileNotFoundError):
                total += cpu_seconds(pid)
        return total

    def percent(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.began
        each = {name: self._used(ps) - self.each[name] for name, ps in self.pids.items()}
        machine = machine_busy_seconds() - self.machine
        out = {name: round(100 * used / elapsed, 1) for name, used in each.items()}
        out["elsewhere"] = round(100 * max(0.0, machine - sum(each.values())) / elapsed, 1)
        return out
