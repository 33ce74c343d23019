"""Sampler: greedy, penalties, bias, min_tokens, seeded batch-independent sampling, filters, logprobs."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batching.sampling_params import SamplingParams
from engine.model.sampler import Sampler, SamplingRow, log_exponential_noise, row_keys, vocab_offsets

EOS = 2


def make_row(seed: int = 0, prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(max_tokens=None, **kw), prompt or [], output or [], seed)


def rand_logits(b: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


# -- hash -----------------------------------------------------------------------------------

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def ref_mix64(x: int) -> int:
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_uniform(seed: int, step: int, v: int) -> float:
    key = ref_mix64(ref_mix64(seed + 0x9E3779B97F4A7C15) + (step + 1) * 0x9E3779B97F4A7C15)
    x = (((v + 1) * 0x9E3779B9 + key) & M32) ^ (key >> 32)
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & M32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & M32
    # Top 23 bits read as signed, shifted up by half the range, mid-bin.
    return ((((x >> 9) + (1 << 22)) & ((1 << 23) - 1)) + 0.5) / 2**23


def test_noise_matches_a_plain_python_hash():
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 123456789123456789]
    steps = [0, 1, 7, 1000, 5, 2**31]
    v = 4096
    keys = row_keys(torch.tensor(seeds), torch.tensor(steps))
    noise = log_exponential_noise(keys, vocab_offsets(v, torch.device("cpu")))  # [6, V]
    u = torch.exp(-torch.exp(noise.double()))
    for r, (seed, step) in enumerate(zip(seeds, steps)):
        for col in (0, 1, 2, 1000, v - 1):
            assert u[r, col].item() == pytest.approx(ref_uniform(seed, step, col), rel=1e-6)
    assert (u > 0).all() and (u < 1).all()
    # Uniform on (0, 1): 16 equal bins over 24k draws.
    hist = torch.histc(u.float(), bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    assert ((hist - expected) ** 2 / expected).sum().item() < 60  # chi2, 15 dof


# -- greedy and logit processing ------------------------------------------------------------


def test_greedy_is_argmax_of_raw_logits():
    logits = rand_logits(16, 1000, 0)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0  # tie: the lower id wins
    rows = [make_row(temperature=0.0) for _ in range(16)]
    out = Sampler(1000, frozenset({EOS}))(logits, rows)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids[3].item() == 10
    assert out.logprobs is None and out.top_ids is None


def test_greedy_rows_mixed_with_sampled_rows_stay_argmax():
    logits = rand_logits(8, 500, 1)
    rows = [make_row(seed=i, temperature=0.0 if i % 2 else 1.0) for i in range(8)]
    out = Sampler(500, frozenset({EOS}))(logits, rows)
    assert torch.equal(out.token_ids[1::2], logits[1::2].argmax(dim=-1))


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = rand_logits(32, 700, 2)
    s = Sampler(700, frozenset({EOS}))
    greedy = logits.argmax(dim=-1)
    assert torch.equal(s(logits, [make_row(seed=i, top_k=1) for i in range(32)]).token_ids, greedy)
    assert torch.equal(s(logits, [make_row(seed=i, top_p=1e-6) for i in range(32)]).token_ids, greedy)


def ref_penalise(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """One row, token by token, as vLLM / OpenAI describe it."""
    x = logits.clone().double()
    p = row.params
    for tok in set(row.prompt_token_ids) | set(row.output_token_ids):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(row.output_token_ids):
        count = row.output_token_ids.count(tok)
        x[tok] -= count * p.frequency_penalty + p.presence_penalty
    return x.float()


def test_penalties_match_a_per_row_reference():
    V = 300
    g = torch.Generator().manual_seed(3)
    logits = rand_logits(6, V, 4)
    cases = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.7),
        dict(frequency_penalty=0.8),
        dict(presence_penalty=-1.5),
        dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.25),
        dict(),  # no penalty, in a batch that has them
    ]
    rows = []
    for i, kw in enumerate(cases):
        prompt = torch.randint(0, V, (40,), generator=g).tolist()
        output = torch.randint(0, 30, (25,), generator=g).tolist()  # many repeats
        rows.append(make_row(i, prompt, output, temperature=0.0, **kw))
    rows[1].output_token_ids = []  # a row with only a prompt
    s = Sampler(V, frozenset({EOS}))
    before = logits.clone()
    got = s.adjust_logits(logits, rows)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[i], ref_penalise(logits[i], row), rtol=1e-5, atol=1e-5)
    assert torch.equal(s(logits, rows).token_ids, got.argmax(dim=-1))


def test_penalties_only_in_some_rows_leave_others_untouched():
    logits = rand_logits(4, 100, 5)
    rows = [make_row(prompt=[1, 2, 3], output=[4, 4], temperature=0.0) for _ in range(4)]
    rows[2] = make_row(prompt=[1, 2, 3], output=[4, 4], temperature=0.0, frequency_penalty=1.0)
    got = Sampler(100, frozenset({EOS})).adjust_logits(logits, rows)
    assert torch.equal(got[[0, 1, 3]], logits[[0, 1, 3]])
    assert got[2, 4].item() == pytest.approx(logits[2, 4].item() - 2.0)


@st.composite
def adjusted_rows(draw) -> SamplingRow:
    tokens = st.lists(st.integers(0, 11), max_size=8)
    return make_row(
        prompt=draw(tokens),
        output=draw(tokens),
        temperature=0.0,
        repetition_penalty=draw(st.sampled_from([1.0, 0.5, 1.7])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.3, -1.0])),
        presence_penalty=draw(st.sampled_from([0.0, 1.2, -0.4])),
        logit_bias=draw(st.dictionaries(st.integers(0, 11), st.floats(-100, 100), max_size=3)),
        min_tokens=draw(st.integers(0, 3)),
        stop_token_ids=draw(st.lists(st.integers(0, 11), max_size=2)),
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(adjusted_rows(), min_size=1, max_size=5))
def test_adjusted_logits_match_the_reference_for_any_mix(rows):
    V = 12
    logits = rand_logits(len(rows), V, len(rows))
    got = Sampler(V, frozenset({EOS, 11})).adjust_logits(logits, rows)
    for i, row in enumerate(rows):
        want = ref_penalise(logits[i], row)
        for tok, b in (row.params.logit_bias or {}).items():
            want[tok] += b
        if len(row.output_token_ids) < row.params.min_tokens:
            want[[EOS, 11, *row.params.stop_token_ids]] = -math.inf
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-4)


def test_logit_bias_is_added_and_steers_greedy():
    logits = rand_logits(2, 50, 6)
    rows = [make_row(temperature=0.0, logit_bias={7: 100.0, 8: -5.5}), make_row(temperature=0.0)]
    s = Sampler(50, frozenset({EOS}))
    got = s.adjust_logits(logits, rows)
    assert got[0, 7].item() == pytest.approx(logits[0, 7].item() + 100.0)
    assert got[0, 8].item() == pytest.approx(logits[0, 8].item() - 5.5)
    assert torch.equal(got[1], logits[1])
    assert s(logits, rows).token_ids[0].item() == 7
    rows = [make_row(seed=i, logit_bias={9: 100.0}) for i in range(20)]
    assert (s(rand_logits(20, 50, 7), rows).token_ids == 9).all()


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    V = 40
    logits = torch.zeros(3, V)
    logits[:, EOS] = 50.0
    logits[:, 5] = 40.0
    logits[:, 6] = 30.0
    rows = [
        make_row(output=[1, 1], min_tokens=3, stop_token_ids=[5], temperature=0.0),  # masked
        make_row(output=[1, 1, 1], min_tokens=3, stop_token_ids=[5], temperature=0.0),  # reached
        make_row(seed=1, output=[], min_tokens=1, stop_token_ids=[5]),  # masked, sampled
    ]
    s = Sampler(V, frozenset({EOS}))
    got = s.adjust_logits(logits, rows)
    assert got[0, EOS] == -math.inf and got[0, 5] == -math.inf and got[0, 6] == 30.0
    assert torch.equal(got[1], logits[1])
    assert s(logits, rows).token_ids.tolist() == [6, EOS, 6]


# -- seeded sampling ------------------------------------------------------------------------

VARIANTS = [
    dict(temperature=0.9),
    dict(temperature=1.0, top_k=20),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.7, min_p=0.05),
    dict(temperature=1.2, top_k=100, top_p=0.9, min_p=0.01),
    dict(temperature=1.0, top_p=0.5, presence_penalty=1.0, repetition_penalty=1.1),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_seeded_rows_do_not_depend_on_batch_or_position(kw):
    V = 1000
    target = rand_logits(1, V, 8, scale=1.5)
    row = make_row(seed=2**64 - 5, prompt=[3, 4], output=[5, 6, 7], **kw)
    s = Sampler(V, frozenset({EOS}))
    alone = s(target, [row]).token_ids.item()
    # Neighbours that push the batch down other paths: greedy, all top_k, flat top_p, long outputs.
    neighbours = [
        make_row(seed=11, temperature=0.0),
        make_row(seed=12, top_k=5),
        make_row(seed=13, top_p=0.99, temperature=3.0),
        make_row(seed=14, output=list(range(50)), frequency_penalty=0.5),
        make_row(seed=15, min_p=0.2, logprobs=3),
    ]
    others = rand_logits(len(neighbours), V, 9)
    for pos in range(len(neighbours) + 1):
        batch_rows = neighbours[:pos] + [row] + neighbours[pos:]
        logits = torch.cat((others[:pos], target, others[pos:]))
        assert s(logits, batch_rows).token_ids[pos].item() == alone
        # The same with only top_k-bounded neighbours, so a top_k row can race over candidates alone.
        if "top_k" in kw:
            batch_rows = [make_row(seed=20, top_k=3)] * pos + [row]
            logits = torch.cat((others[:pos], target))
            assert s(logits, batch_rows).token_ids[pos].item() == alone


def test_seed_and_step_drive_the_draw():
    V = 1000
    logits = rand_logits(1, V, 10, scale=0.5).expand(64, V)  # flat: samples spread widely
    s = Sampler(V, frozenset({EOS}))
    by_seed = s(logits, [make_row(seed=i) for i in range(64)]).token_ids
    assert len(set(by_seed.tolist())) > 40
    by_step = s(logits, [make_row(seed=7, output=[1] * i) for i in range(64)]).token_ids
    assert len(set(by_step.tolist())) > 40
    again = s(logits, [make_row(seed=i) for i in range(64)]).token_ids
    assert torch.equal(by_seed, again)


def kept_sets(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens a row may sample, by sorting in float64."""
    x = logits.double() / p.temperature
    probs = torch.softmax(x, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    keep = order[: p.top_k] if p.top_k > 0 else order
    mass = probs[keep] / probs[keep].sum()
    cum = 0.0
    nucleus = []
    for tok, m in zip(keep, mass.tolist()):
        if cum >= p.top_p:
            break
        nucleus.append(tok)
        cum += m
    top = probs.max().item()
    return {t for t in nucleus if probs[t].item() >= p.min_p * top}


@pytest.mark.parametrize(
    "kw, scale",
    [
        (dict(top_k=7), 3.0),
        (dict(top_k=300, temperature=2.0), 1.0),
        (dict(top_p=0.7), 3.0),
        (dict(top_p=0.95, temperature=1.5), 0.5),  # nucleus wider than the CPU candidates: sorted
        (dict(min_p=0.1), 2.0),
        (dict(top_k=50, top_p=0.6, min_p=0.05, temperature=0.8), 2.0),
    ],
)
def test_filters_never_let_a_dropped_token_through(kw, scale):
    V, N = 2000, 256
    logits = rand_logits(1, V, 12, scale=scale)
    params = SamplingParams(max_tokens=None, **kw)
    allowed = kept_sets(logits[0], params)
    rows = [make_row(seed=i, **kw) for i in range(N)]
    got = Sampler(V, frozenset({EOS}))(logits.expand(N, V), rows).token_ids.tolist()
    assert set(got) <= allowed
    assert len(set(got)) >= min(len(allowed), 20) // 2  # and it does not collapse onto a few


def test_top_p_on_cpu_widens_its_candidates_until_the_nucleus_fits():
    """A nucleus within the first candidates, one that needs more, and one that needs the whole row sorted: each
    row's floor is what sorting the row gives."""
    from engine.model import sampler as sampler_module

    V = 20000
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, V, generator=g)
    scaled = torch.stack([base[0] * 6.0, base[1] * 3.0, base[2] * 0.05])  # peaked, wide, nearly flat
    ps = [SamplingParams(max_tokens=None, top_p=p) for p in (0.9, 0.9, 0.9)]
    top_k = torch.zeros(3, 1, dtype=torch.int64)
    top_p = torch.full((3, 1), 0.9)
    floor, _ = Sampler(V, frozenset({EOS}))._rank_floor(scaled, ps, top_k, top_p)
    want, _ = sampler_module._nucleus_floor(scaled, scaled.sort(dim=-1, descending=True).values, top_k, top_p, True)
    torch.testing.assert_close(floor, want)
    kept = (scaled >= floor).sum(dim=-1).tolist()
    first = sampler_module._CPU_TOP_P_CANDIDATES
    more = first * sampler_module._CPU_TOP_P_GROWTH
    assert kept[0] <= first < kept[1] <= more < kept[2]  # the three paths were taken


@pytest.mark.parametrize(
    "kw, keep",
    [
        (dict(temperature=0.7), None),
        (dict(temperature=1.3, top_k=4), 4),
        (dict(temperature=1.0, top_p=0.75), None),
    ],
)
def test_empirical_distribution_matches_softmax(kw, keep):
    V, N = 8, 20000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    params = SamplingParams(max_tokens=None, **kw)
    allowed = sorted(kept_sets(logits[0], params))
    probs = torch.softmax(logits[0].double() / params.temperature, dim=-1)[allowed]
    probs /= probs.sum()
    rows = [make_row(seed=1000 + i, **kw) for i in range(N)]
    got = Sampler(V, frozenset({EOS}))(logits.expand(N, V), rows).token_ids
    counts = torch.bincount(got, minlength=V).double()
    assert counts.sum().item() == counts[allowed].sum().item()
    expected = probs * N
    chi2 = ((counts[allowed] - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0  # at most 7 dof: p < 1e-4 under the null; seeds are fixed, so no flakes
    if keep is not None:
        assert len(allowed) == keep


# -- logprobs and transfer ------------------------------------------------------------------


def test_logprobs_are_raw_and_top_ids_are_the_top_k():
    V = 400
    logits = rand_logits(5, V, 13)
    rows = [
        make_row(seed=0, logprobs=3, temperature=0.5, presence_penalty=1.0, output=[1, 2]),
        make_row(seed=1, logprobs=5),
        make_row(seed=2, temperature=0.0, logprobs=0),
        make_row(seed=3, temperature=0.0),
        make_row(seed=4, logprobs=1, logit_bias={3: 50.0}),
    ]
    out = Sampler(V, frozenset({EOS}))(logits, rows)
    ref = torch.log_softmax(logits.double(), dim=-1).float()
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (5, 5) and out.top_logprobs.shape == (5, 5)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    ref_top, ref_ids = ref.topk(5, dim=-1)
    assert torch.equal(out.top_ids, ref_ids)
    torch.testing.assert_close(out.top_logprobs, ref_top)
    assert out.token_ids[4].item() == 3  # the bias steers the draw, not the reported logprob
    torch.testing.assert_close(out.logprobs[4], ref[4, 3])

    host = out.to_host()
    assert host.token_ids == out.token_ids.tolist()
    assert host.logprobs == pytest.approx(out.logprobs.tolist())
    assert host.top is not None and len(host.top) == 5 and all(len(t) == 5 for t in host.top)
    assert all(isinstance(t, int) and isinstance(lp, float) for t, lp in host.top[0])
    assert [t for t, _ in host.top[1]] == out.top_ids[1].tolist()


def test_to_host_without_logprobs():
    s = Sampler(30, frozenset({EOS}))
    host = s(rand_logits(3, 30, 14), [make_row(seed=i) for i in range(3)]).to_host()
    assert len(host.token_ids) == 3 and all(isinstance(t, int) for t in host.token_ids)
    assert host.logprobs is None and host.top is None


def test_other_layouts_and_dtypes():
    base = rand_logits(30, 4, 15)  # [V, B] then transposed: non-contiguous rows
    logits = base.t()
    rows = [make_row(seed=i, output=[1], repetition_penalty=1.5, logit_bias={0: 1.0}) for i in range(4)]
    s = Sampler(30, frozenset({EOS}))
    a = s(logits, rows).token_ids
    assert torch.equal(a, s(logits.contiguous(), rows).token_ids)
    half = s(logits.to(torch.bfloat16), [make_row(temperature=0.0)] * 4).token_ids
    assert torch.equal(half, logits.to(torch.bfloat16).float().argmax(dim=-1))
    with pytest.raises(ValueError):
        s(rand_logits(2, 31, 0), [make_row(), make_row()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    V, B = 5000, 48
    keys = row_keys(torch.arange(B), torch.arange(B) * 3)
    cpu_noise = log_exponential_noise(keys, vocab_offsets(V, torch.device("cpu")))
    gpu_noise = log_exponential_noise(keys.cuda(), vocab_offsets(V, torch.device("cuda")))
    torch.testing.assert_close(gpu_noise.cpu(), cpu_noise, rtol=1e-5, atol=1e-6)  # same integer hash

    logits = rand_logits(B, V, 16, scale=2.0)
    kws = VARIANTS + [dict(temperature=0.0), dict(temperature=0.0, logprobs=2, repetition_penalty=1.3)]
    rows = [make_row(seed=i, prompt=[1, 2, 3], output=[4, 5, 4], **kws[i % len(kws)]) for i in range(B)]
    s = Sampler(V, frozenset({EOS}))
    cpu = s(logits, rows)
    gpu = s(logits.cuda(), rows)
    assert gpu.token_ids.device.type == "cuda"
    greedy = torch.tensor([r.params.greedy for r in rows])
    assert torch.equal(gpu.token_ids.cpu()[greedy], cpu.token_ids[greedy])
    # Sampled rows may only part ways on a float near-tie between two tokens.
    assert (gpu.token_ids.cpu() == cpu.token_ids).float().mean().item() >= 0.9
    host = gpu.to_host()
    assert host.top is not None and len(host.top) == B


# -- grammar masks ----------------------------------------------------------------------------

def bitmask_allowing(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    """[G, ceil(V / 32)] int32: bit j of word w allows token 32 w + j."""
    words = torch.zeros(len(allowed), (vocab + 31) // 32, dtype=torch.int64)
    for g, toks in enumerate(allowed):
        for t in toks:
            words[g, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "torch"])
def test_token_mask_sets_exactly_the_forbidden_logits_to_minus_infinity(kernel, monkeypatch):
    from engine.kernels import token_mask

    if not kernel:
        monkeypatch.setattr(token_mask, "_library", lambda: None)
    V = 100  # not a multiple of 32: the last word's spare bits name no token
    logits = rand_logits(3, V, 5)
    allowed = [{0, 31, 32, 63, 99}, set(range(V)), {7}]
    masked = logits.clone()
    token_mask.apply(masked, torch.tensor([2, 0]), bitmask_allowing([allowed[0], allowed[2]], V))
    for row, keep in ((2, allowed[0]), (0, allowed[2])):
        for t in range(V):
            assert masked[row, t] == (logits[row, t] if t in keep else -math.inf)
    assert torch.equal(masked[1], logits[1])  # a row without a mask is left alone


@pytest.mark.parametrize("kw", [
    {"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.5, "top_k": 5}, {"temperature": 0.8, "top_p": 0.5},
    {"temperature": 1.0, "min_p": 0.2}, {"temperature": 1.0, "presence_penalty": 2.0, "repetition_penalty": 2.0},
], ids=["greedy", "sampled", "top-k", "top-p", "min-p", "penalties"])
def test_a_grammar_mask_wins_over_bias_penalties_and_filters(kw):
    V = 64
    sampler = Sampler(V, frozenset({EOS}))
    keep = {10, 20, 30}
    bias = {t: 100.0 for t in range(V) if t not in keep}  # every forbidden token as likely as can be
    rows = [make_row(seed=s, prompt=[10, 20], output=[30], logit_bias=bias, **kw) for s in range(8)]
    free = make_row(seed=99, temperature=0.0)
    logits = rand_logits(9, V, 3)
    masks = (list(range(8)), bitmask_allowing([keep] * 8, V))
    out = sampler(logits, [*rows, free], masks)
    assert all(t in keep for t in out.token_ids[:8].tolist())
    assert out.token_ids[8] == int(logits[8].argmax())  # the row without a grammar samples as before


def test_logprobs_under_a_grammar_are_the_models_own():
    V = 40
    sampler = Sampler(V, frozenset({EOS}))
    logits = rand_logits(1, V, 9)
    out = sampler(logits.clone(), [make_row(temperature=0.0, logprobs=3)], ([0], bitmask_allowing([{5, 6}], V)))
    raw = torch.log_softmax(logits, dim=-1)
    assert out.token_ids[0] in (5, 6)
    assert out.logprobs[0] == pytest.approx(float(raw[0, out.token_ids[0]]))
    assert out.top_ids[0].tolist() == raw[0].topk(3).indices.tolist()


def test_a_grammar_is_not_combined_with_ignore_eos_or_min_tokens():
    from batching.sampling_params import ParamError

    with pytest.raises(ParamError, match="ignore_eos"):
        SamplingParams(grammar="g", ignore_eos=True)
    with pytest.raises(ParamError, match="min_tokens"):
        SamplingParams(grammar="g", min_tokens=2)
