"""The adapter contract: how the twotower runtime walks one backbone family.

The runtime never calls a backbone's own `forward`. It walks a flat list of *sublayers*, each a
pre-norm residual step `h = h + mixer(norm(h))` of one kind (`attention`, `mamba`, `moe`, `mlp`),
and asks the adapter for the few family-specific primitives it composes (q/k/v with RoPE, the
Mamba-2 mixer parameters, a call of the MLP/MoE mixer). A Nemotron-H layer is one sublayer; a
Llama decoder layer is two (attention, then mlp). The runtime owns masks, caches and the
AdaLN hook, so the context tower, the denoiser and every decoding mode share one code path.

A new family: write a module with a class satisfying `Adapter`, add one line to
`adapters.REGISTRY`, and one tiny config to `tests/twotower_fixtures.py` (see docs/adapters.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

KINDS = ("attention", "mamba", "moe", "mlp")


@dataclass(frozen=True)
class Sublayer:
    """One pre-norm residual step of the layer walk: `h = h + mixer(norm(h))`."""

    index: int
    """Position in the flat walk (0..n_sublayers-1): the key of caches and AdaLN rows."""
    layer: int
    """Index of the backbone decoder layer this sublayer belongs to."""
    kind: str
    """One of `KINDS`."""
    norm: nn.Module
    """The input norm; AdaLN modulates its output."""
    mixer: nn.Module
    """The HF module the adapter's primitives read (attention, Mamba-2 mixer, MLP or MoE)."""


@dataclass(frozen=True)
class Mamba2Params:
    """What the shared torch Mamba-2 (SSD) implementation in `twotower.ops` needs from a mixer."""

    in_proj: nn.Linear
    """hidden -> [gate (I), xBC (I + 2·G·N), dt (H)]."""
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
    """dt is clamped to [dt_min, inf) on every path (HF clamps only its chunk path: a trap)."""
    activation: str
    """Activation after the convolution (`silu`)."""


class Adapter(Protocol):
    """A backbone family's layer walk. Stateless; every method gets the HF model it reads."""

    model_types: tuple[str, ...]

    def sublayers(self, model: nn.Module) -> list[Sublayer]:
        """The ordered residual steps of `model` (a `*ForCausalLM`)."""
        ...

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[batch, T, d]`."""
        ...

    def embedding_weight(self, model: nn.Module) -> torch.Tensor:
        """The input embedding matrix `[vocab, d]`."""
        ...

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied before the LM head."""
        ...

    def lm_head(self, model: nn.Module) -> nn.Module:
        """hidden -> vocabulary logits."""
        ...

    def qkv(
        self, model: nn.Module, sub: Sublayer, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed hidden `[N, T, d]`, positions `[N, T]` -> q `[N, H, T, hd]`, k, v `[N, Hkv, T, hd]`
        with every per-family transform (q/k norms, RoPE) applied."""
        ...

    def attn_scale(self, sub: Sublayer) -> float:
        """Softmax scale of the attention scores."""
        ...

    def attn_out(self, sub: Sublayer, o: torch.Tensor) -> torch.Tensor:
        """Attention output `[N, T, H·hd]` -> hidden `[N, T, d]`."""
        ...

    def mamba(self, sub: Sublayer) -> Mamba2Params:
        """The Mamba-2 mixer's parameters (mamba sublayers only)."""
        ...

    def ffn(self, sub: Sublayer, x: torch.Tensor) -> torch.Tensor:
        """Run an `mlp` or `moe` mixer on normed hidden `[N, T, d]` (MoE routing in float32)."""
        ...

    def max_positions(self, config) -> int | None:
        """Longest sequence the backbone supports (None: unbounded)."""
        ...
