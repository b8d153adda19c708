"""The adapter contract: how the twotower runtime walks one backbone family.

The runtime never calls a backbone's own `forward`. It walks a flat list of *sublayers*, each a
residual step `h = h + residual_scale · post_norm(mixer(norm(h)))` of one kind (`attention`,
`mamba`, `moe`, `mlp`), and asks the adapter for the few family-specific primitives it composes
(q/k/v with RoPE, the Mamba-2 mixer parameters, a call of the MLP/MoE mixer). A Nemotron-H layer
is one sublayer; a Llama or Gemma 3 decoder layer is two (attention, then mlp). The runtime owns
masks (causal, padding, sliding windows), caches, the residual arithmetic and the AdaLN hook, so
the context tower, the denoiser and every decoding mode share one code path (`twotower.walk`).

A new family: write a module with a subclass of `Adapter` (only what differs from the defaults),
add one line to `adapters.REGISTRY`, and one tiny config to `tests/twotower_fixtures.py`
(see docs/adapters.md).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adapters.rotary import POSITION_DEPENDENT_ROPE, STATIC_ROPE, rope_type


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The second half of the last dim, negated, then the first half (the rotary pairing)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary position embedding of q/k `[N, H, T, d]` with cos/sin `[N, T, d]`: the same ops, in
    the same order, as transformers' Llama and Gemma 3 `apply_rotary_pos_emb` (bit-identical).
    Kept here so that importing an adapter loads no transformers modeling module: those import the
    Auto classes, whose import registers `twotower.model`, a circular import when a twotower module
    is the first thing imported."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary = cos.shape[-1]
    if rotary < q.shape[-1]:  # partial rotary (Phi-3's `partial_rotary_factor`): the rest passes through
        q_rot, q_pass = q[..., :rotary], q[..., rotary:]
        k_rot, k_pass = k[..., :rotary], k[..., rotary:]
        return (torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1),
                torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1))
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def check_rope_scaling(config, exact_position_rope: bool = True) -> None:
    """ValueError naming the field and its value when the config's RoPE scaling is one the runtime
    cannot reproduce exactly: a type it does not know, or a length-dependent one (`longrope`,
    `dynamic`) for a family whose adapter does not compute rotary through `adapters.rotary`
    (`exact_position_rope`) or that names it per layer type."""
    field, kind = rope_type(config)
    if kind is None or kind in STATIC_ROPE:
        return
    if kind in POSITION_DEPENDENT_ROPE and exact_position_rope and "." not in field:
        return
    why = ("rescales the rotary table by sequence length, which this family's adapter does not follow"
           if kind in POSITION_DEPENDENT_ROPE else "is not a RoPE type the runtime knows")
    raise ValueError(f"{config.model_type}: config.{field}.rope_type={kind!r} {why}; supported: "
                     f"{', '.join(STATIC_ROPE)} (static tables) and, in adapters using adapters.rotary, "
                     f"{', '.join(POSITION_DEPENDENT_ROPE)}")


KINDS = ("attention", "mamba", "moe", "mlp")


@dataclass(frozen=True)
class Sublayer:
    """One residual step of the layer walk: `h = h + residual_scale · post_norm(mixer(norm(h)))`."""

    index: int
    """Position in the flat walk (0..n_sublayers-1): the key of caches and AdaLN rows."""
    layer: int
    """Index of the backbone decoder layer this sublayer belongs to."""
    kind: str
    """One of `KINDS`."""
    norm: nn.Module
    """The input norm; AdaLN modulates its output."""
    mixer: nn.Module
    """The HF module the adapter's primitives read (attention, Mamba-2 mixer, MLP or MoE). For
    `mlp`/`moe` its forward must be what `Adapter.ffn` calls (FSDP wraps it as a unit)."""
    window: int | None = None
    """Attention only: sliding window W. A query at position p sees a key at position k only when
    p - k < W (HF's `kv_idx > q_idx - W`), counted by position ids, so left pads change nothing.
    None: the full causal context."""
    post_norm: nn.Module | None = None
    """A norm applied to the mixer output before the residual add (Gemma's sandwich norms)."""
    residual_scale: float = 1.0
    """Multiplier of the residual branch (Granite's `residual_multiplier`), after `post_norm`."""
    logit_softcap: float | None = None
    """Attention only: scores become `cap · tanh(scores / cap)` before the mask and softmax."""
    parts: tuple[nn.Module, ...] = ()
    """Further HF modules the adapter's `ffn` calls beside `mixer` (e.g. a shared MLP)."""
    parallel: bool = False
    """A parallel residual step: it reads the *same input* as the sublayer before it and adds its
    output to the same residual, `h + f_prev(norm(h)) + f(norm(h))` (Phi-1/2's attention and MLP,
    GPT-J, Falcon-H1's attention beside Mamba-2), rather than running on the predecessor's output."""


@dataclass(frozen=True)
class Mamba2Params:
    """What the shared torch Mamba-2 (SSD) implementation in `twotower.ops` needs from a mixer."""

    in_proj: Callable[[torch.Tensor], torch.Tensor]
    """hidden -> [gate (I), xBC (I + 2·G·N), dt (H)]: the mixer's `nn.Linear`, or any callable
    (a family that scales the projection's parts, e.g. µP multipliers, passes a function)."""
    conv1d: nn.Conv1d
    """Depthwise causal convolution over xBC, kernel K."""
    dt_bias: torch.Tensor
    """[H]."""
    A_log: torch.Tensor
    """[H]; A = -exp(A_log)."""
    D: torch.Tensor
    """[H] skip connection."""
    norm: nn.Module
    """Gated RMSNorm called as `norm(y, gate)`."""
    out_proj: nn.Linear
    """I -> hidden."""
    num_heads: int
    """H."""
    head_dim: int
    """P (I = H·P)."""
    n_groups: int
    """G."""
    state_size: int
    """N."""
    dt_min: float
    """dt is clamped to [dt_min, dt_max] on every path (HF clamps only its chunk path: a trap)."""
    activation: str
    """Activation after the convolution (`silu`)."""
    dt_max: float = float("inf")
    """The upper bound of the dt clamp (`time_step_limit[1]`; infinite unless the family sets one)."""


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q_proj`/`k_proj`/`v_proj` of an HF attention module on x `[N, T, d]` -> q `[N, H, T, hd]`,
    k, v `[N, Hkv, T, hd]`, with its per-head `q_norm`/`k_norm` when it has them (Qwen3, Gemma 3;
    before any RoPE, as HF applies them)."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


@dataclass(frozen=True)
class Experts:
    """The routed experts of one `moe` sublayer, for parameter and traffic accounting."""

    module: nn.Module
    """Holds every routed expert's weights and nothing else (a shared expert is not routed)."""
    count: int
    """Routed experts E."""
    top_k: int
    """Experts each token runs."""


class Adapter:
    """A backbone family's layer walk. Stateless; every method gets the HF model it reads.

    Subclass it and override what your family does differently: `sublayers` always, `qkv` for a
    family with attention, `mamba` and `experts` for hybrids and MoE. The defaults follow the
    usual HF layout (`model.get_input_embeddings()`, `model.model.norm`, `lm_head`, a mixer with
    `scaling` and `o_proj`, an MLP/MoE called as a module).
    """

    model_types: tuple[str, ...] = ()
    exact_position_rope: bool = False
    """True when `qkv` takes its cos/sin from `adapters.rotary.rotary` (exact for `longrope` and
    `dynamic`); `adapters.get` refuses those RoPE types for the other families."""
    scale_fields: tuple[str, ...] = ()
    """Module attributes holding multipliers the adapter applies inside its own code (Falcon-H1's
    `key_multiplier`, `mup_vector`, ...), which no sublayer field shows: the conformance kit resets
    each to 1 and requires the walk to move off transformers' logits, so none can be forgotten."""

    def sublayers(self, model: nn.Module) -> list[Sublayer]:
        """The ordered residual steps of `model` (a `*ForCausalLM`)."""
        raise NotImplementedError(f"{type(self).__name__}.sublayers")

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """What enters the first layer, `[batch, T, d]`: the *scaled* embedding, equal to
        `embedding_weight(model)[ids] · embedding_scale(model)` up to rounding."""
        return model.get_input_embeddings()(input_ids)

    def embedding_weight(self, model: nn.Module) -> torch.Tensor:
        """The raw input embedding table `[vocab, d]` (a parameter: never scaled)."""
        return model.get_input_embeddings().weight

    def embedding_scale(self, model: nn.Module) -> float:
        """The factor `embed` applies to rows of `embedding_weight` (Gemma √d, Granite's
        `embedding_multiplier`). The denoiser's [MASK] embedding is seeded with the mean raw row
        times this, so it lives where `embed`'s outputs live."""
        return 1.0

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied before the LM head."""
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        """hidden -> vocabulary logits (before `logits`' family transforms). Called once per
        forward: an attribute read (HF's `get_output_embeddings()` costs ~30 µs on CPU)."""
        head = getattr(model, "lm_head", None)
        return head if head is not None else model.get_output_embeddings()

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden -> logits as the HF model returns them (final soft-capping, logit
        scaling...)."""
        return self.lm_head(model)(hidden)

    def qkv(
        self, model: nn.Module, sub: Sublayer, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden `[N, T, d]`, positions `[N, T]` -> q `[N, H, T, hd]`, k, v `[N, Hkv, T, hd]`
        with every per-family transform (q/k norms, RoPE) applied."""
        raise ValueError(f"sublayer {sub.index}: {type(self).__name__} has no attention layers")

    def attn_scale(self, sub: Sublayer) -> float:
        """Softmax scale of the attention scores."""
        return sub.mixer.scaling

    def attn_out(self, sub: Sublayer, o: torch.Tensor) -> torch.Tensor:
        """Attention output `[N, T, H·hd]` -> hidden `[N, T, d]`."""
        return sub.mixer.o_proj(o)

    def mamba(self, sub: Sublayer) -> Mamba2Params:
        """The Mamba-2 mixer's parameters (mamba sublayers only)."""
        raise ValueError(f"sublayer {sub.index}: {type(self).__name__} has no Mamba-2 layers")

    def ffn(self, sub: Sublayer, x: torch.Tensor) -> torch.Tensor:
        """Run an `mlp` or `moe` mixer on normed hidden `[N, T, d]` (MoE routing in float32)."""
        return sub.mixer(x)

    def experts(self, sub: Sublayer) -> Experts:
        """The routed experts of a `moe` sublayer (sizing: active parameters, expert traffic)."""
        raise ValueError(f"sublayer {sub.index}: {type(self).__name__} has no MoE layers")

    def max_positions(self, config) -> int | None:
        """Longest sequence the backbone supports (None: unbounded)."""
        return getattr(config, "max_position_embeddings", None)
