"""`TwoTowerForDiffusionLM`: the frozen context tower + the denoiser tower.

    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=16))
    out = model(input_ids)                          # out.loss, out.logits, out.masked_accuracy
    gen = model.generate(prompt_ids, mode="diffusion", gamma=0.8, max_new_tokens=64)
    model.save_pretrained(d); TwoTowerForDiffusionLM.from_pretrained(d)

Training forward (docs/design.md section 5): one no-grad context pass over the clean sequence gives
each attention sublayer's K/V and each Mamba-2 sublayer's SSM/conv state at every block start;
blocks get times t_k and masks; the denoiser runs over all blocks at once as `[batch·n, B]`.
With token shift the denoiser's output j predicts token j+1 of the block and position 0 is
never masked (at decoding time it is the context tower's greedy token).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import adapters
from twotower.block_context import TrainingContext
from twotower.cache import TowerCache
from twotower.config import TwoTowerConfig
from twotower.denoiser import DenoiserTower
from twotower.hf_config import TwoTowerHFConfig
from twotower.positions import pad_id_of, prediction_logits
from twotower.walk import Walk, context_forward

WEIGHTS_NAME = "model.safetensors"


@dataclass
class TwoTowerOutput:
    """Result of the training forward."""

    loss: torch.Tensor
    """Scalar training loss (weighting per `loss_weighting`)."""
    logits: torch.Tensor
    """`[batch, L, V]` float32 denoiser outputs; with token shift `logits[:, i]` predicts token i+1.
    Blocks without a masked position are not denoised (their logits are zeros) unless no block is
    masked or every block is."""
    masked_accuracy: torch.Tensor
    """Scalar: argmax accuracy over masked positions."""
    elbo: torch.Tensor
    """Scalar: the 1/t-weighted masked cross-entropy per maskable token (an NLL bound)."""
    noise_mask: torch.Tensor
    """`[batch, L]` bool: the positions that were [MASK]."""
    t: torch.Tensor
    """`[batch, n_blocks]` the block times."""


class TwoTowerForDiffusionLM(nn.Module):
    """Two towers sharing a backbone family: `context_tower` (frozen HF model) and `denoiser`."""

    config_class = TwoTowerHFConfig

    def __init__(self, config: TwoTowerHFConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.tt_config = config.twotower_config()
        if backbone is None:
            bcfg = config.backbone_config()
            dtype = getattr(bcfg, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            backbone = AutoModelForCausalLM.from_config(bcfg, dtype=dtype)
        self.adapter = adapters.get(backbone)
        self.context_tower = backbone
        self.context_tower.requires_grad_(False)
        self.context_tower.eval()
        self.denoiser = DenoiserTower.from_backbone(backbone, self.adapter, self.tt_config)
        self.context_walk = Walk.of(self.adapter, self.context_tower)
        self.auto_modes: dict[int, str] | None = None
        """`generate(mode="auto")`'s table: batch size -> the fastest mode meeting the quality
        target there (from the export's generation_config.json `auto_modes`)."""

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_backbone(cls, backbone: nn.Module, cfg: TwoTowerConfig | None = None) -> "TwoTowerForDiffusionLM":
        """Wrap a loaded HF `*ForCausalLM`: the context tower *is* `backbone` (frozen in place),
        the denoiser a trainable deep copy with the zero-initialised new modules."""
        cfg = cfg or TwoTowerConfig()
        adapters.get(backbone)  # ValueError listing supported model types
        hf = TwoTowerHFConfig(twotower=cfg.to_dict(), backbone=backbone.config.to_dict())
        return cls(hf, backbone=backbone)

    @property
    def block_size(self) -> int:
        return self.tt_config.block_size

    @property
    def backbone_config(self):
        return self.context_tower.config

    def train(self, mode: bool = True):
        super().train(mode)
        self.context_tower.eval()  # frozen: never dropout, never training-only kernels
        return self

    def layer_map(self) -> list[dict]:
        """One dict per sublayer: index, backbone layer, kind, how the denoiser is conditioned."""
        cfg = self.tt_config
        how = {
            "attention": "block_local" if cfg.attention_conditioning == "none" else cfg.attention_conditioning,
            "mamba": cfg.mamba_conditioning,
            "moe": "none",
            "mlp": "none",
        }
        rows = []
        kept = self.denoiser.slot
        for sub in self.context_walk.subs:
            if sub.index not in kept:
                rows.append(dict(index=sub.index, layer=sub.layer, kind=sub.kind, conditioning="not in denoiser"))
                continue
            cond = [how[sub.kind]] + (["cross_attention"] if cfg.cross_attention else [])
            cond += ["adaln"] if cfg.time_conditioning == "adaln" else []
            rows.append({"index": sub.index, "layer": sub.layer, "kind": sub.kind, "conditioning": "+".join(cond)})
        return rows

    def context_options(self) -> dict:
        """What every context forward of this model must keep for the denoiser, as keyword
        arguments of `twotower.walk.context_forward`: layer inputs for cross-attention, the fused
        keys/values for `fused_kv`."""
        return {"keep_hidden": self.tt_config.cross_attention, "features": self.denoiser.context_features()}

    @property
    def denoiser_layers(self) -> list[int]:
        """The backbone layers the denoiser tower keeps (every layer at full depth)."""
        return sorted({sub.layer for sub in self.denoiser.walk.subs})

    @property
    def full_depth(self) -> bool:
        """True when the denoiser keeps every backbone layer (the paper's design)."""
        return len(self.denoiser.walk.subs) == len(self.context_walk.subs)

    def new_parameter_names(self) -> list[str]:
        """Names of the parameters the backbone does not have (all under `denoiser.`)."""
        return [n for n, _ in self.named_parameters() if n.startswith("denoiser.") and not n.startswith("denoiser.backbone.")]  # noqa: E501

    # ---------------------------------------------------------------- training forward
    def sample_noise(self, maskable: torch.Tensor, generator: torch.Generator | None = None):
        """maskable `[b, n, B]` -> (t `[b, n]`, mask `[b, n, B]`): t_k ~ U(t_min, 1),
        stratified across the batch's blocks; each position masked w.p. t_k, at least one per block."""
        b, n, B = maskable.shape
        dev = maskable.device
        u = (torch.rand((), generator=generator).to(dev) + torch.arange(b * n, device=dev) / (b * n)) % 1.0
        u = u[torch.randperm(b * n, generator=generator).to(dev)]
        t = (self.tt_config.t_min + (1 - self.tt_config.t_min) * u).view(b, n)
        draw = torch.rand(b, n, B, generator=generator).to(dev)
        mask = (draw < t[..., None]) & maskable
        if self.tt_config.suffix_mask_prob > 0:  # some blocks: the last fraction t of the maskable positions
            rank = maskable.long().cumsum(-1) - 1
            keep = ((1 - t) * maskable.sum(-1)).floor()  # leading maskable positions left clean
            suffix = maskable & (rank >= keep[..., None])
            pick_suffix = torch.rand(b, n, generator=generator).to(dev) < self.tt_config.suffix_mask_prob
            mask = torch.where(pick_suffix[..., None], suffix, mask)
        # at least one masked position in every block that has a maskable one
        empty = ~mask.any(-1) & maskable.any(-1)
        pick = F.one_hot((draw.masked_fill(~maskable, -1.0)).argmax(-1), B).bool()
        return t, mask | (pick & empty[..., None])

    def forward(
        self,
        input_ids: torch.Tensor,
        noise_mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        skip_unmasked_blocks: bool = True,
    ) -> TwoTowerOutput:
        """Training forward over `input_ids` `[b, L]` (L padded internally to whole blocks).

        noise_mask `[b, L]` bool and t `[b, n_blocks]` replace the random draw (both or neither).
        attention_mask `[b, L]` (1 = real token, 0 = pad, left and/or right): pads are exact no-ops
        (masked keys, zeroed Mamba inputs, per-sequence positions), never masked or scored.
        Left-pad each row so its answer starts on a block boundary to match decoding, where the
        first block starts right after the prompt (`twotower.data.block_aligned_batch`).
        loss_mask `[b, L]`: only these positions may be masked and scored (e.g. the answer).
        skip_unmasked_blocks: denoise only the blocks holding a masked position (the same logits
        there, ~n_blocks/answer_blocks times less denoiser work on prompt/answer rows); False runs
        every block (the reference path).
        """
        B = self.block_size
        b, L0 = input_ids.shape
        n = -(-L0 // B)
        L = n * B
        pad_id = pad_id_of(self.backbone_config)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        ids = F.pad(input_ids, (0, L - L0), value=pad_id)
        real = F.pad(real, (0, L - L0), value=False)
        first = self.tt_config.token_shift
        maskable = real if loss_mask is None else real & F.pad(loss_mask.bool(), (0, L - L0), value=False)
        maskable = maskable.view(b, n, B).clone()
        if first:
            maskable[:, :, 0] = False
        if (noise_mask is None) != (t is None):
            raise ValueError("pass both noise_mask and t, or neither")
        draws = []  # (t, mask) per noise draw, all denoised on top of ONE context pass
        if noise_mask is None:
            draws = [self.sample_noise(maskable, generator) for _ in range(self.tt_config.noise_draws)]
        else:
            if noise_mask.shape != input_ids.shape or t.shape != (b, n):
                raise ValueError(f"noise_mask must be {tuple(input_ids.shape)} and t ({b}, {n}); got "
                                 f"{tuple(noise_mask.shape)} and {tuple(t.shape)}")
            mask = F.pad(noise_mask.bool(), (0, L - L0), value=False).view(b, n, B)
            if first and mask[:, :, 0].any():
                raise ValueError("noise_mask sets position 0 of a block, which token shift keeps clean")
            draws = [(t, mask & maskable)]
        ctx_device = next(self.context_tower.parameters()).device
        features = self.denoiser.context_features()
        capture = None if features is None else _LayerOutputs(features)
        with torch.no_grad():
            record: dict = {}
            real_ctx = real.to(ctx_device)
            ctx_hidden, cache = context_forward(self.context_walk, ids.to(ctx_device), TowerCache.empty(b, ctx_device),
                                                valid=real_ctx, chunk=B, record=record,
                                                keep_hidden=self.tt_config.cross_attention, features=capture)
        den_device = next(self.denoiser.parameters()).device
        if ctx_device != den_device:
            cache = cache.to(den_device)
            record = {k: {i: x.to(den_device) for i, x in v.items()} for k, v in record.items()}
        if capture is not None:  # the fusion is trained: its keys/values are made outside no_grad
            kv = features([h.to(den_device) for h in capture.outputs],
                          {i: h.to(den_device) for i, h in capture.inputs.items()}, cache.positions)
            cache = dataclasses.replace(cache, fused_keys={i: k for i, (k, _) in kv.items()},
                                        fused_values={i: v for i, (_, v) in kv.items()})
        ids = ids.to(den_device)
        outs = [self._denoise_draw(ids, mask.to(den_device), t.to(den_device), cache, record, ctx_hidden, real,
                                   L0, skip_unmasked_blocks) for t, mask in draws]
        if len(outs) == 1:
            return outs[0]
        mean = lambda name: torch.stack([getattr(o, name) for o in outs]).mean()  # noqa: E731
        out0 = outs[0]
        return TwoTowerOutput(mean("loss"), out0.logits, mean("masked_accuracy"), mean("elbo"), out0.noise_mask, out0.t)

    def _denoise_draw(self, ids, mask, t, cache, record, ctx_hidden, real, L0, skip_unmasked_blocks) -> TwoTowerOutput:
        """Denoise one noise draw (`mask` `[b, n, B]`, `t` `[b, n]`) of the clean `ids` `[b, L]` on top
        of the context pass (`cache`, `record`, `ctx_hidden`) and score it."""
        B = self.block_size
        b, n = t.shape
        L = n * B
        noisy = ids.view(b, n, B).masked_fill(mask, self.tt_config.mask_token_id or 0).view(b * n, B)
        positions = cache.positions.reshape(b * n, B)
        t_rows, block_mask = t.reshape(b * n), mask.view(b * n, B)
        active = block_mask.any(-1)
        if not skip_unmasked_blocks or bool(active.all()) or not bool(active.any()):
            ctx = TrainingContext(cache, record, self.tt_config, b, n)
            logits = self.denoiser(noisy, block_mask, t_rows, positions, ctx).view(b, L, -1)
        else:  # denoise only the blocks holding a masked position (the others add nothing to the loss)
            blocks = active.nonzero().squeeze(1)
            ctx = TrainingContext(cache, record, self.tt_config, b, n, blocks=blocks)
            out = self.denoiser(noisy[blocks], block_mask[blocks], t_rows[blocks], positions[blocks], ctx)
            logits = out.new_zeros(b * n, B, out.shape[-1]).index_copy(0, blocks, out).view(b, L, -1)
        teacher = self._teacher(ctx_hidden, real, mask.view(b, L)) if self.tt_config.targets != "data" else None
        return self._loss(logits, ids, mask.view(b, L), t, L0, teacher)

    @torch.no_grad()
    def _teacher(self, ctx_hidden: torch.Tensor, real: torch.Tensor, mask: torch.Tensor):
        """The context tower's teacher-forced next-token logits for every masked position, in
        `mask`'s row-major order: `(logits [M, V] float32, usable [M] bool)`. Position p is
        predicted by the context tower's output at p-1 (its LM head run only there); a masked
        position right after a pad (or at a row's start) has no prediction and keeps its data label."""
        b, L = mask.shape
        rows, cols = mask.nonzero(as_tuple=True)
        prev = (cols - 1).clamp(min=0)
        usable = (cols > 0) & real.to(mask.device)[rows, prev]
        dev = ctx_hidden.device
        logits = self.context_walk.logits(ctx_hidden[rows.to(dev), prev.to(dev)]).to(mask.device)
        return logits, usable

    def _loss(self, logits, ids, mask, t, L0, teacher=None) -> TwoTowerOutput:
        b, L, V = logits.shape
        B = self.block_size
        pred = prediction_logits(logits.view(-1, B, V), self.tt_config.token_shift).view(b, L, V)
        labels = ids[mask]
        if teacher is None:
            ce = F.cross_entropy(pred[mask], labels, reduction="none")
        else:  # targets from the context tower (data labels where it has no prediction)
            t_logits, usable = teacher
            labels = torch.where(usable, t_logits.argmax(-1), labels)
            if self.tt_config.targets == "context_greedy":
                ce = F.cross_entropy(pred[mask], labels, reduction="none")
            else:  # context_kl: cross-entropy to the context tower's softmax (= KL + its entropy)
                logp = F.log_softmax(pred[mask], dim=-1)
                soft = -(F.softmax(t_logits, dim=-1) * logp).sum(-1)
                ce = torch.where(usable, soft, -logp.gather(1, labels[:, None]).squeeze(1))
        weight = (1.0 / t.repeat_interleave(B, dim=1))[mask]
        count = mask.sum().clamp(min=1)
        maskable = b * L * (B - 1) / B if self.tt_config.token_shift else b * L
        elbo = (ce * weight).sum() / maskable
        loss = ce.sum() / count if self.tt_config.loss_weighting == "uniform" else elbo
        acc = (pred[mask].argmax(-1) == labels).float().sum() / count  # against the targets trained on
        return TwoTowerOutput(loss, logits[:, :L0], acc, elbo.detach(), mask[:, :L0], t)

    # ---------------------------------------------------------------- decoding
    def generate(self, input_ids, **kwargs):
        """See `twotower.generate.generate`."""
        from twotower.generate import generate

        return generate(self, input_ids, **kwargs)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | Path) -> None:
        """`config.json` (model_type twotower, backbone nested) + `model.safetensors` (shared
        tensors such as tied embeddings stored once)."""
        from safetensors.torch import save_model

        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.twotower = self.tt_config.to_dict()
        self.config.backbone = self.context_tower.config.to_dict()
        # An export must load anywhere: the backbone's `_name_or_path` is the local directory it was
        # loaded from (a run cache), meaningless on another machine, so it is not written.
        self.config.backbone.pop("_name_or_path", None)
        dtype = next(self.context_tower.parameters()).dtype
        self.config.backbone["dtype"] = str(dtype).removeprefix("torch.")  # what the weights are
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(d)
        save_model(self, str(d / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, config=None,
                        **kwargs) -> "TwoTowerForDiffusionLM":
        """Load a directory written by `save_pretrained` (safetensors only, no remote code)."""
        from safetensors.torch import load_model

        d = Path(pretrained_model_name_or_path)
        files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
        if not files:
            raise ValueError(f"{d}: no *.safetensors weights in this checkpoint directory")
        if not (d / "config.json").exists():
            raise ValueError(f"{d}: no config.json in this checkpoint directory")
        if config is None or not isinstance(config, TwoTowerHFConfig):
            data = json.loads((d / "config.json").read_text())
            if data.get("model_type") != "twotower":
                raise ValueError(f"{d}/config.json: model_type is {data.get('model_type')!r}, expected 'twotower'")
            config = TwoTowerHFConfig.from_pretrained(d)
        model = cls(config)
        if len(files) == 1:
            load_model(model, str(files[0]), strict=True)
        else:  # shards: load each into the matching parameters
            from safetensors.torch import load_file

            state = {}
            for f in files:
                state.update(load_file(str(f)))
            missing, unexpected = model.load_state_dict(state, strict=False)
            sd = model.state_dict()
            loaded_ptrs = {sd[k].data_ptr() for k in state if k in sd}
            truly_missing = [k for k in missing if sd[k].data_ptr() not in loaded_ptrs]  # tied: fine
            if unexpected or truly_missing:
                raise ValueError(f"{d}: weights do not match the config: missing {truly_missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        model.context_tower.requires_grad_(False)
        gen_cfg = d / "generation_config.json"
        if gen_cfg.exists():  # `auto` decoding reads its per-batch-size modes from here
            model.auto_modes = auto_modes_of(json.loads(gen_cfg.read_text()), str(gen_cfg))
        return model.eval()


def auto_modes_of(generation_config: dict, where: str) -> dict[int, str] | None:
    """The `auto_modes` table of a generation config (`{"<batch size>": "<mode>"}`, the fastest
    mode meeting the quality target at each measured batch size) as `{int: str}`; None if absent."""
    from twotower.generate import AUTO_CHOICES

    table = generation_config.get("auto_modes")
    if table is None:
        return None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{where}: auto_modes must be a non-empty mapping batch size -> mode, got {table!r}")
    out = {}
    for key, mode in table.items():
        if not str(key).isdigit() or int(key) < 1 or mode not in AUTO_CHOICES:
            raise ValueError(f"{where}: auto_modes[{key!r}] = {mode!r}: keys are batch sizes >= 1, "
                             f"modes one of {AUTO_CHOICES}")
        out[int(key)] = mode
    return out


class _LayerOutputs:
    """A `ContextFeatures` that only keeps what `features` reads (the frozen pass of a training step
    runs under no_grad; the fused keys/values that need gradients are made from these after it)."""

    def __init__(self, features):
        self.layers, self.inputs = features.layers, features.inputs
        self.outputs: list = []

    def __call__(self, outputs, inputs, positions):
        self.outputs, self.inputs = outputs, inputs
        return {}


AutoConfig.register("twotower", TwoTowerHFConfig, exist_ok=True)
AutoModel.register(TwoTowerHFConfig, TwoTowerForDiffusionLM, exist_ok=True)
