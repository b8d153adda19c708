"""`generate`: the one decoding entry point (`diffusion`, `verified`, `mock_ar`, `ar`, `auto`), batched.

It checks the call, packs the prompts (left-padded), prefills the context tower, resolves `auto`
to a mode by batch size from a measured table (`auto_modes`: the fastest mode that met the recipe's
quality target at each measured batch size; a batch between two measured sizes takes the smaller
one's mode, one beyond the largest the largest's) and hands the rows to that mode's unit
(`twotower.decoding.DECODERS`, where the modes are described). Rows come back in their order;
positions after a row's EOS are `pad_token_id`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from twotower.cache import TowerCache
from twotower.decoding import DECODERS, DRAFTS, Decoding
from twotower.positions import pad_id_of
from twotower.rows import Rows, Tally
from twotower.streaming import as_row_streamer
from twotower.walk import context_forward

MODES = ("diffusion", "verified", "mock_ar", "ar", "auto")
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


def _check_length(lengths: torch.Tensor, limit: int | None, what: str = "prompt") -> None:
    if limit is not None and int(lengths.max()) > limit:
        raise ValueError(f"generate: {what} of {int(lengths.max())} tokens exceeds the backbone's "
                         f"max_position_embeddings={limit}")


def _prefill(model, ids, valid, B: int, ctx_options: dict):
    """The context tower over packed prompts: each row's next token and the cache. Both a call's
    prompts and the ones that join it mid-call come here."""
    walk = model.context_walk
    hidden, cache = context_forward(walk, ids, TowerCache.empty(ids.shape[0], ids.device), valid=valid, chunk=B,
                                    **ctx_options)
    return walk.logits(hidden[:, -1]).argmax(-1), cache


def _join(model, admit, rows: Rows, tally: Tally, prompts: list, pad: int, limit, B: int, ctx_options: dict) -> None:
    """Ask `admit` for prompts and add them to the running batch: packed, prefilled on their own,
    their caches joined to the batch's (`TowerCache.join`)."""
    new = admit(int(rows.index.shape[0]), len(rows.out))
    if not new:
        return
    ids, valid, lengths = _pack_prompts(new, None, pad, rows.first.device)
    _check_length(lengths, limit, "an admitted prompt")
    first, cache = _prefill(model, ids, valid, B, ctx_options)
    tally.grow(ids.shape[0])
    tally.count("ctx", rows.admit(first, cache))
    prompts.extend(r[v] for r, v in zip(ids, valid))


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
    streamer=None,
    admit=None,
    pick=None,
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
    says which mode ran. streamer: receives tokens as blocks commit (`twotower.streaming`: a
    `RowStreamer` for any batch, which may end rows early, or a transformers `TextStreamer` for one
    prompt). admit (continuous batching): called between forwards as `admit(active, next_row)` (rows
    still decoding; the index the first new row gets) and returns prompts (id lists) to join the batch
    now, or nothing; they are prefilled on their own and decode in the running mode, as rows
    `next_row`, `next_row + 1`, ... of the streamer and the result (their budget is max_new_tokens
    too: a server ends each row at its own through the streamer). pick (`auto` only): the mode chosen
    block by block instead of once: called at every block boundary with the rows decoding then, it
    returns "diffusion", "verified", "mock_ar" or "ar" for that block (a batch that grows by `admit`
    and shrinks as rows end changes mode as the table says); the result's `mode` is then "auto"."""
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
    if pick is not None and mode != "auto":
        raise ValueError(f"generate: pick chooses the mode of each block for mode='auto', not {mode!r}")
    if mode == "auto" and pick is None:
        mode = auto_mode(auto_modes if auto_modes is not None else getattr(model, "auto_modes", None), ids.shape[0])
    limit = model.adapter.max_positions(bcfg)
    _check_length(lengths, limit)
    streamer = as_row_streamer(streamer, ids)
    b = ids.shape[0]
    ctx_options = model.context_options() if mode != "ar" else {"keep_hidden": False}
    tally = Tally(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long))
    first, cache = _prefill(model, ids, valid, B, ctx_options)
    rows = Rows(torch.arange(b, device=ctx_dev), first, cache, [[] for _ in range(b)])
    tally.count("ctx", rows.index)
    trace: list | None = [] if return_trace else None
    rows.streamer = streamer
    prompts = [r[v] for r, v in zip(ids, valid)]
    join = None if admit is None else partial(_join, model, admit, rows, tally, prompts, pad, limit, B, ctx_options)
    try:
        DECODERS[mode](Decoding(model, rows, tally, B, gamma, eos_token_id, pad, max_new_tokens, draft, ctx_options,
                                ctx_dev, den_dev, trace, join, pick))
    finally:
        if rows.streamer is not None:
            rows.streamer.end()
    if len(prompts) > b:  # rows joined: the result holds every row
        ids, _, lengths = _pack_prompts(prompts, None, pad, ctx_dev)
        b = ids.shape[0]

    n_gen = torch.tensor([len(seq) for seq in rows.out])
    gen = torch.full((b, int(n_gen.max())), pad, dtype=torch.long)
    for i, seq in enumerate(rows.out):
        gen[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return GenerateOutput(
        sequences=torch.cat([ids, gen.to(ids.device)], dim=1), num_denoiser_forwards=tally.den,
        num_context_forwards=tally.ctx, prompt_lengths=lengths, num_generated=n_gen, trace=trace,
        prompt_columns=ids.shape[1], row_forwards=tally.row_forwards, num_verify_rows=tally.verify_rows,
        num_accepted=tally.accepted, mode=mode, row_denoiser_forwards=tally.row_den)
