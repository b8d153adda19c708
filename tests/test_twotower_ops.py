"""The runtime's primitives against brute force: masks densified, the SSD scan vs the recurrence."""
from __future__ import annotations

import pytest
import torch

from twotower.ops import attention, block_training_mask, causal_mask, ssd_scan

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


@pytest.mark.parametrize("T,chunk,with_init", [(11, 4, True), (11, 4, False), (11, 16, True), (16, 16, False), (1, 4, True)])
def test_ssd_scan_matches_recurrence_and_boundary_states(T, chunk, with_init):
    """Multi-chunk, single-chunk (a decoded block) and one-token paths all equal the recurrence."""
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
        h = h * torch.exp(dt[:, s] * A)[..., None, None] + (dt[:, s, :, None] * x[:, s])[..., None] * Bh[:, s, :, None, :]
        torch.testing.assert_close(y[:, s], (h * Ch[:, s, :, None, :]).sum(-1) + D[:, None] * x[:, s], atol=1e-4, rtol=1e-4)
        if (s + 1) % chunk == 0 or s == T - 1:
            ref_states.append(h.clone())
    assert states.shape[1] == len(ref_states) == -(-T // chunk) + 1
    for got, ref in zip(states.unbind(1), ref_states):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


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
