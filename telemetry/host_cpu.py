"""The host's CPU time, from /proc/stat (Linux): what a CPU stage (engine.pipeline.core_share), the device probe and
the dashboard read to tell other work on the host from their own. Imports nothing of the project."""
from __future__ import annotations

import os


def cpu_seconds(cores: set[int] | None = None) -> tuple[float, float] | None:
    """(busy, total) seconds since boot of the given cores, or of all of them (busy: all but idle and iowait); None
    where /proc/stat cannot be read."""
    busy = total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break  # the per-core lines come first
                name, *fields = line.split()
                if (name != "cpu") if cores is None else (name == "cpu" or int(name[3:]) not in cores):
                    continue
                values = [int(v) for v in fields[:8]]
                busy += sum(values) - values[3] - values[4]
                total += sum(values)
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, total / tick
