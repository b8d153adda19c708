"""`TwoTowerConfig`: the typed, serialisable description of the denoiser's wiring.

It is the `twotower` section of a pipeline recipe and is saved, nested with the backbone's own
config, in the exported `config.json` (`twotower.hf_config.TwoTowerHFConfig`, `model_type: twotower`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

CHOICES = {
    "attention_conditioning": ("context_kv", "fused_kv", "none"),
    "mamba_conditioning": ("seeded_state", "zero_state"),
    "time_conditioning": ("adaln", "none"),
    "loss_weighting": ("uniform", "elbo"),
    "router_dtype": ("float32",),
    "targets": ("data", "context_greedy", "context_kl"),
}


@dataclass
class TwoTowerConfig:
    """How the denoiser tower is conditioned on the frozen context tower and trained."""

    block_size: int = 16
    """B: tokens denoised together; the context tower commits one block per forward. >= 2."""
    mask_token_id: int | None = None
    """An existing vocabulary id to use as [MASK]; None adds a learned `mask_embedding` row to the
    denoiser (the vocabulary and LM head stay unchanged)."""
    attention_conditioning: str = "context_kv"
    """Attention layers: `context_kv` = layer-aligned attention to the context tower's own layer-l
    keys/values before the block (zero new parameters); `fused_kv` = DFlash-style: the outputs of
    the context layers `fused_layers` are concatenated, projected to one feature per context
    position (`ContextFusion`) and every denoiser attention layer reads keys/values that its *own*
    trainable projections make of that feature (no zero-init identity: the fusion is new);
    `none` = block-local attention only."""
    mamba_conditioning: str = "seeded_state"
    """Mamba-2 layers: `seeded_state` starts each block's scan from the context tower's SSM and conv
    state at the block start; `zero_state` starts from zeros (ablation)."""
    cross_attention: bool = False
    """Add a zero-gated cross-attention module per sublayer reading the context tower's layer-l
    input hidden states before the block (for layers the two above do not cover, and ablations)."""
    time_conditioning: str = "adaln"
    """`adaln`: AdaLN-zero (shift, scale, residual gate per sublayer from a t-embedding); `none`."""
    time_embed_dim: int = 128
    """Width of the timestep embedding that feeds AdaLN."""
    block_position_embedding: bool = True
    """Add a zero-initialised learned in-block position embedding to the denoiser's input."""
    context_position_keys: int = 0
    """R > 0: add zero-initialised learned offsets to the context keys every attention sublayer of the
    denoiser reads, from two tables of R rows: one indexed by the key's distance to the block start,
    one by its absolute position (both clipped at R-1). Backbones without positional encodings
    (Nemotron-H's attention has no RoPE) give a block's masked positions no way to find "the
    source character j places after the start" (copy) or "j places before the block" (reverse);
    with these, a query can. 0 = off (the paper's wiring). Needs attention_conditioning=context_kv."""
    token_shift: bool = True
    """Denoiser output j predicts token j+1; block position 0 is the context tower's greedy token.
    False: every block position is masked and output j predicts token j."""
    loss_weighting: str = "uniform"
    """`uniform`: mean cross-entropy over masked positions; `elbo`: each term weighted 1/t_k.
    The ELBO is reported in `out.elbo` either way."""
    t_min: float = 1e-3
    """Block times are drawn in [t_min, 1) (low-discrepancy across the batch)."""
    suffix_mask_prob: float = 0.0
    """Training only: the fraction of blocks whose masked positions are a suffix (the last
    fraction t of the maskable positions) instead of independent draws. Confidence-ordered
    decoding often finishes a dependency chain (a carry, a running sum) left to right, i.e. with
    the prefix committed and the rest masked, a pattern i.i.d. masks rarely show; these blocks
    train it and keep the copied backbone's left-to-right skill (docs/model.md)."""
    denoiser_layers: int | list[int] | None = None
    """Which backbone layers the denoiser keeps (its depth): None = every layer (the paper's
    full-depth copy); an int k = k layers evenly spaced from the first to the last (k=1: the last;
    k=2: the first and the last, so the embedding still feeds the layer trained on it and the
    final norm and LM head still read the layer trained for them); a list = exactly those layer
    indices (ascending, each < the backbone's layer count; checked by `check_denoiser_layers`).
    Each kept layer starts from the backbone's weights and stays layer-aligned: its attention reads
    the context tower's *own* layer's keys/values and its Mamba-2 scan starts from the same layer's
    state, however many layers lie between it and the last kept one. A shallow denoiser drafts a
    block for a fraction of a full-depth forward (DFlash, EAGLE-3); only the full depth keeps the
    zero-init identity (step 0 computes the backbone)."""
    targets: str = "data"
    """Training only: what a masked position learns. `data`: the data's own token; `context_greedy`:
    the context tower's greedy token there (argmax of its teacher-forced logits on the clean
    sequence, the token `verified` accepts and `relative quality` compares against);
    `context_kl`: the context tower's whole next-token distribution (cross-entropy to its softmax,
    i.e. KL up to a constant). Both context targets cost one LM-head product per masked position
    on top of the frozen forward that training runs anyway."""
    share_embeddings: bool = False
    """The denoiser reads the context tower's own input embedding and LM head (frozen, one copy in
    memory) instead of training copies of them, as DFlash and EAGLE-3 drafters do. For a small
    backbone with a large vocabulary they are most of a shallow denoiser's parameters (SmolLM2:
    28 M of 35 M at depth 2), so sharing them removes most of its optimizer work and the LM head's
    weight gradient; the [MASK] row (`mask_embedding`) stays trainable."""
    noise_draws: int = 1
    """Training only: noise draws (t and mask) denoised per row on top of ONE frozen context pass,
    their losses averaged. The frozen tower's outputs for a row do not depend on the noise, so K
    draws pay for the context forward (and the teacher's) once instead of K times: the lever that
    makes a training step cost mostly the denoiser when the denoiser is shallow and the frozen
    forward is most of a step (docs/model.md, "Denoiser depth")."""
    fused_layers: int | list[int] = 4
    """With attention_conditioning=fused_kv: the context tower layers whose outputs (the residual
    stream after the layer) are fused, an int k = k layers evenly spaced from the first to the last
    (k=1: the last layer's output, the hidden state the backbone's LM head reads; every layer of a
    backbone with fewer than k), or a list of layer indices. Deep layers carry what the backbone is
    about to predict, shallow ones the
    tokens themselves (DFlash fuses 5 of Qwen3-8B's 36 layers, EAGLE-3 a low, a middle and a high
    one)."""
    router_dtype: str = "float32"
    """Precision of MoE routing. Recorded and validated: the Nemotron-H router computes its logits
    in float32 whatever the model dtype (so training and decoding route alike); wider is not wired."""

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"twotower.block_size must be an integer >= 2, got {self.block_size!r}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"twotower.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"twotower.t_min must be in [0, 1), got {self.t_min!r}")
        if not isinstance(self.context_position_keys, int) or self.context_position_keys < 0:
            raise ValueError("twotower.context_position_keys must be an integer >= 0, "
                             f"got {self.context_position_keys!r}")
        if self.context_position_keys and self.attention_conditioning != "context_kv":
            raise ValueError("twotower.context_position_keys needs attention_conditioning=context_kv "
                             f"(got {self.attention_conditioning!r}): it shifts the context keys")
        if isinstance(self.noise_draws, bool) or not isinstance(self.noise_draws, int) or self.noise_draws < 1:
            raise ValueError(f"twotower.noise_draws must be an integer >= 1, got {self.noise_draws!r}")
        if self.targets != "data" and not self.token_shift:
            raise ValueError(f"twotower.targets={self.targets!r} needs token_shift=true: the context tower "
                             "predicts position p from p-1, which a block's first position does not have")
        self.denoiser_layers = _layer_choice("denoiser_layers", self.denoiser_layers, "null (every layer), ",
                                             "; null keeps every layer")
        if self.fused_layers is None:
            raise ValueError("twotower.fused_layers must be an integer k >= 1 or a list of layer indices, got None")
        self.fused_layers = _layer_choice("fused_layers", self.fused_layers, "", "")
        if not 0.0 <= self.suffix_mask_prob <= 1.0:
            raise ValueError(f"twotower.suffix_mask_prob must be in [0, 1], got {self.suffix_mask_prob!r}")

    def kept_layers(self, n_layers: int) -> list[int]:
        """The backbone layer indices the denoiser keeps, for a backbone of `n_layers` layers
        (ValueError naming `twotower.denoiser_layers` when a listed layer does not exist or k is
        larger than the backbone)."""
        return _resolve_layers("denoiser_layers", self.denoiser_layers, n_layers)

    def fused_context_layers(self, n_layers: int) -> list[int]:
        """The context layers whose outputs `fused_kv` fuses (ValueError naming `twotower.fused_layers`
        for a listed layer the backbone lacks)."""
        k = self.fused_layers
        return _resolve_layers("fused_layers", min(k, n_layers) if isinstance(k, int) else k, n_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TwoTowerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown twotower config keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _layer_choice(key: str, layers, null: str, hint: str):
    """A `denoiser_layers`-style value checked: None (where `null` says it is allowed), an int
    k >= 1 or an ascending list of distinct layer indices >= 0 (returned as a list)."""
    if isinstance(layers, bool) or not (layers is None or isinstance(layers, int) or (
            isinstance(layers, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers))):
        raise ValueError(f"twotower.{key} must be {null}an integer k >= 1 or a list of layer indices, got {layers!r}")
    if isinstance(layers, int) and layers < 1:
        raise ValueError(f"twotower.{key} must be >= 1 (a choice of {layers} layers has nothing in it){hint}")
    if isinstance(layers, (list, tuple)):
        if not layers:
            raise ValueError(f"twotower.{key} is an empty list: name at least one layer{hint}")
        if any(x < 0 for x in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"twotower.{key}={list(layers)}: layer indices must be >= 0, ascending and distinct")
        return list(layers)
    return layers


def _resolve_layers(key: str, layers, n_layers: int) -> list[int]:
    """The layer indices a checked choice names for a backbone of `n_layers` layers: None = all,
    k = k evenly spaced from the first to the last (k=1: the last), a list = itself."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        if layers > n_layers:
            raise ValueError(f"twotower.{key}={layers}: the backbone has only {n_layers} layers")
        if layers == 1:
            return [n_layers - 1]
        return sorted({round(i * (n_layers - 1) / (layers - 1)) for i in range(layers)})
    missing = [x for x in layers if x >= n_layers]
    if missing:
        raise ValueError(f"twotower.{key} names layer(s) {missing}, but the backbone has "
                         f"{n_layers} layers (0..{n_layers - 1})")
    return list(layers)
