"""Parameter and memory accounting for a backbone and its two towers, without weights.

Everything here works on models built on the meta device (`build_on_meta`): shapes exist, storage
does not, so a 31.6 B-parameter Nemotron-3-Nano counts in a few seconds on a laptop. What depends
on the family (layer kinds, K/V heads, Mamba-2 state shapes, routed experts) is read through the
backbone's adapter into `FamilyFacts`, never from a family's config field names, so every
registered family is sized by the same code. The memory figures are arithmetic on those counts
and facts; they are what `python -m pipeline plan` prints and what `docs/scaling.md` cites.

Units: parameter counts are plain integers; memory is in GiB (2**30 bytes), the unit in which the
published "about 59 GB per tower in BF16" is stated (31.58e9 params x 2 bytes = 58.8 GiB).

    from twotower.sizing import build_on_meta, count_parameters, family_facts
    model = build_on_meta(config)
    counts = count_parameters(model, family_facts(model))
    counts.total, counts.active_without_embeddings
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

import adapters

GIB = 2**30
DEFAULT_GPU_GIB = 80.0
"""Accelerator memory assumed when a caller does not say: one 80 GB H100 / A100, the card the
shipped Nano recipe is sized for. The one place this default lives (plan and the backbone stage use it)."""
BF16_BYTES = 2
FP32_BYTES = 4



def build_on_meta(config) -> nn.Module:
    """The backbone's causal-LM module for `config`, on the meta device: shapes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one tower (a causal LM)."""

    total: int
    """Every parameter, embeddings and LM head included."""
    embeddings: int
    """The input embedding table (vocab x hidden)."""
    lm_head: int
    """The output projection (0 when tied to the input embeddings)."""
    routed_experts: int
    """Parameters in routed MoE experts (all experts, all layers)."""
    active: int
    """Parameters touched per token, input embedding table included (top-k of the routed experts)."""

    @property
    def total_without_embeddings(self) -> int:
        return self.total - self.embeddings

    @property
    def active_without_embeddings(self) -> int:
        return self.active - self.embeddings

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["total_without_embeddings"] = self.total_without_embeddings
        d["active_without_embeddings"] = self.active_without_embeddings
        return d


@dataclass(frozen=True)
class FamilyFacts:
    """What sizing needs to know of a backbone, read through its adapter (`family_facts`)."""

    model_type: str
    """The HF model_type."""
    hidden_size: int
    """Width d (the embedding table's columns)."""
    vocab_size: int
    """Rows of the embedding table."""
    num_layers: int
    """Backbone decoder layers (FSDP units, activation checkpoints)."""
    sublayer_kinds: tuple[str, ...]
    """The walk's sublayer kinds, in order (AdaLN has one row per sublayer)."""
    kv_elems_per_token: int
    """K and V elements one token adds over all attention sublayers (the runtime keeps every key,
    windowed sublayers included: windows are masks, not a trimmed cache)."""
    ssm_state_elems: int
    """Mamba-2 SSM state elements of one sequence over all mamba sublayers (kept in float32)."""
    conv_state_elems: int
    """Mamba-2 conv state elements (K-1 pre-convolution inputs) of one sequence, model dtype."""
    routed_expert_params: int
    """Parameters of all routed experts (all MoE sublayers)."""
    active_routed_params: int
    """Routed-expert parameters one token runs (top-k of E per MoE sublayer)."""
    experts: tuple[int, int]
    """(E routed experts, k per token) of the MoE sublayers; (0, 0) for a dense model."""


@torch.no_grad()
def family_facts(model: nn.Module) -> FamilyFacts:
    """Walk `model` (meta or real) with its adapter: K/V shapes from one probe token through the
    adapter's `qkv`, Mamba-2 state shapes from `Mamba2Params`, routed experts from `experts`."""
    adapter = adapters.get(model)
    subs = adapter.sublayers(model)
    emb = adapter.embedding_weight(model)
    vocab, d = emb.shape
    kv = ssm = conv = routed = active = 0
    shapes: set[tuple[int, int]] = set()
    for sub in subs:
        if sub.kind == "attention":
            x = torch.zeros(1, 1, d, dtype=emb.dtype, device=emb.device)
            _, k, v = adapter.qkv(model, sub, x, torch.zeros(1, 1, dtype=torch.long, device=emb.device))
            kv += k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3]
        elif sub.kind == "mamba":
            p = adapter.mamba(sub)
            ssm += p.num_heads * p.head_dim * p.state_size
            conv += p.conv1d.weight.shape[0] * (p.conv1d.weight.shape[-1] - 1)
        elif sub.kind == "moe":
            e = adapter.experts(sub)
            if not 0 < e.top_k <= e.count:
                raise ValueError(f"sublayer {sub.index}: top_k={e.top_k} must be in 1..{e.count} experts")
            n = sum(p.numel() for p in e.module.parameters())
            routed += n
            active += n * e.top_k // e.count
            shapes.add((e.count, e.top_k))
    if len(shapes) > 1:
        raise ValueError(f"{type(model).__name__}: MoE sublayers differ in (experts, top_k) {sorted(shapes)}; "
                         "expert traffic assumes one shape")
    return FamilyFacts(
        model_type=adapters.model_type_of(model), hidden_size=int(d), vocab_size=int(vocab),
        num_layers=len({s.layer for s in subs}), sublayer_kinds=tuple(s.kind for s in subs),
        kv_elems_per_token=kv, ssm_state_elems=ssm, conv_state_elems=conv,
        routed_expert_params=routed, active_routed_params=active, experts=next(iter(shapes), (0, 0)),
    )


def count_parameters(model: nn.Module, facts: FamilyFacts | None = None) -> ParamCounts:
    """Total and per-token-active parameter counts of a causal LM (meta or real)."""
    facts = facts or family_facts(model)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    # Each token runs top_k of n_experts routed experts; everything else it touches entirely.
    active = total - facts.routed_expert_params + facts.active_routed_params
    return ParamCounts(
        total=total,
        embeddings=emb.numel(),
        lm_head=0 if head is None or tied else head.weight.numel(),
        routed_experts=facts.routed_expert_params,
        active=active,
    )


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the largest decoder layer: the biggest unit FSDP gathers at once (every
    module the adapter's sublayers of that layer name)."""
    per_layer: dict[int, dict[int, int]] = {}
    for sub in adapters.get(model).sublayers(model):
        params = per_layer.setdefault(sub.layer, {})
        for module in (sub.norm, sub.mixer, sub.post_norm, *sub.parts):
            if module is not None:
                params.update({id(p): p.numel() for p in module.parameters()})
    return max(sum(p.values()) for p in per_layer.values())


# --- new parameters ---------------------------------------------------------------------------

_KIND_MARKERS = (
    ("adaln", ("adaln", "ada_ln", "time_embed", "timestep", "t_embed", "time_mlp", "modulation")),
    ("cross_attention", ("cross_attn", "xattn", "cross_attention")),
    ("embeddings", ("embed", "mask_token", "pos_emb", "position", "block_pos", "key_pos")),
)


def new_parameters_by_kind(denoiser: nn.Module, backbone: nn.Module) -> dict[str, int]:
    """Parameters the denoiser has beyond the backbone's, grouped by kind.

    A name absent from the backbone is new (classified by its name: AdaLN / time embedding,
    cross-attention, embeddings, else `other`); a name present with more elements (the embedding
    table grown by a [MASK] row) counts its extra elements under `embeddings`.
    """
    base = {n: p.numel() for n, p in backbone.named_parameters()}
    out = {"adaln": 0, "cross_attention": 0, "embeddings": 0, "other": 0}
    for name, p in denoiser.named_parameters():
        extra = p.numel() - base.get(_strip_wrapper(name, base), 0)
        if extra <= 0:
            continue
        out[_kind_of(name) if _strip_wrapper(name, base) not in base else "embeddings"] += extra
    out["total"] = sum(out.values())
    return out


def _kind_of(name: str) -> str:
    low = name.lower()
    for kind, markers in _KIND_MARKERS:
        if any(m in low for m in markers):
            return kind
    return "other"


def _strip_wrapper(name: str, base: dict[str, int]) -> str:
    """The backbone name a wrapped parameter keeps: the name itself, or it with leading prefixes
    (`backbone.`, `denoiser.`) or inner wrapper components (`.layer.`, `.inner.`) removed."""
    if name in base:
        return name
    parts = name.split(".")
    for start in range(1, len(parts)):
        if ".".join(parts[start:]) in base:
            return ".".join(parts[start:])
    for token in (".layer.", ".inner.", ".wrapped.", ".module."):
        cand = name.replace(token, ".")
        if cand in base:
            return cand
    return name


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


def layer_kinds(facts: FamilyFacts) -> dict[str, int]:
    """Count of sublayers per kind: attention / mamba / moe / mlp."""
    out = {"attention": 0, "mamba": 0, "moe": 0, "mlp": 0}
    for kind in facts.sublayer_kinds:
        out[kind] += 1
    return out


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


def params_read_per_forward(module: nn.Module, embedding: nn.Module | None) -> int:
    """Parameters one forward of `module` reads in full: everything but the input embedding table,
    of which a forward reads only its tokens' rows (a tied LM head still counts: it is read whole)."""
    table = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    head = set()
    for m in module.modules():
        if isinstance(m, nn.Linear) and any(id(p) in table for p in m.parameters()):
            head |= {id(p) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in table or id(p) in head)


def shallow_counts(counts: ParamCounts, fraction: float, new_params: int = 0) -> ParamCounts:
    """A denoiser tower's counts when it keeps `fraction` of the backbone's layer parameters
    (`twotower.denoiser_layers`): embeddings and LM head whole, the layers' dense and routed
    parameters scaled, the new conditioning modules added (exact for the totals when `fraction` is
    measured on the built tower; proportional for the active count)."""
    body = counts.total - counts.embeddings - counts.lm_head
    active_body = counts.active - counts.embeddings - counts.lm_head
    return ParamCounts(total=counts.embeddings + counts.lm_head + round(fraction * body) + new_params,
                       embeddings=counts.embeddings, lm_head=counts.lm_head,
                       routed_experts=round(fraction * counts.routed_experts),
                       active=counts.embeddings + counts.lm_head + round(fraction * active_body) + new_params)
