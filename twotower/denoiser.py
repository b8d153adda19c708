"""The denoiser tower: a trainable copy of the backbone plus the zero-initialised new modules,
and its block forward, shared by training (all blocks at once) and decoding (one block).

The new modules (all zero-init so step 0 computes exactly what the backbone computes):
- `mask_embedding`: the [MASK] input vector (unless the config names an existing token id);
- `block_pos`: an in-block position embedding `[B, d]`;
- AdaLN-zero: sinusoidal t -> MLP -> per-sublayer shift, scale and residual gate, applied as
  `norm(h)·(1+scale)+shift` and `h + (1+gate)·mixer(...)`;
- optional `cross_attn`: zero-gated attention from the block to the context tower's layer-l input
  hidden states before the block;
- with `attention_conditioning=fused_kv`, `fusion` (`ContextFusion`): the outputs of a few context
  layers, concatenated and projected to one feature per context position, added through a
  zero-init gate to the context input each attention sublayer makes its context keys/values from
  (DFlash, EAGLE-3).

How a block sees the context is a `BlockContext` (`twotower.block_context`: `TrainingContext`
from the clean sequence, `DecodeContext` from the context tower's cache); each residual step is
`twotower.walk.sublayer_step`,
the code the context tower runs too.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from adapters import Adapter
from twotower.block_context import BlockContext
from twotower.config import TwoTowerConfig
from twotower.fusion import ContextFusion, FusedContextFeatures
from twotower.ops import attention, mamba2_mixer
from twotower.walk import Walk, layer_container, step_input, sublayer_step

CROSS_ATTENTION_HEAD_DIM = 32
"""Head width of the optional zero-gated cross-attention modules: small enough that a tiny
backbone (d = 64) still gets two heads, the usual 32-128 range of attention heads at scale."""
MODULATION_MEMO_SIZE = 256
"""AdaLN results kept per (t values, weight versions): decoding asks for at most B distinct masked
fractions per block size, so 256 entries cover every t of a run while bounding memory; the memo is
cleared, not evicted one by one, when full."""


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT/MDLM), `[N] -> [N, dim]`."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class CrossAttention(nn.Module):
    """Zero-gated attention from block positions to context hidden states (plus a null key)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Parameter(torch.zeros(d))
        """Zero-init: the module adds nothing until trained."""

    def forward(self, x, ctx_hidden, mask):
        """x `[N, Tq, d]`, ctx_hidden `[M, Tk, d]` (M divides N), mask `[N or 1, 1, Tq, Tk]`."""
        n, tq, d = x.shape
        q = self.q(x).view(n, tq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(F.pad(ctx_hidden, (0, 0, 1, 0))).chunk(2, dim=-1)  # a zero "null" key first
        k = k.view(k.shape[0], k.shape[1], self.heads, -1).transpose(1, 2)
        v = v.view(v.shape[0], v.shape[1], self.heads, -1).transpose(1, 2)
        mask = F.pad(mask, (1, 0), value=True)
        return self.o(attention(q, k, v, mask, q.shape[-1] ** -0.5)) * self.gate


class DenoiserTower(nn.Module):
    """The trainable tower: `backbone` (a copy of the HF model, same state-dict keys) + new modules."""

    def __init__(self, backbone: nn.Module, adapter: Adapter, cfg: TwoTowerConfig, subs: list | None = None,
                 n_layers: int | None = None):
        """backbone: the denoiser's own copy; subs: its sublayers (default: every sublayer of
        `backbone`; `from_backbone` passes only those of the kept layers, `denoiser_layers`);
        n_layers: the context tower's layer count (default: that of `subs`)."""
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.adapter = adapter
        self.walk = Walk(adapter, backbone, adapter.sublayers(backbone) if subs is None else list(subs))
        self.slot = {sub.index: j for j, sub in enumerate(self.walk.subs)}
        """Context-tower sublayer index -> row of the denoiser's AdaLN and cross-attention modules
        (the same numbers at full depth; a shallow denoiser keeps the context tower's indices, so
        each kept sublayer reads its own layer's keys and states)."""
        emb = adapter.embedding_weight(backbone)
        d, n_sub = emb.shape[1], len(self.walk.subs)
        self.hidden_size = d
        if cfg.mask_token_id is None:  # where `embed`'s outputs live: the mean raw row, scaled
            seed = emb.detach().float().mean(0) * adapter.embedding_scale(backbone)
            self.mask_embedding = nn.Parameter(seed.to(emb.dtype).clone())
        self.block_pos = (nn.Parameter(torch.zeros(cfg.block_size, d, dtype=emb.dtype))
                          if cfg.block_position_embedding else None)
        if cfg.time_conditioning == "adaln":
            td = cfg.time_embed_dim
            self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
            self.adaln = nn.Linear(td, n_sub * 3 * d)
            self._modulation_memo: dict = {}
            nn.init.zeros_(self.adaln.weight)
            nn.init.zeros_(self.adaln.bias)
            self.time_mlp.to(emb.dtype), self.adaln.to(emb.dtype)
        if cfg.cross_attention:
            heads = max(1, d // CROSS_ATTENTION_HEAD_DIM)
            self.cross_attn = nn.ModuleList(CrossAttention(d, heads) for _ in range(n_sub)).to(emb.dtype)
        if cfg.attention_conditioning == "fused_kv":
            n_layers = n_layers or 1 + max(sub.layer for sub in self.walk.subs)
            self.fusion = ContextFusion(d, cfg.fused_context_layers(n_layers),
                                        [sub.index for sub in self.walk.subs if sub.kind == "attention"], emb.dtype)
        if cfg.context_position_keys:
            self.context_key_pos = nn.ParameterDict({
                str(sub.index): nn.Parameter(torch.zeros(2, cfg.context_position_keys, *self._kv_shape(sub),
                                                         dtype=emb.dtype))
                for sub in self.walk.subs if sub.kind == "attention"})
            """Per attention sublayer `[2, R, Hkv, hd]`: row 0 by distance to the block start, row 1
            by absolute position; zero-init (the keys are the context tower's until trained)."""

    @torch.no_grad()
    def _kv_shape(self, sub) -> tuple[int, int]:
        """(key heads, head dim) of an attention sublayer, read off one probe token (adapter-agnostic)."""
        p = next(self.backbone.parameters())
        x = torch.zeros(1, 1, self.hidden_size, dtype=p.dtype, device=p.device)
        _, k, _ = self.adapter.qkv(self.backbone, sub, x, torch.zeros(1, 1, dtype=torch.long, device=p.device))
        return k.shape[1], k.shape[3]

    def context_key_shift(self, i: int, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`[N, Hkv, Tc, hd]` offsets for the context keys of sublayer i, from `(distance, absolute)`
        position indices `[N, Tc]` (see `BlockContext.context_key_index`)."""
        table = self.context_key_pos[str(i)]
        rel, pos = index
        return (table[0][rel] + table[1][pos]).transpose(1, 2)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, adapter: Adapter, cfg: TwoTowerConfig) -> "DenoiserTower":
        """A trainable copy of `backbone` holding only the layers `cfg.denoiser_layers` keeps: the
        dropped layers are never copied (each becomes an empty placeholder module in the copy's
        layer list, so the kept ones keep the backbone's state-dict keys)."""
        subs = adapter.sublayers(backbone)
        n_layers = 1 + max(sub.layer for sub in subs)
        kept = set(cfg.kept_layers(n_layers))
        memo: dict = {}
        if len(kept) < n_layers:
            container = layer_container(backbone, subs)
            for layer, module in enumerate(container):
                if layer not in kept:
                    memo[id(module)] = nn.Module()  # deepcopy returns this instead of copying the layer
        shared = [m for m in (backbone.get_input_embeddings(), backbone.get_output_embeddings())
                  if m is not None] if cfg.share_embeddings else []
        for module in shared:
            memo[id(module)] = module  # deepcopy returns the context tower's own (frozen) module
        copy_, kept_subs = copy.deepcopy((backbone, [s for s in subs if s.layer in kept]), memo)
        copy_.requires_grad_(True)  # deepcopy of a frozen tower keeps requires_grad=False
        for module in shared:
            module.requires_grad_(False)
        return cls(copy_, adapter, cfg, kept_subs, n_layers)

    def context_features(self) -> FusedContextFeatures | None:
        """What every context forward must compute for this denoiser (`context_forward(features=)`):
        the fused keys/values with `fused_kv`, else None."""
        return FusedContextFeatures(self) if self.cfg.attention_conditioning == "fused_kv" else None

    def modulation(self, t: torch.Tensor) -> torch.Tensor | None:
        """t `[N]` -> `[N, n_sub, 3, d]` (shift, scale, gate), or None without AdaLN."""
        if self.cfg.time_conditioning != "adaln":
            return None
        emb = timestep_embedding(t, self.cfg.time_embed_dim).to(self.adaln.weight.dtype)
        return self.adaln(self.time_mlp(emb)).view(t.shape[0], len(self.walk.subs), 3, self.hidden_size)

    def sublayer_modulation(self, t: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """Per kept sublayer (by its index) `(shift, 1 + scale, 1 + gate)`, each `[N, 1, d]`, or None
        without AdaLN.

        Decoding asks for the same few t values over and over (t = masked fraction of a block), and
        the AdaLN MLP is a large share of a tiny denoiser's forward on CPU, so without autograd the
        result is memoised per (t values, weight versions): an optimizer step or a weight load bumps
        the versions and invalidates it."""
        if self.cfg.time_conditioning != "adaln":
            return None
        key = None
        weights = (*self.time_mlp.parameters(), *self.adaln.parameters())
        if not torch.is_grad_enabled() and not any(w.is_inference() for w in weights):  # (no version counter)
            key = (tuple(t.tolist()), t.device, tuple(w._version for w in weights),
                   tuple(w.data_ptr() for w in weights))
            hit = self._modulation_memo.get(key)
            if hit is not None:
                return hit
        mod = self.modulation(t)
        out = {sub.index: (mod[:, j, 0, None], 1 + mod[:, j, 1, None], 1 + mod[:, j, 2, None])
               for j, sub in enumerate(self.walk.subs)}
        if key is not None:
            if len(self._modulation_memo) >= MODULATION_MEMO_SIZE:
                self._modulation_memo.clear()
            self._modulation_memo[key] = out
        return out

    def embed(self, tokens: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
        """Noisy block tokens `[N, B]` -> input hidden `[N, B, d]`."""
        h = self.adapter.embed(self.backbone, tokens)
        if self.cfg.mask_token_id is None:
            h = torch.where(is_mask[..., None], self.mask_embedding.to(h.dtype), h)
        if self.block_pos is not None:
            h = h + self.block_pos[: tokens.shape[1]]
        return h

    def forward(self, tokens, is_mask, t, positions, ctx: "BlockContext") -> torch.Tensor:
        """Denoise blocks: tokens/is_mask/positions `[N, B]`, t `[N]` -> float32 logits `[N, B, V]`."""
        h = self.embed(tokens, is_mask)
        mod = self.sublayer_modulation(t)
        mixing = BlockMixing(self, ctx)
        cross = mixing.cross if self.cfg.cross_attention else None
        group = h
        for sub in self.walk.subs:
            group = step_input(sub, h, group)  # a parallel step reads its group's input (adapters.base)
            h = sublayer_step(self.walk, sub, group, mixing, positions, None if mod is None else mod[sub.index], cross,
                              residual=h)
        return self.walk.logits(self.adapter.final_norm(self.backbone)(h))


class BlockMixing:
    """The denoiser's `Mixing` for one forward: attention through the block context (plus the
    learned context-key offsets), Mamba-2 seeded with the context's state at the block start."""

    def __init__(self, den: DenoiserTower, ctx: "BlockContext"):
        self.den, self.ctx = den, ctx
        rows = den.cfg.context_position_keys
        self.key_index = ctx.context_key_index(rows) if rows else None

    def attend(self, sub, q, k, v, scale):
        shift = None if self.key_index is None else self.den.context_key_shift(sub.index, self.key_index)
        return self.ctx.attend(sub, q, k, v, scale, shift)

    def mamba(self, sub, p, x):
        conv, ssm = self.ctx.seed(sub.index)
        return mamba2_mixer(p, x, conv, ssm, self.ctx.block_valid, x.shape[1], want_states=False)[0]

    def cross(self, i, x):
        return self.ctx.cross(i, self.den.cross_attn[self.den.slot[i]], x)
