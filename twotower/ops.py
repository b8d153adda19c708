"""Tensor primitives shared by both towers: attention with explicit masks, the Mamba-2 SSD scan
(returning the state at every chunk boundary) and the Mamba-2 mixer built on it.

Everything here is plain torch so that the training forward, `ar`, `mock_ar` and `diffusion`
decoding run the same code (invariants 5 and 6 by construction). Masks are boolean, True = may
attend, and always built explicitly (docs/design.md section 7: extending a cache by B>1 tokens with
`sdpa` and no mask silently attends to the wrong keys).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

if TYPE_CHECKING:  # annotations only: importing `adapters` at run time loads every adapter's
    # transformers modules, whose Auto-class import registers twotower.model, which imports this
    # module: a circular import when `twotower.ops` is the first thing imported
    from adapters.base import Mamba2Params


def attention(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """q `[N, H, Tq, d]`, k/v `[N, Hkv, Tk, d]`, bool mask broadcastable to `[N, 1, Tq, Tk]`
    -> `[N, Tq, H·d]`. Every query row must allow at least one key (else NaN).

    softcap: scores become `softcap · tanh(scores / softcap)` before masking (Gemma 2/3's
    `attn_logit_softcapping`), computed as HF's eager attention does (softmax in float32)."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        o = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """`[N, 1, Tq, Tk]` True where |query position - key position| < window (position ids, so
    left pads, which repeat the next real token's position, never shift a window)."""
    return ((query_pos[:, :, None] - key_pos[:, None, :]).abs() < window)[:, None]


def causal_mask(valid: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Mask for the last `n_queries` of `valid.shape[1]` keys attending causally.

    valid `[N, Tk]` marks real (non-pad) keys. A query always sees itself, so a pad query's row is
    never empty (its output is garbage but finite and never read). Returns `[N, 1, Tq, Tk]`.
    """
    n_keys = valid.shape[1]
    q_idx = torch.arange(n_keys - n_queries, n_keys, device=valid.device)[:, None]
    k_idx = torch.arange(n_keys, device=valid.device)[None, :]
    allowed = (k_idx <= q_idx) & (valid[:, None, :] | (k_idx == q_idx))
    return allowed[:, None]


def block_training_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """The denoiser's attention mask in the vectorised training layout, `[L, 2L]`.

    Queries are the L noisy positions. Keys are the L clean context positions (the context tower's
    own K/V) followed by the L noisy positions. A query in block k sees context keys before the
    block start k·B, and every noisy key of its own block (bidirectional), nothing else.
    """
    pos = torch.arange(length, device=device)
    block = pos // block_size
    sees_context = pos[None, :] < (block * block_size)[:, None]
    sees_block = block[None, :] == block[:, None]
    return torch.cat([sees_context, sees_block], dim=1)


def _segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """exp of segment sums: out[..., i, j] = exp(sum a[..., j+1..i]) for i >= j, else 0.

    The exponent is masked to -inf *before* exp (masking after gives NaN from inf·0)."""
    cum = torch.cumsum(a, dim=-1)
    seg = cum[..., :, None] - cum[..., None, :]
    n = a.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=a.device).tril()
    return torch.exp(seg.masked_fill(~keep, float("-inf")))


EVERY_POSITION_MAX = 64
"""chunk = 1 asks for the state after every position (the one-token blocks of `twotower.checks`;
verified decoding's rollback used it until `c5a04bb`, and now computes the kept length's state
only, `ssd_state_at`): up to this many tokens they come from the one-chunk quadratic form's own
decay matrix, one more einsum and no chunk recurrence (`bench/scan_cost.py`, docs/benchmarks.md);
its cost grows as T², so longer inputs take the chunk path."""


def ssd_state_at(points: dict, upto: torch.Tensor) -> torch.Tensor:
    """The SSM state after the first `upto[n]` positions (0..T) of each row of a one-chunk scan, from
    the ingredients `ssd_scan(..., points=...)` kept: `[N, H, P, S]`, float32.

    A verified block needs the state at its accepted length only; this is one einsum over the block
    per Mamba sublayer, the cost of the end state a block commit computes anyway, where keeping the
    state after every position costs a T-times larger one (`bench/scan_cost.py`)."""
    acum, B, xdt, init = points["acum"], points["B"], points["xdt"], points["init"]
    length = acum.shape[-1]
    upto = upto.to(acum.device)
    last = (upto - 1).clamp(min=0)[:, None, None].expand(-1, acum.shape[1], 1)
    end = torch.where(upto[:, None, None] > 0, acum.gather(-1, last), torch.zeros((), device=acum.device))  # [N, H, 1]
    before = torch.arange(length, device=acum.device)[None, None, :] < upto[:, None, None]
    weight = torch.exp((end - acum).masked_fill(~before, float("-inf")))  # exp(sum adt over m+1..upto-1)
    state = torch.einsum("nhm,nmhs,nmhp->nhps", weight, B, xdt)
    if init is not None:
        state = state + init * torch.exp(end)[..., None]
    return state


def ssd_scan(x, dt, A, B, C, D, initial_state, chunk: int, want_states: bool = True, points: dict | None = None):
    """Mamba-2 SSD chunk scan in float32.

    x `[N, T, H, P]`, dt `[N, T, H]` (after bias, softplus, clamp), A `[H]` (negative),
    B/C `[N, T, G, S]`, D `[H]`, initial_state `[N, H, P, S]` or None.
    Returns y `[N, T, H, P]` and the states at every chunk boundary `[N, c+1, H, P, S]`:
    index k is the state before position k·chunk, the last one the state after all T tokens.
    Use chunk = block size and the boundaries are exactly the block starts; chunk = 1 gives the state
    after every position.
    want_states=False returns (y, None) and skips the end-state work of a one-chunk input, ~30 %
    of its cost (the denoiser never reads its own states: its blocks are seeded from the context
    tower's).
    points (a dict, one-chunk inputs only) receives what `ssd_state_at` needs to give the state after
    any position later (a verified block's rollback); the states are then not computed: (y, None).
    """
    n, length, heads, head_dim = x.shape
    rep = heads // B.shape[2]
    x, dt = x.float(), dt.float()
    B = B.float().repeat_interleave(rep, dim=2)
    C = C.float().repeat_interleave(rep, dim=2)
    skip = x * D.float()[:, None]
    if length == 1 and points is None:  # one token (AR steps): the recurrence itself, a handful of ops
        init = initial_state.float() if initial_state is not None else x.new_zeros(n, heads, head_dim, B.shape[-1])
        decay = torch.exp(dt[:, 0] * A.float())[..., None, None]  # [N, H, 1, 1]
        state = init * decay + (dt[:, 0, :, None] * x[:, 0])[..., None] * B[:, 0, :, None, :]
        y = (state @ C[:, 0, :, :, None]).squeeze(-1) + skip[:, 0]  # [N, H, P]
        return y[:, None], torch.stack([init, state], dim=1)
    xdt = x * dt[..., None]
    adt = dt * A.float()
    every = chunk == 1 and length <= EVERY_POSITION_MAX
    if length <= chunk or every:  # one chunk (a decoded block): the quadratic form, no chunk recurrence
        adt = adt.transpose(1, 2)  # [N, H, T]
        acum = torch.cumsum(adt, dim=-1)
        decay = _segsum_exp(adt)  # [N, H, T, T]
        scores = torch.einsum("nlhs,nmhs->nhlm", C, B) * decay
        y = torch.einsum("nhlm,nmhp->nlhp", scores, xdt)
        init = initial_state.float() if initial_state is not None else None
        if init is not None:
            y = y + torch.einsum("nlhs,nhps->nlhp", C, init) * torch.exp(acum).transpose(1, 2)[..., None]
        if points is not None:
            points.update(acum=acum, B=B, xdt=xdt, init=init)
            return y + skip, None
        if not want_states:
            return y + skip, None
        if every:  # the state after each position: the same decay matrix, summed to every row
            states = torch.einsum("nhlm,nmhs,nmhp->nlhps", decay, B, xdt)
            if init is None:
                init = states.new_zeros(states[:, 0].shape)
            else:
                states = states + init[:, None] * torch.exp(acum).transpose(1, 2)[..., None, None]
            return y + skip, torch.cat([init[:, None], states], dim=1)
        decay_to_end = torch.exp(acum[..., -1:] - acum)  # [N, H, T]
        final = torch.einsum("nlhs,nhl,nlhp->nhps", B, decay_to_end, xdt)
        if init is None:
            init = torch.zeros_like(final)
        else:
            final = final + init * torch.exp(acum[..., -1])[..., None, None]
        return y + skip, torch.stack([init, final], dim=1)
    pad = (-length) % chunk
    if pad:  # zero dt·A and x·dt: padded steps neither decay nor feed the state
        xdt, adt = F.pad(xdt, (0, 0, 0, 0, 0, pad)), F.pad(adt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (length + pad) // chunk
    xdt = xdt.reshape(n, c, chunk, heads, head_dim)
    B = B.reshape(n, c, chunk, heads, -1)
    C = C.reshape(n, c, chunk, heads, -1)
    adt = adt.reshape(n, c, chunk, heads).permute(0, 3, 1, 2)  # [N, H, c, l]
    acum = torch.cumsum(adt, dim=-1)
    # 1. inside each chunk (the "attention-like" diagonal blocks)
    decay_in = _segsum_exp(adt)  # [N, H, c, l, s]
    scores = torch.einsum("nclhs,ncmhs->nhclm", C, B) * decay_in
    y = torch.einsum("nhclm,ncmhp->nclhp", scores, xdt)
    # 2. each chunk's own end state, started from zero
    decay_to_end = torch.exp(acum[..., -1:] - acum)  # [N, H, c, l]
    own = torch.einsum("nclhs,nhcl,nclhp->nchps", B, decay_to_end, xdt)
    # 3. states at every boundary: closed form over chunks
    init = initial_state.float() if initial_state is not None else own.new_zeros(own[:, 0].shape)
    own = torch.cat([init[:, None], own], dim=1)  # [N, c+1, H, P, S]
    decay_chunks = _segsum_exp(F.pad(acum[..., -1], (1, 0)))  # [N, H, c+1, c+1]
    states = torch.einsum("nhij,njhps->nihps", decay_chunks, own)
    # 4. contribution of each chunk's start state
    y = y + torch.einsum("nclhs,nchps->nclhp", C, states[:, :-1]) * torch.exp(acum).permute(0, 2, 3, 1)[..., None]
    y = y.reshape(n, c * chunk, heads, head_dim)[:, :length] + skip
    return y, states if want_states else None


def _depthwise_conv(x, weight, bias):
    """Valid depthwise conv1d, x `[N, Cd, K-1+T]` -> `[N, Cd, T]`. For a few positions a sum of
    K shifted slices beats `F.conv1d` (~0.5 ms of fixed overhead on CPU) by several times."""
    K = weight.shape[-1]
    T = x.shape[-1] - K + 1
    if x.shape[0] * T > 64 or x.device.type != "cpu":
        return F.conv1d(x, weight, bias, groups=x.shape[1])
    w = weight[:, 0]  # [Cd, K]
    y = x[..., :T] * w[:, :1]
    for k in range(1, K):
        y = y + x[..., k:k + T] * w[:, k:k + 1]
    return y if bias is None else y + bias[:, None]


def mamba2_mixer(p: Mamba2Params, h, conv_state, ssm_state, valid, chunk: int, want_states: bool = True,
                 points: dict | None = None):
    """One Mamba-2 mixer on normed hidden h `[N, T, d]`.

    conv_state `[N, Cd, K-1]` holds the last K-1 *pre-convolution* xBC inputs (None: zeros),
    ssm_state `[N, H, P, S]` (None: zeros). valid `[N, T]` (None: all real) zeroes the inputs at
    pads so a left-padded sequence ends in exactly the state of the unpadded one.
    Returns (out `[N, T, d]`, xbc `[N, Cd, K-1+T]` = conv_state ++ new pre-conv inputs,
    boundary states `[N, c+1, H, P, S]`, None when not `want_states` or with `points`, see `ssd_scan`).
    The caller keeps `xbc[..., -(K-1):]` as the new conv
    state (a fresh tensor, never updated in place).
    """
    n, length, _ = h.shape
    inner = p.num_heads * p.head_dim
    gs = p.n_groups * p.state_size
    if valid is not None:
        h = h * valid[..., None].to(h.dtype)
    gate, xbc, dt = p.in_proj(h).split([inner, inner + 2 * gs, p.num_heads], dim=-1)
    if valid is not None:
        xbc = xbc * valid[..., None].to(xbc.dtype)
    kernel = p.conv1d.weight.shape[-1]
    if conv_state is None:
        conv_state = xbc.new_zeros(n, xbc.shape[-1], kernel - 1)
    xbc = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # [N, Cd, K-1+T]
    conv = _depthwise_conv(xbc.to(p.conv1d.weight.dtype), p.conv1d.weight, p.conv1d.bias)
    conv = ACT2FN[p.activation](conv).transpose(1, 2).to(h.dtype)  # [N, T, Cd]
    if valid is not None:
        conv = conv * valid[..., None].to(conv.dtype)
    x, B, C = conv.split([inner, gs, gs], dim=-1)
    dt = F.softplus(dt.float() + p.dt_bias.float()).clamp(min=p.dt_min, max=p.dt_max)
    A = -torch.exp(p.A_log.float())
    if points is not None and length > chunk:
        raise ValueError("mamba2_mixer: rollback points need a one-chunk input, "
                         f"got {length} tokens in chunks of {chunk}")
    y, states = ssd_scan(
        x.reshape(n, length, p.num_heads, p.head_dim), dt, A,
        B.reshape(n, length, p.n_groups, p.state_size), C.reshape(n, length, p.n_groups, p.state_size),
        p.D, ssm_state, chunk=min(chunk, length), want_states=want_states, points=points,
    )
    y = p.norm(y.reshape(n, length, inner), gate)
    return p.out_proj(y.to(h.dtype)), xbc, states
