"""How much of P cores this machine gives at once: the ceiling of a P-stage CPU pipeline's speed-up.

P processes of one thread each run the engine's own half-precision matrix products over
weights larger than the last-level cache (the work of a stage: compute and a stream of
weights from memory), first one alone, then all at once. Their scaling is P times the
time alone over the time together. On a machine whose cores share a host with other
tenants, running both at once can cost each core a large share of its speed, and this
share drifts from minute to minute; a pipeline cannot beat it, so bench.pipeline
measures it in the same rounds as the engines.
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import time

# One stage's worth of matrix products: 24 MLP-up products of the SmolLM2-135M shape (85 MB of bf16 weights)
# on a micro-batch of 32 rows.
SHAPE = (3072, 576)
MATRICES = 24
ROWS = 32


def _worker(conn) -> None:
    import torch

    from engine.model.linear import make_linear

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    products = [make_linear(torch.randn(SHAPE, generator=g).bfloat16(), None, torch.float32, {})
                for _ in range(MATRICES)]
    x = torch.randn(ROWS, SHAPE[1], generator=g)
    for p in products:
        p(x)
    conn.send("ready")
    while (repeats := conn.recv()) is not None:
        start = time.perf_counter()
        for _ in range(repeats):
            for p in products:
                p(x)
        conn.send(time.perf_counter() - start)


class CoreScaling:
    """P worker processes kept loaded; `measure()` gives one reading of the P-core scaling."""

    def __init__(self, processes: int, alternations: int = 7) -> None:
        ctx = mp.get_context("spawn")
        self.alternations = alternations
        self.conns, self.procs = [], []
        for _ in range(processes):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child,), daemon=True)
            proc.start()
            self.conns.append(conn)
            self.procs.append(proc)
        for conn in self.conns:
            conn.recv()

    def measure(self) -> float:
        """P x (one process alone) / (all P at once): P when every core keeps its speed under load. The machine's
        speed drifts within a second, so the reading is the median of short alternations of the two."""
        ratios = []
        for _ in range(self.alternations):
            alone = []
            for conn in self.conns:
                conn.send(1)
                alone.append(conn.recv())
            for conn in self.conns:
                conn.send(1)
            together = max(conn.recv() for conn in self.conns)
            ratios.append(len(self.conns) * statistics.mean(alone) / together)
        return statistics.median(ratios)

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            conn.send(None)
            proc.join(10)
