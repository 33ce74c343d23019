"""Scheduling policy for the threads that only pass messages along.

CPU stages run one compute thread per core they were given, so on a host whose cores all
compute, every wake-up of a thread that receives or sends a message (a stage's receivers,
the transport's own threads, the server's engine loop) preempts a compute thread on the
spot. Under SCHED_BATCH a thread's wake-ups do not preempt: it runs at the core's next
scheduling point, or at once where a core is idle. The message it handles is needed only
when the compute thread finishes its step, and the compute thread keeps its core meanwhile.
Where no core is busy (GPU stages) nothing changes. Linux only; elsewhere, or where the
policy cannot be set, threads keep the default policy.
"""
from __future__ import annotations

import os
import threading

# What torch.distributed's gloo backend names its threads (per process group: an event loop and its workers).
TRANSPORT_THREAD_NAMES = ("gloo_tcp_loop", "pt_gloo_runloop")
_TASKS = "/proc/self/task"


def _set_batch(tid: int) -> bool:
    try:
        os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed
        return False
    return True


def background_this_thread() -> bool:
    """Put the calling thread under SCHED_BATCH; whether it now is."""
    return _set_batch(threading.get_native_id())


def background_transport_threads() -> int:
    """Put this process's transport threads (started when its process groups were created) under SCHED_BATCH;
    how many were."""
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return 0
    done = 0
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread has ended
            continue
        if name.startswith(TRANSPORT_THREAD_NAMES) and _set_batch(int(tid)):
            done += 1
    return done
