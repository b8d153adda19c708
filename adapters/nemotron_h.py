"""Nemotron-H adapter: hybrid Mamba-2 / attention / MoE / MLP, one mixer per layer.

Every HF `NemotronHBlock` is `h + mixer(norm(h))` with the mixer picked by
`config.layers_block_type[i]` (a dispatch table, as in `modular_nemotron_h.py`). Attention has no
RoPE: order comes from the causal Mamba-2 layers. The Mamba-2 scan itself lives in
`twotower.ops` (it must return block-boundary states), so this adapter only hands out parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.base import Adapter, Experts, Mamba2Params, Sublayer, project_qkv

# HF block type -> our kind. Legacy names kept for configs saved before the rename.
BLOCK_KINDS = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "moe": "moe",
    "mlp": "mlp",
}


def mamba2_params(m: nn.Module) -> Mamba2Params:
    """`Mamba2Params` of an HF Mamba-2 mixer in the `Mamba2Mixer` layout (Nemotron-H, Granite)."""
    return Mamba2Params(
        in_proj=m.in_proj, conv1d=m.conv1d, dt_bias=m.dt_bias, A_log=m.A_log, D=m.D,
        norm=m.norm, out_proj=m.out_proj, num_heads=m.num_heads, head_dim=m.head_dim,
        n_groups=m.n_groups, state_size=m.ssm_state_size, dt_min=float(m.time_step_limit[0]),
        dt_max=float(m.time_step_limit[1]), activation=m.activation,
    )


class NemotronHAdapter(Adapter):
    """Layer walk of `NemotronHForCausalLM`."""

    model_types = ("nemotron_h",)

    def sublayers(self, model: nn.Module) -> list[Sublayer]:
        subs = []
        for i, block in enumerate(model.model.layers):
            if block.block_type not in BLOCK_KINDS:
                raise ValueError(f"layer {i}: unknown Nemotron-H block type {block.block_type!r}")
            subs.append(Sublayer(i, i, BLOCK_KINDS[block.block_type], block.norm, block.mixer))
        return subs

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model.model.embeddings(input_ids)  # an attribute read: called every decoding step

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm_f

    def qkv(self, model, sub, x, positions):
        return project_qkv(sub.mixer, x)  # no RoPE

    def mamba(self, sub: Sublayer) -> Mamba2Params:
        return mamba2_params(sub.mixer)

    def ffn(self, sub: Sublayer, x: torch.Tensor) -> torch.Tensor:
        # NemotronHTopkRouter computes its logits in float32 already (router precision).
        return sub.mixer(x)

    def experts(self, sub: Sublayer) -> Experts:
        moe = sub.mixer
        return Experts(moe.experts, int(moe.experts.num_experts), int(moe.gate.top_k))
