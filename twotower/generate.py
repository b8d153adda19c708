"""Decoding: `diffusion`, `mock_ar` and `ar`, batched, over one shared block loop and cache.

diffusion: prefill the context tower on the (left-padded) prompts; the greedy next token is
block position 0; positions 1..B-1 start masked. Each denoiser step scores every masked position
(max probability, in float64), commits all with confidence >= gamma and at least the most
confident one per sequence; t = fraction still masked. A full block is committed by ONE
context-tower forward over its B tokens, which also yields the next block's first token.
mock_ar: the same loop and caches, but positions 1..B-1 come from single-token context-tower
forwards on a scratch copy of the cache: equal to `ar` token for token (checks the block commit).
ar: the context tower alone, one token per forward.

EOS: per-sequence finished flags; everything after a sequence's EOS is `pad_token_id`; decoding
stops when all sequences are finished or `max_new_tokens` are produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower.cache import TowerCache
from twotower.denoiser import DecodeContext
from twotower.model import _pad_id, _prediction_logits
from twotower.walk import context_forward

MODES = ("diffusion", "mock_ar", "ar")


@dataclass
class GenerateOutput:
    """Result of `generate`."""

    sequences: torch.Tensor
    """`[batch, P + G]`: left-padded prompts then generated ids (pad after EOS)."""
    num_denoiser_forwards: int
    """Denoiser forwards run (each over one block of the whole batch)."""
    num_context_forwards: int
    """Context-tower forwards run (prefill included)."""
    prompt_lengths: torch.Tensor
    """`[batch]` real prompt lengths (the prompt occupies the last ones of the first P columns)."""
    num_generated: torch.Tensor
    """`[batch]` generated tokens per sequence up to and including EOS."""
    trace: list | None = None
    """With `return_trace`: per block, per step, `{"tokens": [...], "masked": [...]}` per sequence."""

    prompt_columns: int = 0
    """Width P of the left-padded prompt part of `sequences`."""

    @property
    def generated(self) -> torch.Tensor:
        """`[batch, G]` the generated columns."""
        return self.sequences[:, self.prompt_columns:]


def _pack_prompts(input_ids, attention_mask, pad_id: int, device):
    """Any prompt batch -> left-padded ids `[b, P]`, valid `[b, P]`, lengths `[b]`."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    if isinstance(input_ids, torch.Tensor):
        if attention_mask is None:
            rows = list(input_ids)
        else:
            rows = [r[m.bool()] for r, m in zip(input_ids, attention_mask)]
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in input_ids]
    if len(rows) == 0:
        raise ValueError("generate: empty batch of prompts")
    for i, r in enumerate(rows):
        if r.numel() == 0:
            raise ValueError(f"generate: prompt {i} is empty (need at least one token)")
    lengths = torch.tensor([r.numel() for r in rows])
    P = int(lengths.max())
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, P - r.numel():] = r.long().cpu()
        valid[i, P - r.numel():] = True
    return ids.to(device), valid.to(device), lengths


def _after_eos(block: torch.Tensor, committed: torch.Tensor, eos: int | None) -> torch.Tensor:
    """`[b, B]` bool: positions after the first committed EOS of each row."""
    if eos is None:
        return torch.zeros_like(committed)
    hit = (block == eos) & committed
    return (hit.long().cumsum(1) - hit.long()) > 0


@torch.no_grad()
def generate(
    model,
    input_ids,
    *,
    mode: str = "diffusion",
    gamma: float = 0.8,
    max_new_tokens: int = 64,
    block_size: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    return_trace: bool = False,
) -> GenerateOutput:
    """Generate from a batch of prompts (a `[b, P]` tensor, optionally with `attention_mask`,
    or a list of id lists of different lengths). eos/pad ids default to the backbone config."""
    cfg = model.tt_config
    B = block_size or cfg.block_size
    if mode not in MODES:
        raise ValueError(f"generate: mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
        raise ValueError(f"generate: gamma must be in (0, 1], got {gamma!r}")
    if B < 2:
        raise ValueError(f"generate: block_size must be >= 2, got {B}")
    if cfg.block_position_embedding and B > cfg.block_size:
        raise ValueError(f"generate: block_size {B} exceeds the trained block size {cfg.block_size}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    bcfg = model.context_tower.config
    if eos_token_id is None:
        eos = getattr(bcfg, "eos_token_id", None)
        eos_token_id = eos[0] if isinstance(eos, list) else eos
    pad = _pad_id(bcfg) if pad_token_id is None else pad_token_id
    ctx_dev = next(model.context_tower.parameters()).device
    den_dev = next(model.denoiser.parameters()).device
    ids, valid, lengths = _pack_prompts(input_ids, attention_mask, pad, ctx_dev)
    limit = model.adapter.max_positions(bcfg)
    if limit is not None and int(lengths.max()) > limit:
        raise ValueError(f"generate: prompt of {int(lengths.max())} tokens exceeds the backbone's "
                         f"max_position_embeddings={limit}")
    walk = model.context_walk
    b = ids.shape[0]
    keep_hidden = cfg.cross_attention
    hidden, cache = context_forward(walk, ids, TowerCache.empty(b, ctx_dev), valid=valid, chunk=B,
                                    keep_hidden=keep_hidden)
    state = {"ctx": 1, "den": 0}
    first = walk.logits(hidden[:, -1]).argmax(-1)
    finished = torch.zeros(b, dtype=torch.bool, device=ctx_dev)
    trace: list | None = [] if return_trace else None
    columns: list[torch.Tensor] = []

    if mode == "ar":
        token = first
        for step in range(max_new_tokens):
            token = torch.where(finished, torch.full_like(token, pad), token)
            columns.append(token[:, None])
            if eos_token_id is not None:
                finished |= token == eos_token_id
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            hidden, cache = context_forward(walk, token[:, None], cache, chunk=B, keep_hidden=keep_hidden)
            state["ctx"] += 1
            token = walk.logits(hidden[:, -1]).argmax(-1)
    else:
        produced = 0
        while True:
            block = torch.full((b, B), pad, dtype=torch.long, device=ctx_dev)
            block[:, 0] = first
            steps: list | None = [] if trace is not None else None
            if mode == "diffusion":
                block = _denoise_block(model, block, finished, cache, gamma, eos_token_id, pad, den_dev, state, steps)
            else:
                block = _mock_ar_block(model, block, finished, cache, B, keep_hidden, state)
            block = block.to(ctx_dev)
            committed = torch.ones_like(block, dtype=torch.bool)
            block = block.masked_fill(_after_eos(block, committed, eos_token_id) | finished[:, None], pad)
            if eos_token_id is not None:
                finished |= (block == eos_token_id).any(1)
            columns.append(block)
            if trace is not None:
                trace.append(steps)
            produced += B
            if bool(finished.all()) or produced >= max_new_tokens:
                break
            hidden, cache = context_forward(walk, block, cache, chunk=B, keep_hidden=keep_hidden)
            state["ctx"] += 1
            first = walk.logits(hidden[:, -1]).argmax(-1)

    gen = torch.cat(columns, dim=1)[:, :max_new_tokens]
    if eos_token_id is not None:
        is_eos = gen == eos_token_id
        has = is_eos.any(1)
        n_gen = torch.where(has, is_eos.float().argmax(1) + 1, torch.full_like(has, gen.shape[1], dtype=torch.long))
    else:
        n_gen = torch.full((b,), gen.shape[1], dtype=torch.long, device=gen.device)
    gen = gen[:, : int(n_gen.max())]
    return GenerateOutput(torch.cat([ids, gen], dim=1), state["den"], state["ctx"], lengths, n_gen.cpu(),
                          trace, ids.shape[1])


def _denoise_block(model, block, finished, cache, gamma, eos, pad, den_dev, state, steps):
    """Fill positions 1..B-1 (0..B-1 without token shift) by confidence-thresholded denoising."""
    cfg = model.tt_config
    b, B = block.shape
    block = block.to(den_dev)
    is_mask = torch.ones(b, B, dtype=torch.bool, device=den_dev)
    if cfg.token_shift:
        is_mask[:, 0] = False
    is_mask &= ~finished.to(den_dev)[:, None]
    maskable = float(is_mask.shape[1] - (1 if cfg.token_shift else 0))
    fill = cfg.mask_token_id if cfg.mask_token_id is not None else pad
    block = block.masked_fill(is_mask, fill)
    dcache = cache.to(den_dev)
    positions = dcache.next_pos[:, None] + torch.arange(B, device=den_dev)
    ctx = DecodeContext(dcache, cfg, B)
    rows = torch.arange(b, device=den_dev)
    if steps is not None:  # the block before the first denoiser step
        steps.append({"tokens": block.tolist(), "masked": is_mask.tolist()})
    while bool(is_mask.any()):
        t = is_mask.sum(1).float() / maskable
        logits = model.denoiser(block, is_mask, t, positions, ctx)
        state["den"] += 1
        probs = torch.softmax(_prediction_logits(logits, cfg.token_shift).double(), dim=-1)  # float64
        conf, tok = probs.max(-1)
        conf = conf.masked_fill(~is_mask, -1.0)
        commit = is_mask & (conf >= gamma)
        best = conf.argmax(1)
        commit[rows, best] |= is_mask[rows, best]
        block = torch.where(commit, tok, block)
        is_mask = is_mask & ~commit
        # positions after a committed EOS are padding: stop denoising them
        after = _after_eos(block, ~is_mask, eos)
        block = block.masked_fill(after & is_mask, pad)
        is_mask = is_mask & ~after
        if steps is not None:
            steps.append({"tokens": block.tolist(), "masked": is_mask.tolist()})
    return block


def _mock_ar_block(model, block, finished, cache, B, keep_hidden, state):
    """Fill positions 1..B-1 left to right with single-token greedy context forwards on a scratch
    cache (the real cache is extended by the block commit afterwards)."""
    walk = model.context_walk
    scratch = cache
    token = block[:, 0]
    for j in range(1, B):
        hidden, scratch = context_forward(walk, token[:, None], scratch, chunk=B, keep_hidden=keep_hidden)
        state["ctx"] += 1
        token = walk.logits(hidden[:, -1]).argmax(-1)
        block[:, j] = token
    return block
