"""How many torch CPU threads to decode with.

torch's CPU kernels split every matmul over OpenMP threads that wait for each other at the end of
it, so one thread that loses its core to another process stalls all of them. On the 2-core demo
machine two threads ran 15.6 tokens/s alone and 1.4 tokens/s beside one busy process (issue #12).
Rule: a thread count the user gives wins; else, when torch still has its default (one thread per
physical core), use the physical cores that other processes leave idle, measured over 0.1 s of
/proc/stat, with a warning when that is fewer than all of them.
"""

from __future__ import annotations

import logging
import os
import time

from speckv.errors import SpecKVError

log = logging.getLogger(__name__)


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count, when the user set one."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def configure_threads(threads: int | None, quiet: bool = False) -> int:
    """Apply the thread rule (module docstring); returns the thread count in force."""
    import torch

    if threads is not None:
        if threads < 1:
            raise SpecKVError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        return threads
    cores = physical_cores()
    if torch.get_num_threads() != cores:  # set by the embedding program (or the test suite): keep it
        return torch.get_num_threads()
    busy = busy_cores()
    chosen = max(1, cores - round(busy))
    if chosen < cores and not quiet:
        log.warning(
            "other processes keep %.1f of %d cores busy; using %d torch thread(s), since threads that "
            "share a core stall each other (--threads / threads= overrides)",
            busy,
            cores,
            chosen,
        )
    torch.set_num_threads(chosen)
    return chosen


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    processor, package = -1, ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "processor":
                    processor = int(value)
                elif key == "physical id":
                    package = value
                elif key == "core id" and processor in allowed:
                    cores.add((package, value))
    except (OSError, ValueError):  # not Linux, or an unusual cpuinfo
        pass
    return len(cores) or len(allowed)


def busy_cores(sample_s: float = 0.1) -> float:
    """Cores' worth of CPU time other processes used over `sample_s` while this one slept
    (/proc/stat); the 1-minute load average where /proc/stat does not exist."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]  # user … steal (guest is in user)
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total_before, idle_before = snapshot()
        time.sleep(sample_s)
        total_after, idle_after = snapshot()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = total_after - total_before
    if total <= 0:
        return 0.0
    return (total - (idle_after - idle_before)) / total * (os.cpu_count() or 1)
