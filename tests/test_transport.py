"""Objects and activations over the ring's links: one frame when they fit, further messages for the rest; and
what a sender keeps while its sends are under way."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import socket

import torch

from engine.pipeline import transport

INLINE = 4096  # room for activations in the frame of the link between the two stages
WIDTH = 8
# (object bytes, activation rows or None): activations inside the frame, too many rows for it, a pickle too big
# for the frame (the activations follow it), no activations, and an object larger than several frames.
CASES = [(100, 4), (100, 2000), (transport.FRAME_BYTES + INLINE, 4), (0, None), (3 * transport.FRAME_BYTES + 5, None)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(rank: int, port: int) -> None:
    """Rank 1 adds activations to what the driver sends; rank 2 reports what arrived back to the driver."""
    transport.init(rank, 3, transport.join_rendezvous("127.0.0.1", port, 3, 30), 30)
    links = transport.make_links([0, 1, 2], set(), INLINE)
    outbox = transport.Outbox()
    for _ in CASES:
        if rank == 1:
            obj, _, _ = transport.recv(links[0])
            rows = obj["rows"]
            hidden = None if rows is None else torch.arange(rows * WIDTH, dtype=torch.float32).view(rows, WIDTH)
            outbox.post(*transport.isend(obj, links[1], hidden))
        else:
            def expect(o):
                return None if o["rows"] is None else ((o["rows"], WIDTH), torch.float32)

            obj, hidden, wire = transport.recv(links[1], expect, torch.device("cpu"))
            transport.send((obj, None if hidden is None else hidden.tolist(), wire), links[2])
    transport.close()


def test_objects_and_activations_arrive_whole():
    port = _free_port()
    store = transport.serve_rendezvous("127.0.0.1", port, 3, 30)
    peers = [mp.get_context("spawn").Process(target=_stage, args=(rank, port)) for rank in (1, 2)]
    for p in peers:
        p.start()
    try:
        transport.init(0, 3, store, 30)
        links = transport.make_links([0, 1, 2], set(), INLINE)
        # The driver's links carry objects alone; the one between the stages has room for activations.
        assert [link.frame for link in links] == [transport.FRAME_BYTES, transport.FRAME_BYTES + INLINE,
                                                  transport.FRAME_BYTES]
        outbox = transport.Outbox()
        inlined = []
        for n, rows in CASES:
            obj = {"bytes": bytes(range(256)) * (n // 256) + b"x" * (n % 256), "rows": rows}
            outbox.post(*transport.isend(obj, links[0]))
            back, hidden, wire = transport.recv(links[2])[0]
            assert back == obj
            if rows is not None:
                assert hidden == torch.arange(rows * WIDTH, dtype=torch.float32).view(rows, WIDTH).tolist()
            pickled = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            frame = transport.FRAME_BYTES + INLINE
            activations = 0 if rows is None else rows * WIDTH * 4
            inline = rows is not None and -(-(8 + pickled) // 64) * 64 + activations <= frame
            rest = max(0, pickled + 8 - frame)
            assert wire == frame + rest + (0 if inline else activations)
            inlined.append(inline)
        assert inlined == [True, False, False, False, False]
        transport.close()
    finally:
        for p in peers:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in peers] == [0, 0]


MESSAGES = 300
MAX_PENDING = 8


def _sender_or_receiver(rank: int, port: int, results) -> None:
    """Rank 0 posts MESSAGES sends through a bounded Outbox and reports the most it held; rank 1 reports what
    arrived."""
    store = transport.serve_rendezvous("127.0.0.1", port, 2, 30) if rank == 0 else \
        transport.join_rendezvous("127.0.0.1", port, 2, 30)
    transport.init(rank, 2, store, 30)
    link = transport.make_links([0, 1], set())[0]  # rank 0 → rank 1
    if rank == 0:
        outbox = transport.Outbox(MAX_PENDING)
        held = []
        for i in range(MESSAGES):
            outbox.post(*transport.isend({"step": i}, link, torch.full((4, WIDTH), float(i))))
            held.append(len(outbox))
        results.put(("held", max(held)))
    else:
        got = []
        for _ in range(MESSAGES):
            obj, hidden, _ = transport.recv(link, lambda o: ((4, WIDTH), torch.float32))
            got.append((obj["step"], float(hidden[3, WIDTH - 1])))
        results.put(("got", got))
    transport.close()


def test_an_outbox_holds_a_bounded_number_of_sends_and_every_message_arrives_in_order():
    """gloo reports a send complete only once it is waited on: an outbox that waited for that would keep every
    message (and its buffers) it ever sent."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sender_or_receiver, args=(rank, port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert out["held"] <= MAX_PENDING
    assert out["got"] == [(i, float(i)) for i in range(MESSAGES)]
