"""The runtime's primitives against brute force: masks densified, the SSD scan vs the recurrence."""
from __future__ import annotations

import pytest
import torch

from twotower.ops import attention, block_training_mask, causal_mask, ssd_scan, window_mask

torch.set_num_threads(1)


def test_block_training_mask_densified():
    L, B = 8, 4
    m = block_training_mask(L, B)
    assert m.shape == (L, 2 * L)
    for i in range(L):
        k = i // B
        for j in range(L):
            assert bool(m[i, j]) == (j < k * B), (i, j)  # context: strictly before the block
            assert bool(m[i, L + j]) == (j // B == k), (i, j)  # own block, both directions


def test_causal_mask_with_left_padding_densified():
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    m = causal_mask(valid, 2)[:, 0]  # last two of five keys are the queries
    assert m.shape == (2, 2, 5)
    expect0 = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    expect1 = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0], expect0) and torch.equal(m[1], expect1)


def test_attention_with_mask_equals_loop_over_queries():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g),
               torch.randn(1, 2, 16, 8, generator=g))
    mask = block_training_mask(8, 4)
    got = attention(q, k, v, mask, 8 ** -0.5).view(1, 8, 4, 8)
    for i in range(8):
        keys = mask[i].nonzero()[:, 0]
        for h in range(4):
            w = torch.softmax(q[0, h, i] @ k[0, h // 2, keys].T * 8 ** -0.5, -1)
            torch.testing.assert_close(got[0, i, h], w @ v[0, h // 2, keys], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,chunk,with_init", [(11, 4, True), (11, 4, False), (11, 16, True), (16, 16, False),
                                              (1, 4, True), (8, 1, True), (8, 1, False), (70, 1, True)])
def test_ssd_scan_matches_recurrence_and_boundary_states(T, chunk, with_init):
    """Multi-chunk, single-chunk (a decoded block), one-token and every-position (chunk 1: a verified
    block's rollback points; quadratic form up to EVERY_POSITION_MAX, chunks beyond) paths all equal
    the recurrence."""
    g = torch.Generator().manual_seed(0)
    N, H, P, G, S = 2, 4, 3, 2, 5
    x = torch.randn(N, T, H, P, generator=g)
    dt = torch.rand(N, T, H, generator=g) + 0.1
    A = -torch.rand(H, generator=g) - 0.5
    Bm, Cm = torch.randn(N, T, G, S, generator=g), torch.randn(N, T, G, S, generator=g)
    D = torch.randn(H, generator=g)
    init = torch.randn(N, H, P, S, generator=g) if with_init else torch.zeros(N, H, P, S)
    y, states = ssd_scan(x, dt, A, Bm, Cm, D, init if with_init else None, chunk)
    h = init.clone()
    Bh, Ch = Bm.repeat_interleave(H // G, 2), Cm.repeat_interleave(H // G, 2)
    ref_states = [h.clone()]
    for s in range(T):
        h = (h * torch.exp(dt[:, s] * A)[..., None, None]
             + (dt[:, s, :, None] * x[:, s])[..., None] * Bh[:, s, :, None, :])
        torch.testing.assert_close(y[:, s], (h * Ch[:, s, :, None, :]).sum(-1) + D[:, None] * x[:, s],
                                   atol=1e-4, rtol=1e-4)
        if (s + 1) % chunk == 0 or s == T - 1:
            ref_states.append(h.clone())
    assert states.shape[1] == len(ref_states) == -(-T // chunk) + 1
    for got, ref in zip(states.unbind(1), ref_states):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T,with_init", [(9, True), (9, False), (1, True)])
def test_ssd_state_at_equals_the_every_position_states(T, with_init):
    """A verified block's rollback: the state after any accepted length, from the kept ingredients
    (`points`), equals the every-position scan's, per row at different lengths, 0 and T included;
    the outputs are unchanged."""
    from twotower.ops import ssd_state_at

    g = torch.Generator().manual_seed(2)
    N, H, P, G, S = 3, 4, 3, 2, 5
    args = (torch.randn(N, T, H, P, generator=g), torch.rand(N, T, H, generator=g) + 0.1,
            -torch.rand(H, generator=g) - 0.5, torch.randn(N, T, G, S, generator=g),
            torch.randn(N, T, G, S, generator=g), torch.randn(H, generator=g),
            torch.randn(N, H, P, S, generator=g) if with_init else None)
    y, every = ssd_scan(*args, 1)  # [N, T+1, H, P, S]: the state after 0..T positions
    points: dict = {}
    y2, none = ssd_scan(*args, T, points=points)
    assert none is None
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    for upto in ([0, T // 2, T], [T, 1, 0], [T, T, T]):
        upto = torch.tensor(upto)
        torch.testing.assert_close(ssd_state_at(points, upto), every[torch.arange(N), upto], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,chunk", [(16, 16), (11, 4)])
def test_ssd_scan_without_states_gives_the_same_outputs(T, chunk):
    """`want_states=False` (the denoiser) changes nothing but dropping the boundary states."""
    g = torch.Generator().manual_seed(1)
    N, H, P, G, S = 2, 4, 3, 2, 5
    args = (torch.randn(N, T, H, P, generator=g), torch.rand(N, T, H, generator=g) + 0.1,
            -torch.rand(H, generator=g) - 0.5, torch.randn(N, T, G, S, generator=g),
            torch.randn(N, T, G, S, generator=g), torch.randn(H, generator=g), torch.randn(N, H, P, S, generator=g))
    y, states = ssd_scan(*args, chunk)
    y2, none = ssd_scan(*args, chunk, want_states=False)
    assert states is not None and none is None
    torch.testing.assert_close(y2, y, atol=0, rtol=0)


def test_window_mask_counts_positions_not_columns():
    """A left-padded row's window covers the same real keys as the unpadded row's."""
    W = 3
    pos = torch.tensor([[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])  # row 0: two left pads
    m = window_mask(pos, pos, W)[:, 0]
    for r in range(2):
        for i in range(7):
            for j in range(7):
                assert bool(m[r, i, j]) == (abs(int(pos[r, i]) - int(pos[r, j])) < W), (r, i, j)
    # the last query of row 0 (position 4) sees positions 2..4 = columns 4..6, as row 1's position 4
    assert m[0, 6].tolist() == [False] * 4 + [True] * 3 and m[1, 4, 2:5].tolist() == [True] * 3


def test_attention_softcap_against_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) * 3 for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 4 query heads on 2 key heads
    mask = causal_mask(torch.ones(2, 5, dtype=torch.bool), 5)
    cap, scale = 2.0, 0.3
    out = attention(q, k, v, mask, scale, softcap=cap)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = cap * torch.tanh(q @ kk.transpose(-1, -2) * scale / cap)
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(2, 5, -1))
    assert (attention(q, k, v, mask, scale) - out).abs().max() > 1e-2  # the cap matters here


@pytest.mark.parametrize("limit", [(0.0, 0.05), (0.02, 0.08)])
def test_a_finite_dt_limit_is_applied_on_both_sides(limit):
    """Nemotron-H's `time_step_limit` clamps dt from above too when its upper bound is finite; the
    walk must match transformers' forward then (dropping the upper bound misses it by far)."""
    import dataclasses

    from transformers import AutoModelForCausalLM
    from twotower_fixtures import VOCAB, nemotron_h_config, randomise_norms

    import adapters
    from twotower.cache import TowerCache
    from twotower.walk import Walk, context_forward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(nemotron_h_config().__class__(
        **{**nemotron_h_config().to_dict(), "time_step_limit": limit})).float().eval()
    randomise_norms(model)
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    adapter = adapters.get(model)
    with torch.no_grad():
        want = model(ids).logits.float()
        hidden, _ = context_forward(Walk.of(adapter, model), ids, TowerCache.empty(2, "cpu"), chunk=4)
        assert (Walk.of(adapter, model).logits(hidden) - want).abs().max().item() < 1e-5

        class NoUpperBound(type(adapter)):
            def mamba(self, sub):
                return dataclasses.replace(super().mamba(sub), dt_max=float("inf"))

        walk = Walk.of(NoUpperBound(), model)
        hidden, _ = context_forward(walk, ids, TowerCache.empty(2, "cpu"), chunk=4)
        assert (walk.logits(hidden) - want).abs().max().item() > 1e-3
