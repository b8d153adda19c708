"""Rotary cos/sin for the runtime, exact for every RoPE type a backbone config may name.

`rotary(model, x, positions)` is what the adapters call instead of `model.model.rotary_emb`
(`rotary(model, x, positions, layer_type)` where the module keeps a table per layer type):

- static tables (`default`, `linear`, `yarn`, `llama3`, `proportional`): the model's own
  `rotary_emb(x, positions)`, unchanged (bit-identical to transformers);
- `longrope` (Phi-3.5, Phi-4-mini): the short table for a row whose largest position p in this call
  has p + 1 <= `original_max_position_embeddings`, the long one otherwise. transformers picks one
  table for the whole batch (by the batch's largest position); here each row picks its own, so a
  row decodes the same in any batch. That a call never mixes a short-table cache with long-table
  queries is the caller's business (`twotower.rope_switch`: the context cache is rebuilt with the
  long table once a row crosses, as Phi-3's `generate` does);
- `dynamic` (NTK): a pure function of position. The key/query at position j is rotated with the
  table of length max(j + 1, max_position_embeddings): what transformers' stateful module gives in
  token-by-token decoding after a prompt of at most `max_position_embeddings` tokens (each step
  grows its table to the length reached; cached keys keep theirs). transformers' own prefill of a
  prompt LONGER than the limit rotates every prompt position with the prompt length's table (so
  its result depends on how the sequence was chunked); this runtime does not copy that.

Nothing here touches the model's rotary module for these two types (transformers'
`dynamic_rope_update` mutates it): the tables come from transformers' own `ROPE_INIT_FUNCTIONS`,
called as transformers calls them, and the cos/sin arithmetic is its forward's, so the values are
bit-identical to the table transformers would use at that length.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

POSITION_DEPENDENT_ROPE = ("longrope", "dynamic")
"""RoPE types whose table depends on the sequence length reached (computed here per row/position)."""
STATIC_ROPE = ("default", "linear", "yarn", "llama3", "proportional")
"""RoPE types with one fixed table: the model's `rotary_emb` is already exact."""


def rope_type(config) -> tuple[str | None, str | None]:
    """(field, rope_type) of a config's flat RoPE scaling (`rope_parameters` or the legacy
    `rope_scaling`), or (None, None) when it names none. Nested per-layer-type parameters
    (Gemma 3's `{"full_attention": {...}, ...}`) yield the first non-static type found, as
    `config.rope_parameters.<layer type>`."""
    for field in ("rope_scaling", "rope_parameters"):
        scaling = getattr(config, field, None)
        if not isinstance(scaling, dict):
            continue
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind is not None:
            return field, kind
        for layer_type, sub in scaling.items():  # per layer type
            if isinstance(sub, dict):
                kind = sub.get("rope_type") or sub.get("type")
                if kind not in (None, *STATIC_ROPE):
                    return f"{field}.{layer_type}", kind
    return None, None


def original_max_positions(config) -> int:
    """`original_max_position_embeddings`: where `longrope` switches from its short to its long table."""
    params = getattr(config, "rope_parameters", None) or {}
    value = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if value is None:
        raise ValueError(f"{config.model_type}: longrope without original_max_position_embeddings")
    return int(value)


_LONG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""rotary module -> its `longrope` long inv_freq (computed once per module and device)."""


def _init_fn(kind: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # no modeling module: no import cycle

    return ROPE_INIT_FUNCTIONS[kind]


def _cos_sin(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """transformers' rotary forward with an inv_freq per row `[N, 1, d/2]` or position `[N, T, d/2]`."""
    freqs = positions[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)


def _longrope(module: nn.Module, x, positions):
    config = module.config
    orig = original_max_positions(config)
    short = module.original_inv_freq.to(x.device)
    long = _LONG.get(module)
    if long is None or long.device != x.device:  # transformers' long set: computed at orig + 1
        long = _init_fn("longrope")(config, x.device, seq_len=orig + 1)[0].to(x.device)
        _LONG[module] = long
    is_long = positions.amax(1) + 1 > orig  # [N]: each row its own table
    inv_freq = torch.where(is_long[:, None], long[None], short[None])[:, None]  # [N, 1, d/2]
    return _cos_sin(x, positions, inv_freq, module.attention_scaling)


def _dynamic(module: nn.Module, x, positions):
    config = module.config
    limit = int(config.max_position_embeddings)
    base = module.original_inv_freq.to(x.device)
    lengths = (positions + 1).clamp(min=limit)
    inv_freq = base.expand(*positions.shape, base.shape[0])
    grown = sorted(set((lengths[lengths > limit]).tolist()))
    if grown:
        inv_freq = inv_freq.clone()
        init = _init_fn("dynamic")
        for length in grown:  # as transformers: seq_len a 0-d int64 tensor (its float32 arithmetic)
            table, _ = init(config, x.device, seq_len=torch.tensor(length, device=positions.device))
            inv_freq[lengths == length] = table.to(x.device)
    return _cos_sin(x, positions, inv_freq, 1.0)


def rotary(model: nn.Module, x: torch.Tensor, positions: torch.Tensor,
           layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[N, T, rotary dims]` of `model.model.rotary_emb` at positions `[N, T]` (see the module
    docstring for `longrope` and `dynamic`). `layer_type`: the table of that layer type, for rotary
    modules holding one per type (OLMo 3's `rotary_emb(x, positions, layer_type)`); only static types
    get there (`check_rope_scaling` refuses a length-dependent type named per layer type)."""
    module = model.model.rotary_emb
    if layer_type is not None:
        return module(x, positions, layer_type)
    kind = getattr(module, "rope_type", "default")
    if kind == "longrope":
        return _longrope(module, x, positions)
    if kind == "dynamic":
        return _dynamic(module, x, positions)
    return module(x, positions)
