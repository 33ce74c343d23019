"""The batch sizes GPU stages capture decode graphs at (the graphs themselves run in tests/test_cuda.py)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.pipeline.decode_graphs import MAX_BUCKET, bucket_sizes


@given(st.integers(1, 2000))
def test_every_batch_the_scheduler_sends_has_a_graph_with_little_padding(max_num_seqs):
    sizes = bucket_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert sizes[-1] == min(max_num_seqs, MAX_BUCKET)
    for n in range(1, sizes[-1] + 1):
        b = next(b for b in sizes if b >= n)
        assert b - n < 8  # at most 7 padded rows
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
