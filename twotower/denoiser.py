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

How a block sees the context is a `BlockContext` (`TrainingContext` from the clean sequence,
`DecodeContext` from the context tower's cache); each residual step is `twotower.walk.sublayer_step`,
the code the context tower runs too.
"""
from __future__ import annotations

import copy
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from adapters import Adapter
from twotower.cache import TowerCache
from twotower.config import TwoTowerConfig
from twotower.ops import attention, block_training_mask, mamba2_mixer, window_mask
from twotower.walk import Walk, layer_container, positions_for, sublayer_step


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


class ContextFusion(nn.Module):
    """A fused feature of several context layers (DFlash, EAGLE-3) added, through a zero-init gate,
    to the input each denoiser attention sublayer makes its context keys/values from.

    The outputs of `layers` context layers at each position are concatenated `[.., k·d]`, projected
    to `[.., d]` (initialised to their mean) and RMS-normalised: `feature`. Attention sublayer i's
    context keys/values are then its own projections of `norm_i(h_i + gate_i ⊙ feature)`, h_i the
    context tower's input to layer i. With the gates at zero that is exactly the context tower's own
    layer-i keys (the layer-aligned wiring, zero-init identity kept); training opens each gate as far
    as the deep and shallow features help that layer. Keys made from the fused feature alone (DFlash's
    wiring) start from nothing a copied layer can read: on SmolLM2 they drafted worse after 300 steps
    than the layer-aligned keys (docs/results.md)."""

    def __init__(self, d: int, layers: list[int], attention_subs: list[int], dtype):
        super().__init__()
        self.layers = frozenset(layers)
        k = len(layers)
        self.proj = nn.Linear(k * d, d, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d).repeat(1, k) / k)
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.gate = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(d)) for i in attention_subs})
        """Per attention sublayer (by index) `[d]`; zero-init."""
        self.to(dtype)

    def feature(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.proj(torch.cat(outputs, dim=-1)).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x * self.norm_weight.float()).to(self.proj.weight.dtype)


class FusedContextFeatures:
    """`twotower.walk.ContextFeatures` of a `fused_kv` denoiser: each of its attention sublayers'
    context keys/values from the context tower's input to that layer plus the gated fused feature
    (its own norm and projections, its positional encoding at the context positions, no AdaLN:
    the context is clean)."""

    def __init__(self, den: "DenoiserTower"):
        self.den = den
        self.layers = den.fusion.layers
        self.subs = [sub for sub in den.walk.subs if sub.kind == "attention"]
        self.inputs = frozenset(sub.index for sub in self.subs)

    def __call__(self, outputs, inputs, positions):
        den, fusion = self.den, self.den.fusion
        home = positions.device  # the context tower's: the cache keeps the keys there
        dev = fusion.proj.weight.device
        feature = fusion.feature([h.to(dev) for h in outputs])
        pos = positions.to(dev)
        out = {}
        for sub in self.subs:
            h = torch.addcmul(inputs[sub.index].to(dev), fusion.gate[str(sub.index)].to(feature.dtype), feature)
            _, k, v = den.adapter.qkv(den.backbone, sub, sub.norm(h), pos)
            out[sub.index] = (k.to(home), v.to(home))
        return out


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
        self.block_pos = nn.Parameter(torch.zeros(cfg.block_size, d, dtype=emb.dtype)) if cfg.block_position_embedding else None
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
                str(sub.index): nn.Parameter(torch.zeros(2, cfg.context_position_keys, *self._kv_shape(sub), dtype=emb.dtype))
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
            key = (tuple(t.tolist()), t.device, tuple(w._version for w in weights), tuple(w.data_ptr() for w in weights))
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
        for sub in self.walk.subs:
            h = sublayer_step(self.walk, sub, h, mixing, positions, None if mod is None else mod[sub.index], cross)
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


class BlockContext(Protocol):
    """What a denoised block may see of the context tower, per sublayer."""

    block_valid: torch.Tensor | None
    """`[N, B]` real (non-pad) block positions, or None when all are real."""

    def attend(self, sub, q, k, v, scale: float, key_shift: torch.Tensor | None = None) -> torch.Tensor:
        """Block q/k/v `[N, H(kv), B, hd]` of sublayer `sub` -> attention output `[N, B, H·hd]`
        (its window and soft-cap applied); key_shift `[N, Hkv, Tc, hd]` is added to the context
        keys (`context_position_keys`)."""
        ...

    def context_key_index(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(distance to the block start, absolute position)` of every context key `attend` reads,
        `[N, Tc]` each, clipped to `rows - 1`."""
        ...

    def seed(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conv state `[N, Cd, K-1]`, SSM state `[N, H, P, S]`) at the block start."""
        ...

    def cross(self, i: int, module: CrossAttention, x: torch.Tensor) -> torch.Tensor:
        """Zero-gated cross-attention output `[N, B, d]`."""
        ...


def context_keys(cache: TowerCache, cfg: TwoTowerConfig, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The context keys/values attention sublayer i of the denoiser reads: the context tower's own
    (`context_kv`) or the fused ones (`fused_kv`); a clear error when the cache lacks them (a
    context forward run without the denoiser's `context_features`)."""
    fused = cfg.attention_conditioning == "fused_kv"
    keys, values = (cache.fused_keys, cache.fused_values) if fused else (cache.keys, cache.values)
    if i not in keys:
        raise ValueError(f"the context cache has no {'fused ' if fused else ''}keys for sublayer {i}"
                         + (": run context_forward with features=model.denoiser.context_features()" if fused else ""))
    return keys[i], values[i]


def key_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids of cached keys `[N, T]` from their validity, numbered as decoding numbers them
    (a left pad gets the next real token's)."""
    return positions_for(TowerCache.empty(valid.shape[0], valid.device), valid)


def clipped_key_index(block_start: torch.Tensor, keys: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(distance to the block start, absolute position)` of keys `[N, Tc]` for blocks starting at
    position `block_start` `[N]`, both clipped to the `rows` of the position-key tables."""
    return (block_start[:, None] - keys).clamp(0, rows - 1), keys.clamp(0, rows - 1)


class TrainingContext:
    """Blocks of a clean batch (`[b, L]`, L = n_blocks·block_len), seen through one clean
    context-tower pass over the whole sequence (K/V and positions of every token, Mamba states
    at every block boundary, recorded with chunk = block_len).

    blocks: the flat block indices (into `b·n`) that are denoised, `[S, block_len]` in that order
    (e.g. only the blocks holding a masked position: block-aligned prompt/answer rows put the
    answer in one block, so most of the denoiser's work is skipped); None: every block, in the
    sequence layout `[b, L]` with one `[L, 2L]` mask (no per-block copies of the context keys).
    Both layouts show a block exactly the same keys (those before its start and its own block,
    each within the sublayer's window) and the same boundary states, so the logits are equal;
    context position keys, which shift the context keys per block, use the per-block layout.
    block_len: defaults to the config's block size (`checks.zero_init_identity` uses 1).
    """

    def __init__(self, cache: TowerCache, record: dict, cfg: TwoTowerConfig, batch: int, n_blocks: int,
                 blocks: torch.Tensor | None = None, block_len: int | None = None):
        self.cache, self.record, self.cfg = cache, record, cfg
        self.b, self.n, self.B = batch, n_blocks, block_len or cfg.block_size
        self.L = n_blocks * self.B
        valid = cache.valid  # [b, L]: pads (left or right) are never keys, but see themselves
        dev = valid.device
        self.sequence_layout = blocks is None
        if blocks is None:
            blocks = torch.arange(batch * n_blocks, device=dev)
        self.rows, self.ks = blocks // n_blocks, blocks % n_blocks
        self.span = int(self.ks.max()) * self.B if blocks.numel() else 0
        """Context keys any block sees in the per-block layout (up to the latest block start)."""
        self.query_pos = cache.positions.reshape(batch * n_blocks, self.B)[blocks]  # [S, B]
        bv = valid.reshape(batch * n_blocks, self.B)[blocks]
        self.block_valid = None if bool(bv.all()) else bv
        self._masks: dict = {}

    # -- sequence layout (every block): queries [b, H, L, hd], keys = L context then L block keys
    def _to_seq(self, x):  # [b·n, H, B, hd] -> [b, H, L, hd]
        _, heads, _, hd = x.shape
        return x.view(self.b, self.n, heads, self.B, hd).transpose(1, 2).reshape(self.b, heads, self.L, hd)

    def _sequence_mask(self, window):
        key = ("seq", window)
        if key not in self._masks:
            if window is None:
                valid = self.cache.valid
                mask = block_training_mask(self.L, self.B, valid.device)  # [L, 2L]
                if self.block_valid is not None:
                    own = torch.eye(self.L, dtype=torch.bool, device=valid.device)
                    mask = torch.cat([valid[:, None, :] & mask[None, :, : self.L],
                                      (valid[:, None, :] | own) & mask[None, :, self.L:]], dim=2)[:, None]
            else:
                near = window_mask(self.cache.positions, self.cache.positions, window)  # [b, 1, L, L]
                mask = self._sequence_mask(None) & torch.cat([near, near], dim=-1)
            self._masks[key] = mask
        return self._masks[key]

    # -- per-block layout: queries [S, H, B, hd], keys = `span` context keys then B block keys
    def _block_masks(self, window):
        """(context mask `[S, 1, B, span]`, own-block mask `[S, 1, B, B]`)."""
        key = ("block", window)
        if key not in self._masks:
            if window is None:
                valid, span = self.cache.valid, self.span
                pos = torch.arange(span, device=valid.device)
                sees = (pos[None, :] < (self.ks * self.B)[:, None]) & valid[self.rows, :span]
                ctx_mask = sees[:, None, None, :].expand(-1, 1, self.B, -1)
                own = torch.eye(self.B, dtype=torch.bool, device=valid.device)
                bv = valid.reshape(self.b * self.n, self.B)[self.rows * self.n + self.ks]
                own_mask = (own[None] | bv[:, None, :])[:, None]
            else:
                ctx_mask, own_mask = self._block_masks(None)
                ctx_mask = ctx_mask & window_mask(self.query_pos, self.cache.positions[self.rows, : self.span], window)
                own_mask = own_mask & window_mask(self.query_pos, self.query_pos, window)
            self._masks[key] = (ctx_mask, own_mask)
        return self._masks[key]

    def context_key_index(self, rows):
        pos = self.cache.positions
        return clipped_key_index(pos[self.rows, self.ks * self.B], pos[self.rows, : self.span], rows)

    def attend(self, sub, q, k, v, scale, key_shift=None):
        i, context_kv = sub.index, self.cfg.attention_conditioning != "none"
        keys, values = context_keys(self.cache, self.cfg, i) if context_kv else (None, None)
        if self.sequence_layout and key_shift is None:
            q, k, v = self._to_seq(q), self._to_seq(k), self._to_seq(v)
            mask = self._sequence_mask(sub.window)
            if context_kv:
                k = torch.cat([keys.to(k.dtype), k], dim=2)
                v = torch.cat([values.to(v.dtype), v], dim=2)
            else:
                mask = mask[..., self.L:]
            return attention(q, k, v, mask, scale, sub.logit_softcap).view(self.b * self.n, self.B, -1)
        ctx_mask, own_mask = self._block_masks(sub.window)
        span = self.span
        if context_kv and span:
            ctx_k = keys[self.rows, :, :span]
            if key_shift is not None:
                ctx_k = ctx_k + key_shift
            k = torch.cat([ctx_k.to(k.dtype), k], dim=2)
            v = torch.cat([values[self.rows, :, :span].to(v.dtype), v], dim=2)
            mask = torch.cat([ctx_mask, own_mask], dim=-1)
        else:
            mask = own_mask
        return attention(q, k, v, mask, scale, sub.logit_softcap)

    def seed(self, i):
        if self.cfg.mamba_conditioning != "seeded_state":
            return None, None
        states = self.record["states"][i][self.rows, self.ks]  # state before each block start
        xbc = self.record["xbc"][i]  # [b, Cd, K-1+L]: zeros, then the clean pre-conv inputs
        width = xbc.shape[-1] - self.L
        conv = xbc.unfold(-1, width, self.B)[self.rows, :, self.ks]  # [S, Cd, K-1]
        return conv, states

    def cross(self, i, module, x):
        if self.sequence_layout:
            ctx = self.cache.hidden[i]  # [b, L, d]
            mask = self._sequence_mask(None)[..., : self.L]
            out = module(x.view(self.b, self.L, -1), ctx, mask if mask.dim() == 4 else mask[None, None])
            return out.view(self.b * self.n, self.B, -1)
        span = self.span
        ctx = self.cache.hidden[i][self.rows, : max(span, 1)]
        ctx_mask = self._block_masks(None)[0]
        mask = ctx_mask if span else ctx_mask.new_zeros(x.shape[0], 1, self.B, 1)
        return module(x, ctx, mask)


class DecodeContext:
    """One block per sequence on top of the context tower's cache (moved to the denoiser's device).
    Masks are built once per block (and window), not per denoiser step."""

    block_valid = None  # decoded blocks hold no pads

    def __init__(self, cache: TowerCache, cfg: TwoTowerConfig, block_len: int):
        self.cache, self.cfg = cache, cfg
        dev = cache.valid.device
        ones = torch.ones(cache.valid.shape[0], block_len, dtype=torch.bool, device=dev)
        self.query_pos = cache.next_pos[:, None] + torch.arange(block_len, device=dev)  # [N, B]
        self._masks = {None: torch.cat([cache.valid, ones], dim=1)[:, None, None, :]}  # [N, 1, 1, T+B]
        self._key_index: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _mask(self, window):
        mask = self._masks.get(window)
        if mask is None:
            keys = torch.cat([self.cache.positions, self.query_pos], dim=1)
            mask = self._masks[None] & window_mask(self.query_pos, keys, window)  # [N, 1, B, T+B]
            self._masks[window] = mask
        return mask

    def context_key_index(self, rows):
        if self._key_index is None or self._key_index[0] != rows:  # one per block, not per step
            index = clipped_key_index(self.cache.next_pos, self.cache.positions, rows)
            self._key_index = (rows, index)
        return self._key_index[1]

    def attend(self, sub, q, k, v, scale, key_shift=None):
        i, mask = sub.index, self._mask(sub.window)
        if self.cfg.attention_conditioning != "none" and self.cache.length:
            keys, values = context_keys(self.cache, self.cfg, i)
            ctx_k = keys if key_shift is None else keys + key_shift
            k = torch.cat([ctx_k.to(k.dtype), k], dim=2)
            v = torch.cat([values.to(v.dtype), v], dim=2)
        else:
            mask = mask[..., self.cache.length:]
        return attention(q, k, v, mask, scale, sub.logit_softcap)

    def seed(self, i):
        if self.cfg.mamba_conditioning != "seeded_state":
            return None, None
        return self.cache.conv.get(i), self.cache.ssm.get(i)

    def cross(self, i, module, x):
        valid = self.cache.valid[:, None, None, :].expand(-1, 1, x.shape[1], -1)
        return module(x, self.cache.hidden[i], valid)
