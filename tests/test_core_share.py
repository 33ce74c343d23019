"""A CPU stage's compute threads follow the cores other processes leave it (engine.pipeline.core_share)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from engine.pipeline import core_share
from engine.pipeline.core_share import CoreShare


class FakeHost:
    """/proc/stat's busy time of the stage's cores and the stage's own CPU time, advanced by hand."""

    def __init__(self, monkeypatch) -> None:
        self.now, self.busy, self.own = 0.0, 0.0, 0.0
        monkeypatch.setattr(core_share.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(core_share, "cpu_seconds", lambda cores: (self.busy, self.now * len(cores)))
        monkeypatch.setattr(core_share, "_own_seconds", lambda: self.own)
        monkeypatch.setattr(core_share.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)

    def run(self, seconds: float, own_cores: float, others_cores: float) -> None:
        self.now += seconds
        self.own += seconds * own_cores
        self.busy += seconds * (own_cores + others_cores)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_give_way_to_a_busy_neighbour_and_come_back(monkeypatch, restore_threads):
    host = FakeHost(monkeypatch)
    share = CoreShare(4)
    host.run(1.0, 4, 0.3)  # the server's own front end and clients: less than a core's worth
    assert share.adjust() == 4
    host.run(0.2, 4, 1.0)  # too soon to measure again
    assert share.adjust() == 4
    host.run(1.0, 3, 1.0)  # a neighbour takes a core
    assert share.adjust() == 3 and torch.get_num_threads() == 3
    host.run(1.0, 3, 1.0)  # it keeps it: one thread given up for it is enough
    assert share.adjust() == 3
    host.run(1.0, 2, 2.0)  # a second one
    assert share.adjust() == 2
    host.run(1.0, 2, 1.5)  # one of them slows down, not below the hysteresis
    assert share.adjust() == 2
    host.run(1.0, 2, 1.0)  # one leaves
    assert share.adjust() == 3
    host.run(1.0, 3, 0.1)  # the other leaves
    assert share.adjust() == 4 and torch.get_num_threads() == 4


def test_a_single_thread_stays_one(monkeypatch, restore_threads):
    host = FakeHost(monkeypatch)
    share = CoreShare(1)
    host.run(1.0, 1, 3.0)
    assert share.adjust() == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_real_busy_process_is_seen(restore_threads):
    """Measured from /proc: a process spinning on a core is a core's worth of others' work."""
    share = CoreShare(len(os.sched_getaffinity(0)))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(20):  # up to 10 s of samples; a spinning process takes its core within the first
            time.sleep(0.6)
            if share.adjust() < share.wanted:
                break
        assert share.threads == share.wanted - 1
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_the_hosts_cpu_time_is_read_per_core_and_in_all():
    from telemetry.host_cpu import cpu_seconds

    busy, total = cpu_seconds()
    one_busy, one_total = cpu_seconds({0})
    assert 0 < busy <= total and 0 <= one_busy <= one_total <= total
    assert cpu_seconds(set()) == (0.0, 0.0)
