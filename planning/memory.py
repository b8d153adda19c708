"""Memory and weight-traffic plans for decoding: arithmetic on a backbone's parameter counts and
family facts (`twotower.sizing`), no weights, no GPU.

What `python -m pipeline plan` prints and `docs/scaling.md` cites, and what the `duplicate_backbone`
stage reports. Units: parameters are integers, memory is GiB (2**30 bytes), the unit in which the
published "about 59 GB per tower in BF16" is stated (31.58e9 params x 2 bytes = 58.8 GiB).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the counts' types only: importing this module stays free of torch (`validate`)
    from twotower.sizing import FamilyFacts, ParamCounts

GIB = 2**30

DEFAULT_GPU_GIB = 80.0
"""Accelerator memory assumed when a caller does not say: one 80 GB H100 / A100, the card the
shipped Nano recipe is sized for. The one place this default lives (plan and the backbone stage use it)."""
BF16_BYTES = 2
FP32_BYTES = 4


def formula_new_parameters(facts: FamilyFacts, *, block_size: int, time_embed_dim: int = 128) -> dict[str, int]:
    """New parameters from the family facts alone, for when the runtime cannot be built (default
    `TwoTowerConfig`: no extra cross-attention modules).

    AdaLN-zero: a time MLP (two time_embed_dim x time_embed_dim linears) and one linear from the
    time embedding to every sublayer's shift, scale and gate (n_sublayers x 3 x hidden outputs).
    Embeddings: one [MASK] row and a B x hidden in-block position table. Layer-aligned attention
    to the context K/V and seeded Mamba states add no parameters.
    """
    d, n, t = facts.hidden_size, len(facts.sublayer_kinds), int(time_embed_dim)
    adaln = 2 * (t * t + t) + (t * n * 3 * d + n * 3 * d)
    emb = d + block_size * d
    return {"adaln": adaln, "cross_attention": 0, "embeddings": emb, "other": 0, "total": adaln + emb}


# --- cache shapes -----------------------------------------------------------------------------


def kv_bytes_per_token(facts: FamilyFacts, dtype_bytes: int = BF16_BYTES) -> int:
    """Bytes of attention K/V cache one token adds (all attention sublayers)."""
    return facts.kv_elems_per_token * dtype_bytes


def mamba_state_bytes(facts: FamilyFacts) -> int:
    """Bytes of Mamba-2 state of one sequence: SSM states in float32 (as the runtime keeps them)
    plus the conv windows in bf16."""
    return facts.ssm_state_elems * FP32_BYTES + facts.conv_state_elems * BF16_BYTES


# --- memory plans -----------------------------------------------------------------------------


def decode_memory(
    context_params: int, denoiser_params: int, facts: FamilyFacts, *, batch: int, context_len: int, block_size: int
) -> dict:
    """BF16 memory per device for decoding: diffusion (one tower per device) and AR-only.

    The context device holds its tower and its caches; the denoiser device holds its tower and a
    mirror of what crosses per block: the block's new context K/V, the Mamba states at the block's
    start and the committed tokens (`per_block_transfer_bytes`).
    """
    kv = kv_bytes_per_token(facts) * batch * context_len
    states = mamba_state_bytes(facts) * batch
    ctx_w = context_params * BF16_BYTES
    den_w = denoiser_params * BF16_BYTES
    transfer = kv_bytes_per_token(facts) * batch * block_size + states + batch * block_size * 8
    return {
        "batch": batch,
        "context_len": context_len,
        "diffusion": {
            "context_device_gib": (ctx_w + kv + states) / GIB,
            "denoiser_device_gib": (den_w + kv + states) / GIB,
            "context_weights_gib": ctx_w / GIB,
            "denoiser_weights_gib": den_w / GIB,
            "devices": 2,
        },
        "ar_only": {"device_gib": (ctx_w + kv + states) / GIB, "devices": 1},
        "kv_cache_gib": kv / GIB,
        "mamba_state_gib": states / GIB,
        "per_block_transfer_bytes": transfer,
    }


def expert_fraction_touched(facts: FamilyFacts, tokens: int) -> float:
    """Expected fraction of a MoE layer's routed experts that `tokens` tokens touch (uniform
    routing): 1 - (1 - k/E)^tokens. One token reads k/E of them; a block of 16 reads about half."""
    n_experts, top_k = facts.experts
    if not n_experts:
        return 1.0
    return 1.0 - (1.0 - top_k / n_experts) ** tokens


def weight_bytes_per_forward(counts: ParamCounts, facts: FamilyFacts, tokens: int, extra_params: int = 0) -> float:
    """BF16 weight bytes one forward over `tokens` tokens reads: every dense weight (the LM head
    included, the embedding table only by rows, neglected), the routed experts those tokens touch.
    Small-batch decoding is bound by this traffic, not by FLOPs."""
    dense = counts.total - counts.embeddings - counts.routed_experts + extra_params
    return BF16_BYTES * (dense + counts.routed_experts * expert_fraction_touched(facts, tokens))


def decode_traffic(counts: ParamCounts, facts: FamilyFacts, *, batch: int, block_size: int, new_params: int = 0,
                   denoiser: ParamCounts | None = None) -> dict:
    """Weight traffic of AR vs diffusion decoding of one block per sequence, memory-bound regime.

    AR: `block_size` forwards over `batch` tokens. Diffusion: s denoiser forwards over
    batch x block_size tokens plus one context forward over the same tokens (commit). On a MoE
    backbone a block forward touches many more experts than a one-token forward, so diffusion
    saves traffic only while s stays below `break_even_denoiser_steps`. `denoiser`: the denoiser
    tower's own counts (new modules included; a shallow one from `shallow_counts`), else the
    backbone's plus `new_params`.
    """
    ar = weight_bytes_per_forward(counts, facts, batch)
    block_ctx = weight_bytes_per_forward(counts, facts, batch * block_size)
    block_den = (weight_bytes_per_forward(counts, facts, batch * block_size, new_params) if denoiser is None
                 else weight_bytes_per_forward(denoiser, facts, batch * block_size))  # a shallow denoiser's own
    return {
        "batch": batch,
        "ar_forward_gib": ar / GIB,
        "ar_block_gib": block_size * ar / GIB,
        "denoiser_forward_gib": block_den / GIB,
        "context_commit_gib": block_ctx / GIB,
        "expert_fraction_ar": expert_fraction_touched(facts, batch),
        "expert_fraction_block": expert_fraction_touched(facts, batch * block_size),
        "break_even_denoiser_steps": (block_size * ar - block_ctx) / block_den,
    }


def shallow_counts(counts: ParamCounts, fraction: float, new_params: int = 0) -> ParamCounts:
    """A denoiser tower's counts when it keeps `fraction` of the backbone's layer parameters
    (`twotower.denoiser_layers`): embeddings and LM head whole, the layers' dense and routed
    parameters scaled, the new conditioning modules added (exact for the totals when `fraction` is
    measured on the built tower; proportional for the active count)."""
    from twotower.sizing import ParamCounts

    body = counts.total - counts.embeddings - counts.lm_head
    active_body = counts.active - counts.embeddings - counts.lm_head
    return ParamCounts(total=counts.embeddings + counts.lm_head + round(fraction * body) + new_params,
                       embeddings=counts.embeddings, lm_head=counts.lm_head,
                       routed_experts=round(fraction * counts.routed_experts),
                       active=counts.embeddings + counts.lm_head + round(fraction * active_body) + new_params)
