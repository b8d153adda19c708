"""The decoding modes, one unit each, over one shared block loop (`twotower.generate` dispatches).

`decode_ar`: the context tower alone, one token per forward. The block modes share `_block_loop`:
block position 0 is the context tower's next token; a mode's *fill* proposes positions 1..B-1 and
says whether the block still needs its commit, which is ONE context-tower forward over its B tokens
that also yields the next block's first token:
- `diffusion`: confidence-thresholded denoising (`_denoise_block`): each denoiser step scores every
  masked position (max probability, in float64), commits all at >= gamma and at least the most
  confident one per row; t = fraction still masked;
- `verified`: the block is drafted by the γ rule (policy `draft`), and the commit is the
  verification (`verify_block`): the longest draft prefix equal to the context tower's greedy
  tokens is kept, plus its own token at the first disagreement, the cache rolled back to the
  accepted length (`TowerCache.drop_last`; Mamba-2 states at the accepted length from the
  verification's own scan, `walk.rollback_states`): `ar`'s output, token for token;
- `mock_ar`: positions 1..B-1 from single-token context forwards on a scratch copy of the cache
  (equal to `ar` token for token: checks the block commit).

Batching: a row leaves the batch as soon as it is finished (EOS or its budget; `Rows.keep` compacts
rows and caches); inside a block, a row whose draft is complete takes no part in its neighbours'
denoiser steps. New rows may join between forwards (`Decoding.join`, continuous batching: a block
boundary in the block modes, every token in `ar`), with their own prefill and cache (`Rows.admit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from twotower.block_context import DecodeContext
from twotower.positions import prediction_logits
from twotower.rope_switch import exact_forward, settle
from twotower.rows import Rows, Tally
from twotower.walk import rollback_states

DRAFTS = ("full", "confident", "prefix")
"""`verified`'s named draft policies (an int k is the third: at most k denoiser steps)."""


def _after_eos(block: torch.Tensor, committed: torch.Tensor, eos: int | None) -> torch.Tensor:
    """`[b, B]` bool: positions after the first committed EOS of each row."""
    if eos is None:
        return torch.zeros_like(committed)
    hit = (block == eos) & committed
    return (hit.long().cumsum(1) - hit.long()) > 0


@dataclass
class Decoding:
    """One `generate` call as every mode's unit reads it: the model, the rows still decoding, the
    forward tally and the call's settings."""

    model: Any
    rows: Rows
    tally: Tally
    block_size: int
    gamma: float
    eos: int | None
    pad: int
    budget: int
    """max_new_tokens per row."""
    draft: str | int
    """`verified`'s draft policy."""
    ctx_options: dict
    """What every context forward keeps for the denoiser (`model.context_options()`)."""
    ctx_dev: torch.device
    den_dev: torch.device
    trace: list | None
    """Per block the denoiser steps (`return_trace`), else None."""
    join: Callable[[], None] | None = None
    """Continuous batching (`generate(admit=)`): called between forwards, may add rows."""
    pick: Callable[[int], str] | None = None
    """`auto` per block (`generate(pick=)`): rows decoding -> the mode of the next block."""

    def admit(self) -> None:
        if self.join is not None:
            self.join()


def decode_ar(d: Decoding) -> None:
    """`ar`: one context-tower forward per token."""
    rows, walk = d.rows, d.model.context_walk
    while True:
        d.admit()
        if not rows.keep(~rows.emit([[t] for t in rows.first.tolist()], d.eos, d.budget)):
            break
        hidden, rows.cache = exact_forward(walk, rows.first[:, None], rows.cache, chunk=d.block_size, **d.ctx_options)
        d.tally.count("ctx", rows.index)
        rows.first = walk.logits(hidden[:, -1]).argmax(-1)


Fill = Callable[[Decoding, torch.Tensor, "list | None"], "tuple[torch.Tensor | None, list[list[int]]]"]
"""A block mode's proposal: (decoding, block with position 0 set, trace steps) -> (the block to
commit with one context forward, or None when the fill already extended the cache; each row's
tokens)."""


def _block_loop(d: Decoding, fill: Fill | None) -> None:
    """Blocks until every row is finished: a row whose next token (the context tower's) is EOS ends
    there; the others get a block from `fill` (None: the fill `d.pick` chooses for this block),
    emitted and, unless the fill did, committed."""
    rows, walk, B = d.rows, d.model.context_walk, d.block_size
    while True:
        d.admit()
        ended = rows.first == d.eos  # the context tower's own next token ends these rows
        if d.eos is not None and bool(ended.any()):
            done = rows.emit([[t] if e else [] for t, e in zip(rows.first.tolist(), ended.tolist())], d.eos, d.budget)
            if not rows.keep(~done):
                break
        block = torch.full((rows.index.shape[0], B), d.pad, dtype=torch.long, device=d.ctx_dev)
        block[:, 0] = rows.first
        steps: list | None = [] if d.trace is not None else None
        block, tokens = (fill or _picked(d))(d, block, steps)
        if d.trace is not None:
            d.trace.append(steps)
        alive = ~rows.emit(tokens, d.eos, d.budget)
        if not rows.keep(alive):
            break
        if block is not None:  # commit the block: one context forward, the next block's first token
            hidden, rows.cache = exact_forward(walk, block[alive], rows.cache, chunk=B, **d.ctx_options)
            d.tally.count("ctx", rows.index)
            rows.first = walk.logits(hidden[:, -1]).argmax(-1)


def _diffusion_fill(d: Decoding, block: torch.Tensor, steps):
    block, _ = _denoise_block(d.model, block, d.rows, d.gamma, d.eos, d.pad, d.den_dev, d.tally, steps)
    block = block.to(d.ctx_dev)
    return block, block.tolist()


def _verified_fill(d: Decoding, block: torch.Tensor, steps):
    rows = d.rows
    drafting = rows.pause == 0
    if bool(drafting.any()):
        block, sure = _denoise_block(d.model, block, rows, d.gamma, d.eos, d.pad, d.den_dev, d.tally, steps,
                                     draft=d.draft, drafting=drafting)
        block = block.to(d.ctx_dev)
        if d.draft == "prefix":
            block = _through_first_guess(block, sure.to(d.ctx_dev), drafting)
    else:  # every row paused: one AR step
        block = block[:, :1]
        if steps is not None:
            steps.append({"rows": rows.index.tolist(), "tokens": block.tolist(), "masked": [[False]] * block.shape[0]})
    block = _through_eos(block, d.eos)
    accepted = verify_block(d.model, block, rows, d.ctx_options, d.tally, steps)
    rows.after_verify(drafting, accepted)
    return None, [r[:a] for r, a in zip(block.tolist(), accepted.tolist())]


def _mock_ar_fill(d: Decoding, block: torch.Tensor, steps):
    block = _mock_ar_block(d.model, block, d.rows, d.block_size, d.tally)
    return block, block.tolist()


def _ar_fill(d: Decoding, block: torch.Tensor, steps):
    """`ar` as a block of one token (its commit is AR's next forward): `auto` per block only."""
    block = block[:, :1]
    return block, block.tolist()


FILLS: dict[str, Fill] = {"diffusion": _diffusion_fill, "verified": _verified_fill, "mock_ar": _mock_ar_fill,
                          "ar": _ar_fill}


def _picked(d: Decoding) -> Fill:
    """The fill of the mode `d.pick` chooses for the rows decoding now."""
    mode = d.pick(int(d.rows.index.shape[0]))
    if mode not in FILLS:
        raise ValueError(f"generate: pick returned {mode!r}, not one of {tuple(FILLS)}")
    return FILLS[mode]


DECODERS: dict[str, Callable[[Decoding], None]] = {
    "diffusion": partial(_block_loop, fill=_diffusion_fill),
    "verified": partial(_block_loop, fill=_verified_fill),
    "mock_ar": partial(_block_loop, fill=_mock_ar_fill),
    "ar": decode_ar,
    "auto": partial(_block_loop, fill=None),
}
"""Mode -> its unit. `auto` resolves to one of the others before decoding starts, unless a `pick`
chooses the mode block by block (the block loop with `_ar_fill` as `ar`)."""


def _denoise_block(model, block, rows, gamma, eos, pad, den_dev, tally, steps, draft=None, drafting=None):
    """Fill positions 1..B-1 (0..B-1 without token shift, except for a `draft`, where position 0
    is the context tower's token) by confidence-thresholded denoising. Each step runs only the rows
    that still have a masked position. `draft` (verified's policy, see `generate`) may stop a row
    early: what it still has masked takes that step's argmax. `drafting` `[n]`: rows outside it
    (verified's paused rows) are not denoised at all (their positions 1.. stay the fill token)."""
    cfg = model.tt_config
    n, B = block.shape
    block = block.to(den_dev)
    is_mask = torch.ones(n, B, dtype=torch.bool, device=den_dev)
    clean_first = cfg.token_shift or draft is not None
    if clean_first:
        is_mask[:, 0] = False
    if drafting is not None:
        is_mask &= drafting.to(den_dev)[:, None]
    maskable = float(B - (1 if cfg.token_shift else 0))
    fill = cfg.mask_token_id if cfg.mask_token_id is not None else pad
    block = block.masked_fill(is_mask, fill)
    dcache = rows.cache.to(den_dev)
    positions = dcache.next_pos[:, None] + torch.arange(B, device=den_dev)
    contexts = {n: DecodeContext(dcache, cfg, B)}  # per number of live rows (the live set only shrinks)
    if steps is not None:  # the block before the first denoiser step
        steps.append({"rows": rows.index.tolist(), "tokens": block.tolist(), "masked": is_mask.tolist()})
    taken = 0
    sure = ~is_mask  # [n, B] positions not guessed: the clean first token, then every commit at >= γ
    while bool(is_mask.any()):
        live = is_mask.any(1).nonzero().squeeze(1)  # rows whose draft is complete sit this step out
        sub = live if live.shape[0] < n else None
        if sub is not None and live.shape[0] not in contexts:
            contexts[live.shape[0]] = DecodeContext(dcache.select(sub), cfg, B)
        ctx = contexts[live.shape[0]]
        lb, lm = (block, is_mask) if sub is None else (block[sub], is_mask[sub])
        t = lm.sum(1).float() / maskable
        logits = model.denoiser(lb, lm, t, positions if sub is None else positions[sub], ctx)
        tally.count("den", rows.index[live.to(rows.index.device)])
        taken += 1
        probs = torch.softmax(prediction_logits(logits, cfg.token_shift).double(), dim=-1)  # float64
        conf, tok = probs.max(-1)
        conf = conf.masked_fill(~lm, -1.0)
        confident = lm & (conf >= gamma)
        commit = confident.clone()
        if draft in ("confident", "prefix"):  # a row with nothing at γ stops here: its draft is the argmax
            commit |= lm & ~commit.any(1, keepdim=True)
        best = conf.argmax(1)
        here = torch.arange(lm.shape[0], device=den_dev)
        commit[here, best] |= lm[here, best]
        if isinstance(draft, int) and taken >= draft:
            commit = lm
        lb = torch.where(commit, tok, lb)
        sure = sure | confident if sub is None else sure.index_copy(0, sub, sure[sub] | confident)
        lm = lm & ~commit
        # positions after a committed EOS are padding: stop denoising them
        after = _after_eos(lb, ~lm, eos)
        lb = lb.masked_fill(after & lm, pad)
        lm = lm & ~after
        if sub is None:
            block, is_mask = lb, lm
        else:
            block, is_mask = block.index_copy(0, sub, lb), is_mask.index_copy(0, sub, lm)
        if steps is not None:
            steps.append({"rows": rows.index.tolist(), "tokens": block.tolist(), "masked": is_mask.tolist()})
    return block, sure


def _through_first_guess(block: torch.Tensor, sure: torch.Tensor, drafting: torch.Tensor) -> torch.Tensor:
    """`verified` with draft "prefix": the block cut after the last column any row needs, a row
    needing its positions up to and including its first guess (a position committed below γ):
    what follows a guess is rarely accepted, and a shorter verification forward costs less. A
    paused row (not drafting) needs its first position only."""
    B = block.shape[1]
    guess = ~sure
    first = torch.where(guess.any(1), guess.long().argmax(1), B - 1)
    need = torch.where(drafting.to(block.device), first + 1, 1)
    return block[:, : int(need.max())]


def _through_eos(block: torch.Tensor, eos: int | None) -> torch.Tensor:
    """The block cut after the last column any row needs: a draft's positions after its first EOS
    are padding, never kept, so verifying them is wasted (a short answer's one block is mostly
    padding)."""
    if eos is None:
        return block
    hit = block == eos
    need = torch.where(hit.any(1), hit.long().argmax(1) + 1, block.shape[1])
    return block[:, : int(need.max())]


def verify_block(model, block, rows, ctx_options, tally, steps) -> torch.Tensor:
    """The block commit as verification: keep each row's longest draft prefix equal to the context
    tower's greedy tokens (position 0, the context tower's own token, always), roll the cache back
    to it and set `rows.first` to the context tower's token after it. Returns `[n]` tokens kept."""
    walk = model.context_walk
    B = block.shape[1]
    rollback: dict = {}  # Mamba-2: what gives each sublayer's states at any accepted length
    hidden, extended = exact_forward(walk, block, rows.cache, chunk=B, rollback=rollback, **ctx_options)
    tally.count("ctx", rows.index)
    greedy = walk.logits(hidden).argmax(-1)  # [n, B]: the context tower's token after each position
    agree = (block[:, 1:] == greedy[:, :-1]).long().cumprod(1)
    accepted = 1 + agree.sum(1)  # [n] in 1..B
    here = torch.arange(block.shape[0], device=block.device)
    conv, ssm = rollback_states(rollback, accepted)
    rows.cache = settle(walk, rows.cache, block, accepted, extended.drop_last(B - accepted, conv, ssm), chunk=B,
                        **ctx_options)  # longrope: a row rolled back before its table switch
    rows.first = greedy[here, accepted - 1]
    tally.verify_rows += block.shape[0]
    tally.accepted += int(accepted.sum())
    if steps is not None:
        steps[-1] = {**steps[-1], "accepted": accepted.tolist(), "correction": rows.first.tolist()}
    return accepted


def _mock_ar_block(model, block, rows, B, tally):
    """Fill positions 1..B-1 left to right with single-token greedy context forwards on a scratch
    cache (the real cache is extended by the block commit afterwards, so the scratch keeps nothing
    for the denoiser)."""
    walk = model.context_walk
    scratch = rows.cache
    token = block[:, 0]
    for j in range(1, B):
        hidden, scratch = exact_forward(walk, token[:, None], scratch, chunk=B)
        tally.count("ctx", rows.index)
        token = walk.logits(hidden[:, -1]).argmax(-1)
        block[:, j] = token
    return block
