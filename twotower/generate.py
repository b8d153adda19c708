"""Decoding: `diffusion`, `verified`, `mock_ar` and `ar`, batched, over one shared block loop and cache.

diffusion: prefill the context tower on the (left-padded) prompts; the greedy next token is
block position 0; positions 1..B-1 start masked. Each denoiser step scores every masked position
(max probability, in float64), commits all with confidence >= gamma and at least the most
confident one per sequence; t = fraction still masked. A full block is committed by ONE
context-tower forward over its B tokens, which also yields the next block's first token.
verified: the block is drafted with the γ rule (`draft`: every step the rule takes; or until a
step where no position reaches γ; or at most k steps; what is left takes the last step's argmax);
the block commit is the verification. Its logits are the context tower's greedy choice at every block position, so the
longest draft prefix equal to them is kept, plus the context tower's own token at the first
disagreement (the standard greedy speculative-decoding rule): the output is `ar`'s, token for
token. The cache is rolled back to the accepted length (`TowerCache.drop_last`; Mamba-2 states
computed at the accepted length from the verification's own scan, `walk.rollback_states`).
mock_ar: the same loop and caches, but positions 1..B-1 come from single-token context-tower
forwards on a scratch copy of the cache: equal to `ar` token for token (checks the block commit).
ar: the context tower alone, one token per forward.
auto: one of the above per call, by batch size, from a measured table (`auto_modes`: the fastest
mode that met the recipe's quality target at each measured batch size; a batch between two
measured sizes takes the smaller one's mode, one beyond the largest the largest's).

Batching: a row leaves the batch as soon as it is finished (EOS or its `max_new_tokens`); batch
and caches are compacted and the rows put back in order at the end. Inside a block, a row whose
draft is complete takes no further part in its neighbours' denoiser steps. Positions after a
row's EOS are `pad_token_id`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from twotower.block_context import DecodeContext
from twotower.cache import TowerCache
from twotower.positions import pad_id_of, prediction_logits
from twotower.walk import context_forward, rollback_states

MODES = ("diffusion", "verified", "mock_ar", "ar", "auto")
MAX_BACKOFF = 8
"""Longest run of blocks a row verifies without a draft after its drafts kept nothing."""
DRAFTS = ("full", "confident", "prefix")
"""`verified`'s named draft policies (an int k is the third: at most k denoiser steps)."""
AUTO_CHOICES = ("diffusion", "verified", "ar")
"""The modes an `auto_modes` table may name."""


def auto_mode(table: dict[int, str] | None, batch: int) -> str:
    """The mode `auto` runs for `batch` rows: the table's entry at the largest measured batch size
    <= batch (the smallest measured one below it)."""
    if not table:
        raise ValueError("generate: mode 'auto' needs an auto_modes table (batch size -> mode): pass "
                         "auto_modes=..., or load an export whose generation_config.json has `auto_modes` "
                         "(written by calibrate_gamma's batch sweep)")
    sizes = sorted(table)
    below = [s for s in sizes if s <= batch]
    return table[below[-1] if below else sizes[0]]


@dataclass
class GenerateOutput:
    """Result of `generate`."""

    sequences: torch.Tensor
    """`[batch, P + G]`: left-padded prompts then generated ids (pad after EOS)."""
    num_denoiser_forwards: int
    """Denoiser forwards run (each over one block of the rows still drafting)."""
    num_context_forwards: int
    """Context-tower forwards run (prefill included)."""
    prompt_lengths: torch.Tensor
    """`[batch]` real prompt lengths (the prompt occupies the last ones of the first P columns)."""
    num_generated: torch.Tensor
    """`[batch]` generated tokens per sequence up to and including EOS."""
    trace: list | None = None
    """With `return_trace`: per block, per step, `{"rows": [...], "tokens": [...], "masked": [...]}`
    for the rows in the batch (original row indices); in `verified` the block's last entry also
    holds `"accepted"` (tokens kept per row, the context tower's first token included) and
    `"correction"` (the context tower's token after them)."""

    prompt_columns: int = 0
    """Width P of the left-padded prompt part of `sequences`."""
    row_forwards: torch.Tensor | None = None
    """`[batch]` model forwards (denoiser + context, prefill included) each row took part in."""
    num_verify_rows: int = 0
    """`verified`: row-blocks verified (one per row per verification forward)."""
    num_accepted: int = 0
    """`verified`: tokens those verifications committed (per row: accepted draft + the context
    tower's first token of the block)."""
    mode: str = ""
    """The mode that ran (for `auto`: the one its table picked)."""
    row_denoiser_forwards: torch.Tensor | None = None
    """`[batch]` denoiser forwards each row took part in (a batched call's per-row tokens per
    denoiser forward: a row that finished early or sat out steps is not charged for them)."""

    @property
    def generated(self) -> torch.Tensor:
        """`[batch, G]` the generated columns."""
        return self.sequences[:, self.prompt_columns:]

    @property
    def accepted_per_verify(self) -> float:
        """`verified`: tokens committed per row per verification forward (1..B)."""
        return self.num_accepted / max(1, self.num_verify_rows)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per model forward a row took part in, averaged over rows (`ar`: 1)."""
        if self.row_forwards is None:
            return float("nan")
        return float((self.num_generated.float() / self.row_forwards.clamp(min=1).float()).mean())


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



@dataclass
class _Tally:
    """Forward counts of one `generate` call."""

    row_forwards: torch.Tensor
    """`[batch]` forwards per original row."""
    row_den: torch.Tensor
    """`[batch]` denoiser forwards per original row."""
    den: int = 0
    ctx: int = 0
    verify_rows: int = 0
    accepted: int = 0

    def count(self, kind: str, rows: torch.Tensor) -> None:
        """One forward of `kind` ("den" / "ctx") over the original rows `rows`."""
        setattr(self, kind, getattr(self, kind) + 1)
        self.row_forwards[rows.cpu()] += 1
        if kind == "den":
            self.row_den[rows.cpu()] += 1


@dataclass
class _Rows:
    """The rows still decoding: their original indices, generated tokens so far, the context tower's
    next token, the cache and (verified) the draft backoff. `keep` drops finished rows from all of
    them at once."""

    index: torch.Tensor
    first: torch.Tensor
    cache: TowerCache
    out: list[list[int]] = field(default_factory=list)
    """Per ORIGINAL row, its generated tokens."""
    pause: torch.Tensor | None = None
    """`[n]` verified: blocks this row still verifies without a draft (after rejected drafts)."""
    backoff: torch.Tensor | None = None
    """`[n]` verified: the pause its next rejected draft starts (doubles per rejection)."""

    def __post_init__(self):
        self.pause = torch.zeros_like(self.index)
        self.backoff = torch.ones_like(self.index)

    def after_verify(self, drafted: torch.Tensor, accepted: torch.Tensor) -> None:
        """Backoff: a row whose draft lost at once (only the context tower's token kept) pauses
        drafting for `backoff` blocks, doubled each time up to `MAX_BACKOFF`; a draft that kept a
        token resets it. A paused block is a plain AR step when no row drafts, so a denoiser that is
        always wrong costs verified about AR's speed, not up to B forwards per token."""
        lost = drafted & (accepted <= 1)
        self.pause = torch.where(drafted, torch.where(lost, self.backoff, 0), (self.pause - 1).clamp(min=0))
        self.backoff = torch.where(lost, (self.backoff * 2).clamp(max=MAX_BACKOFF),
                                   torch.where(drafted, torch.ones_like(self.backoff), self.backoff))

    def emit(self, tokens: list[list[int]], eos: int | None, budget: int) -> torch.Tensor:
        """Append each active row's new tokens (cut at EOS and the budget); `[n]` bool: finished."""
        done = []
        for r, toks in zip(self.index.tolist(), tokens):
            seq = self.out[r]
            for tok in toks:
                if len(seq) >= budget:
                    break
                seq.append(tok)
                if tok == eos:
                    break
            done.append(len(seq) >= budget or (eos is not None and bool(seq) and seq[-1] == eos))
        return torch.tensor(done, device=self.first.device)

    def keep(self, alive: torch.Tensor) -> bool:
        """Compact to the rows where `alive`; False when none is left."""
        if not bool(alive.any()):
            return False
        if not bool(alive.all()):
            sel = alive.nonzero().squeeze(1)
            self.index, self.first = self.index[sel.to(self.index.device)], self.first[sel]
            self.pause, self.backoff = self.pause[sel], self.backoff[sel]
            self.cache = self.cache.select(sel)
        return True


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
    draft: str | int = "confident",
    auto_modes: dict[int, str] | None = None,
) -> GenerateOutput:
    """Generate from a batch of prompts (a `[b, P]` tensor, optionally with `attention_mask`,
    or a list of id lists of different lengths). eos/pad ids default to the backbone config.

    draft (`verified` only), the draft policy: "full" runs every denoiser step the γ rule needs
    (a step commits at least one position); "confident" stops a row at its first step where no
    position reaches γ (the forced one-per-step commits of an unsure denoiser are the ones
    verification rejects, at a forward each); "prefix" drafts as "confident" and verifies only up
    to each row's first guess (a position committed below γ), a shorter verification forward when
    the denoiser is unsure; k >= 1 runs at most k steps (1: one denoiser step, then verify). What
    is still masked when a row stops takes that step's argmax. auto_modes (`auto` only): batch
    size -> mode, default `model.auto_modes` (read from the export's generation_config.json); `mode` of the result
    says which mode ran."""
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
    if draft not in DRAFTS and (isinstance(draft, bool) or not isinstance(draft, int) or draft < 1):
        raise ValueError(f"generate: draft must be one of {DRAFTS} or an int >= 1, got {draft!r}")
    bcfg = model.context_tower.config
    if eos_token_id is None:
        eos = getattr(bcfg, "eos_token_id", None)
        eos_token_id = eos[0] if isinstance(eos, list) else eos
    pad = pad_id_of(bcfg) if pad_token_id is None else pad_token_id
    ctx_dev = next(model.context_tower.parameters()).device
    den_dev = next(model.denoiser.parameters()).device
    ids, valid, lengths = _pack_prompts(input_ids, attention_mask, pad, ctx_dev)
    if mode == "auto":
        mode = auto_mode(auto_modes if auto_modes is not None else getattr(model, "auto_modes", None), ids.shape[0])
    limit = model.adapter.max_positions(bcfg)
    if limit is not None and int(lengths.max()) > limit:
        raise ValueError(f"generate: prompt of {int(lengths.max())} tokens exceeds the backbone's "
                         f"max_position_embeddings={limit}")
    walk = model.context_walk
    b = ids.shape[0]
    ctx_options = model.context_options() if mode != "ar" else {"keep_hidden": False}
    tally = _Tally(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long))
    hidden, cache = context_forward(walk, ids, TowerCache.empty(b, ctx_dev), valid=valid, chunk=B, **ctx_options)
    rows = _Rows(torch.arange(b, device=ctx_dev), walk.logits(hidden[:, -1]).argmax(-1), cache,
                 [[] for _ in range(b)])
    tally.count("ctx", rows.index)
    trace: list | None = [] if return_trace else None

    if mode == "ar":
        while rows.keep(~rows.emit([[t] for t in rows.first.tolist()], eos_token_id, max_new_tokens)):
            hidden, rows.cache = context_forward(walk, rows.first[:, None], rows.cache, chunk=B, **ctx_options)
            tally.count("ctx", rows.index)
            rows.first = walk.logits(hidden[:, -1]).argmax(-1)
    else:
        while True:
            ended = rows.first == eos_token_id  # the context tower's own next token ends these rows
            if eos_token_id is not None and bool(ended.any()):
                done = rows.emit([[t] if e else [] for t, e in zip(rows.first.tolist(), ended.tolist())],
                                 eos_token_id, max_new_tokens)
                if not rows.keep(~done):
                    break
            block = torch.full((rows.index.shape[0], B), pad, dtype=torch.long, device=ctx_dev)
            block[:, 0] = rows.first
            steps: list | None = [] if trace is not None else None
            drafting = rows.pause == 0
            if mode == "mock_ar":
                block = _mock_ar_block(model, block, rows, B, tally)
            elif mode == "diffusion" or bool(drafting.any()):
                block, sure = _denoise_block(model, block, rows, gamma, eos_token_id, pad, den_dev, tally, steps,
                                             draft=draft if mode == "verified" else None,
                                             drafting=drafting if mode == "verified" else None)
                block = block.to(ctx_dev)
                if mode == "verified" and draft == "prefix":
                    block = _through_first_guess(block, sure.to(ctx_dev), drafting)
            else:  # verified, every row paused: one AR step
                block = block[:, :1]
                if steps is not None:
                    steps.append({"rows": rows.index.tolist(), "tokens": block.tolist(),
                                  "masked": [[False]] * block.shape[0]})
            if mode == "verified":
                block = _through_eos(block, eos_token_id)
                accepted = _verify_block(model, block, rows, ctx_options, tally, steps)
                rows.after_verify(drafting, accepted)
                tokens = [r[:a] for r, a in zip(block.tolist(), accepted.tolist())]
            else:
                tokens = block.tolist()
            if trace is not None:
                trace.append(steps)
            alive = ~rows.emit(tokens, eos_token_id, max_new_tokens)
            if not rows.keep(alive):
                break
            if mode != "verified":  # commit the block: one context forward, the next block's first token
                hidden, rows.cache = context_forward(walk, block[alive], rows.cache, chunk=B, **ctx_options)
                tally.count("ctx", rows.index)
                rows.first = walk.logits(hidden[:, -1]).argmax(-1)

    n_gen = torch.tensor([len(seq) for seq in rows.out])
    gen = torch.full((b, int(n_gen.max())), pad, dtype=torch.long)
    for i, seq in enumerate(rows.out):
        gen[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return GenerateOutput(torch.cat([ids, gen.to(ids.device)], dim=1), tally.den, tally.ctx, lengths, n_gen, trace,
                          ids.shape[1], tally.row_forwards, tally.verify_rows, tally.accepted, mode,
                          tally.row_den)


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


def _verify_block(model, block, rows, ctx_options, tally, steps) -> torch.Tensor:
    """The block commit as verification: keep each row's longest draft prefix equal to the context
    tower's greedy tokens (position 0, the context tower's own token, always), roll the cache back
    to it and set `rows.first` to the context tower's token after it. Returns `[n]` tokens kept."""
    walk = model.context_walk
    B = block.shape[1]
    rollback: dict = {}  # Mamba-2: what gives each sublayer's states at any accepted length
    hidden, extended = context_forward(walk, block, rows.cache, chunk=B, rollback=rollback, **ctx_options)
    tally.count("ctx", rows.index)
    greedy = walk.logits(hidden).argmax(-1)  # [n, B]: the context tower's token after each position
    agree = (block[:, 1:] == greedy[:, :-1]).long().cumprod(1)
    accepted = 1 + agree.sum(1)  # [n] in 1..B
    here = torch.arange(block.shape[0], device=block.device)
    conv, ssm = rollback_states(rollback, accepted)
    rows.cache = extended.drop_last(B - accepted, conv, ssm)
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
        hidden, scratch = context_forward(walk, token[:, None], scratch, chunk=B)
        tally.count("ctx", rows.index)
        token = walk.logits(hidden[:, -1]).argmax(-1)
        block[:, j] = token
    return block
