"""The ring's messages between real processes over gloo: what arrives, and what the sender keeps meanwhile."""
from __future__ import annotations

import multiprocessing as mp
import os

import torch

from server_process import free_port

MESSAGES = 300
MAX_PENDING = 8


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from engine import transport

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        link = transport.make_links([0, 1], set(), inline_bytes=0)[0]  # rank 0 → rank 1
        if rank == 0:
            outbox = transport.Outbox(MAX_PENDING)
            held = []
            for i in range(MESSAGES):
                outbox.post(*transport.isend({"step": i}, link, torch.full((4, 8), float(i))))
                held.append(len(outbox))
            results.put(("held", max(held)))
        else:
            got = []
            for _ in range(MESSAGES):
                obj, tensor, _ = transport.recv(link, lambda o: ((4, 8), torch.float32))
                got.append((obj["step"], float(tensor[3, 7])))
            results.put(("got", got))
    finally:
        dist.destroy_process_group()


def test_an_outbox_holds_a_bounded_number_of_sends_and_every_message_arrives_in_order():
    """gloo reports a send complete only once it is waited on: an outbox that waited for that would keep every
    message (and its buffers) it ever sent."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert out["held"] <= MAX_PENDING
    assert out["got"] == [(i, float(i)) for i in range(MESSAGES)]
