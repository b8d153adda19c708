"""Parameter accounting for a backbone and its two towers, without weights.

Everything here works on models built on the meta device (`build_on_meta`): shapes exist, storage
does not, so a 31.6 B-parameter Nemotron-3-Nano counts in a few seconds on a laptop. What depends
on the family (layer kinds, K/V heads, Mamba-2 state shapes, routed experts) is read through the
backbone's adapter into `FamilyFacts`, never from a family's config field names, so every
registered family is sized by the same code. Memory, traffic and
step-time plans are arithmetic on these counts and facts, and live outside the runtime in `planning/`.

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


# --- cache shapes -----------------------------------------------------------------------------


def layer_kinds(facts: FamilyFacts) -> dict[str, int]:
    """Count of sublayers per kind: attention / mamba / moe / mlp."""
    out = {"attention": 0, "mamba": 0, "moe": 0, "mlp": 0}
    for kind in facts.sublayer_kinds:
        out[kind] += 1
    return out


def params_read_per_forward(module: nn.Module, embedding: nn.Module | None) -> int:
    """Parameters one forward of `module` reads in full: everything but the input embedding table,
    of which a forward reads only its tokens' rows (a tied LM head still counts: it is read whole)."""
    table = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    head = set()
    for m in module.modules():
        if isinstance(m, nn.Linear) and any(id(p) in table for p in m.parameters()):
            head |= {id(p) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in table or id(p) in head)
