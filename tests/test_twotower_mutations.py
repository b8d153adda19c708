"""The conformance kit has no blind spot for what an adapter declares: every window mask, residual
multiplier, post-norm, soft-cap, embedding scale, logit transform and attention scale, and a norm
swapped into the wrong place, makes HF parity fail when it is dropped or changed.

Each case below is a mutant adapter (the family's own adapter with one thing changed) walked over
the family's tiny fixture on sequences longer than its windows; the mutant must miss the HF logits
by far more than the parity tolerance (1e-5). docs/model.md lists the mutations.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from twotower_fixtures import TINY_CONFIGS, VOCAB, tiny_backbone, tiny_twotower

import adapters
from adapters.base import Adapter
from twotower.cache import TowerCache
from twotower.walk import Walk, context_forward

torch.set_num_threads(1)


def _edit(index, **change):
    return lambda subs: [dataclasses.replace(s, **change) if s.index == index else s for s in subs]


def _swap_norms(a, b, field_a="norm", field_b="norm"):
    def edit(subs):
        subs = list(subs)
        na, nb = getattr(subs[a], field_a), getattr(subs[b], field_b)
        subs[a] = dataclasses.replace(subs[a], **{field_a: nb})
        subs[b] = dataclasses.replace(subs[b], **{field_b: na})
        return subs
    return edit


def mutations(name):
    """(label, sublayer edit or None, method overrides) for every declared feature of the fixture."""
    model = tiny_backbone(name)
    adapter = adapters.get(model)
    subs = adapter.sublayers(model)
    out = []
    # a norm in the wrong place: the first two sublayers with distinct input norms, else (families
    # without input norms, e.g. OLMo 2) with distinct post-norms
    for field in ("norm", "post_norm"):
        pair = next(((a, b) for a in subs for b in subs if a.index < b.index and getattr(a, field) is not None
                     and getattr(b, field) is not None and getattr(a, field) is not getattr(b, field)), None)
        if pair is not None:
            a, b = pair
            label = f"swap {field}s of sublayers {a.index} and {b.index}"
            out.append((label, _swap_norms(a.index, b.index, field, field), {}))
            break
    for s in subs:
        if s.window is not None:
            out.append((f"sublayer {s.index}: no window", _edit(s.index, window=None), {}))
        if s.parallel:
            out.append((f"sublayer {s.index}: sequential, not parallel", _edit(s.index, parallel=False), {}))
        if s.residual_scale != 1.0:
            out.append((f"sublayer {s.index}: residual multiplier 1", _edit(s.index, residual_scale=1.0), {}))
        if s.post_norm is not None:
            out.append((f"sublayer {s.index}: no post-norm", _edit(s.index, post_norm=None), {}))
            out.append((f"sublayer {s.index}: norm <-> post-norm",
                        _swap_norms(s.index, s.index, "norm", "post_norm"), {}))
        if s.logit_softcap is not None:
            out.append((f"sublayer {s.index}: no attention soft-cap", _edit(s.index, logit_softcap=None), {}))
        if s.kind == "attention" and abs(adapter.attn_scale(s) - s.mixer.head_dim ** -0.5) > 1e-6:
            out.append((f"sublayer {s.index}: attention scale head_dim^-0.5", None,
                        {"attn_scale": lambda self, sub: sub.mixer.head_dim ** -0.5}))
    if adapter.embedding_scale(model) != 1.0:
        out.append(("embeddings unscaled", None, {"embed": lambda self, m, ids: Adapter.embed(self, m, ids)
                                                  / self.embedding_scale(m)}))
    if type(adapter).logits is not Adapter.logits:
        out.append(("plain LM head logits", None, {"logits": lambda self, m, h: self.lm_head(m)(h)}))
    return out


CASES = [(name, *m) for name in sorted(TINY_CONFIGS) for m in mutations(name)]


def mutant(adapter, edit, methods):
    base = type(adapter)
    body = dict(methods)
    if edit is not None:
        body["sublayers"] = lambda self, model: edit(base.sublayers(self, model))
    return type(f"Mutant{base.__name__}", (base,), body)()


def walk_error(model, adapter) -> float:
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    walk = Walk.of(adapter, model)
    with torch.no_grad():
        hidden, _ = context_forward(walk, ids, TowerCache.empty(2, "cpu"), chunk=4)
        return (walk.logits(hidden) - model(ids).logits.float()).abs().max().item()


@pytest.mark.parametrize("name,label,edit,methods", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_mutation_breaks_hf_parity(name, label, edit, methods):
    model = tiny_backbone(name)
    adapter = adapters.get(model)
    assert walk_error(model, adapter) < 1e-5  # the real adapter passes
    assert walk_error(model, mutant(adapter, edit, methods)) > 1e-3, label


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_kit_covers_every_declared_feature(name):
    """Every fixture's family features appear among the mutations (a fixture that left a window,
    multiplier or post-norm out would have nothing to mutate)."""
    labels = " ".join(m[0] for m in mutations(name))
    family = tiny_backbone(name).config.model_type
    expected = {"nemotron_h": ["swap norms"], "llama": ["swap norms"],
                "mistral": ["no window"], "qwen2": ["no window"], "qwen3": ["no window"],
                "phi3": ["no window", "swap norms"], "phi": ["sequential, not parallel", "swap norms"],
                "olmo2": ["no post-norm", "swap post_norms"],
                "olmo3": ["no window", "no post-norm", "swap post_norms", "norm <-> post-norm"],
                "falcon_h1": ["sequential, not parallel", "residual multiplier 1", "embeddings unscaled",
                              "plain LM head logits", "swap norms"],
                "gemma3_text": ["no window", "no post-norm", "norm <-> post-norm", "embeddings unscaled",
                                "plain LM head logits", "attention scale"],
                "gemma2": ["no window", "no post-norm", "no attention soft-cap", "embeddings unscaled",
                           "plain LM head logits"],
                "granitemoehybrid": ["residual multiplier 1", "embeddings unscaled", "plain LM head logits",
                                     "attention scale"]}
    assert family in expected, f"{family}: list its declared features here (an unlisted family would pass vacuously)"
    expected = expected[family]
    for feature in expected:
        assert feature in labels, (name, feature)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_embedding_rule(name):
    """`embed(ids)` is the raw table's rows times `embedding_scale` (what seeds [MASK])."""
    model = tiny_backbone(name)
    adapter = adapters.get(model)
    ids = torch.arange(VOCAB)[None]
    with torch.no_grad():
        expected = adapter.embedding_weight(model)[ids] * adapter.embedding_scale(model)
        torch.testing.assert_close(adapter.embed(model, ids), expected, atol=1e-5, rtol=1e-5)
        # the denoiser's [MASK] embedding starts at the mean of what `embed` gives, not of raw rows
        seed = tiny_twotower(name).denoiser.mask_embedding
        torch.testing.assert_close(seed, adapter.embed(model, ids)[0].mean(0), atol=1e-5, rtol=1e-5)


def test_runtime_reads_no_family_config_field():
    """No file under twotower/ reads, off a config, a field that only some families' configs have
    (the adapter does): the fields of every fixture's config beyond `PretrainedConfig`'s own, token
    ids excepted (every causal LM has them, with one meaning)."""
    import re
    from pathlib import Path

    from transformers import PretrainedConfig

    base = set(PretrainedConfig().to_dict())
    fields = set()
    for name in TINY_CONFIGS:
        fields |= set(TINY_CONFIGS[name]().to_dict()) - base
    fields -= {"model_type", "dtype", "eos_token_id", "pad_token_id", "bos_token_id"}
    sources = {p.name: p.read_text() for p in (Path(__file__).resolve().parent.parent / "twotower").glob("*.py")}
    hits = [(f, field) for f, text in sources.items() for field in sorted(fields)
            if re.search(rf"(config\.{field}\b|getattr\(\w*config\w*, [\"']{field}[\"'])", text, re.I)]
    assert not hits, hits


@pytest.mark.parametrize("module", ["twotower.walk", "twotower.block_context"])
def test_dropping_runtime_windows_fails_the_kit(module, monkeypatch):
    """The runtime applies the windows the adapter declares: without them in the context walk, HF
    parity fails; without them in the denoiser's block contexts, the zero-init identity (the real
    denoiser forward against the context tower) fails."""
    import importlib

    from twotower import checks

    name = "mistral"
    model = tiny_twotower(name)
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    assert walk_error(model.context_tower, model.adapter) < 1e-5
    assert checks.zero_init_identity(model, ids) < 1e-5
    target = importlib.import_module(module)
    monkeypatch.setattr(target, "window_mask", lambda q, k, w: torch.ones(q.shape[0], 1, q.shape[1], k.shape[1],
                                                                         dtype=torch.bool))
    if module == "twotower.walk":
        assert walk_error(model.context_tower, model.adapter) > 1e-3
    else:
        assert checks.zero_init_identity(model, ids) > 1e-3


SCALED = [(name, field) for name in sorted(TINY_CONFIGS)
          for field in adapters.get(TINY_CONFIGS[name]()).scale_fields]


@pytest.mark.parametrize("name,field", SCALED, ids=[f"{n}: {f}" for n, f in SCALED])
def test_each_multiplier_applied_inside_adapter_code_matters(name, field):
    """A multiplier the adapter applies in its own code (`Adapter.scale_fields`): set to 1 on every
    module of a copy of the model, the walk must move off transformers' logits for the original (an
    adapter that forgot to apply it would not move)."""
    import copy

    model = tiny_backbone(name)
    adapter = adapters.get(model)
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits.float()
        reset = copy.deepcopy(model)
        touched = 0
        for module in reset.modules():
            value = getattr(module, field, None)
            if value is None:
                continue
            touched += 1
            if isinstance(value, torch.Tensor):
                value.data.fill_(1.0) if isinstance(value, torch.nn.Parameter) else value.fill_(1.0)
            else:
                setattr(module, field, 1.0)
        assert touched, f"{field}: no module of {name} has it"
        walk = Walk.of(adapter, reset)
        hidden, _ = context_forward(walk, ids, TowerCache.empty(2, "cpu"), chunk=4)
        assert (walk.logits(hidden) - want).abs().max().item() > 1e-3, field


def test_olmo3_rotary_table_per_layer_type_matters():
    """OLMo 3's full-attention layers rotate with their own table (YaRN at another base in the
    fixture): a walk giving every layer the sliding layers' table misses transformers' logits."""
    from adapters.rotary import rotary

    model = tiny_backbone("olmo3")
    adapter = adapters.get(model)
    one_table = mutant(adapter, None, {"cos_sin": lambda self, m, attn, x, p: rotary(m, x, p, "sliding_attention")})
    assert walk_error(model, adapter) < 1e-5
    assert walk_error(model, one_table) > 1e-3
