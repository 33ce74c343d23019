"""Objects over the ring's links: one frame when they fit, a second message for the rest."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import socket

from engine import transport

SIZES = [0, 100, transport.FRAME_BYTES - 80, transport.FRAME_BYTES, 3 * transport.FRAME_BYTES + 5]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _echo(port: int) -> None:
    transport.init(1, 2, transport.join_rendezvous("127.0.0.1", port, 2, 30), 30)
    for _ in SIZES:
        obj, _ = transport.recv_obj_sized(0)
        transport.send_obj(obj, 0)
    transport.close()


def test_objects_of_every_size_arrive_whole():
    port = _free_port()
    store = transport.serve_rendezvous("127.0.0.1", port, 2, 30)
    peer = mp.get_context("spawn").Process(target=_echo, args=(port,))
    peer.start()
    try:
        transport.init(0, 2, store, 30)
        outbox = transport.Outbox()
        for n in SIZES:
            obj = {"bytes": bytes(range(256)) * (n // 256) + b"x" * (n % 256), "n": n}
            outbox.post(*transport.isend_obj(obj, 1))
            back, wire = transport.recv_obj_sized(1)
            assert back == obj
            fits = len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) <= transport.FRAME_BYTES - 8
            assert wire == transport.FRAME_BYTES if fits else wire > transport.FRAME_BYTES
        transport.close()
    finally:
        peer.join(30)
        if peer.is_alive():
            peer.kill()
    assert peer.exitcode == 0
