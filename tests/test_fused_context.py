"""The fused context feature (`attention_conditioning=fused_kv`, after DFlash and EAGLE-3).

The outputs of a few context layers are concatenated and projected into one feature per context
position, added through a zero-init gate to the context input each denoiser attention sublayer
makes its context keys/values from. Checked here: at zero gates the keys are the layer-aligned
ones (zero-init identity), the feature reads exactly the layers it names, training and decoding
see the same keys (the decode cache is built incrementally, also through a verified rollback), the
fusion trains, the decoding invariants hold on every family at full and shallow depth, and bad
choices are named.
"""
from __future__ import annotations

import pytest
import torch
from twotower_fixtures import TINY_CONFIGS, VOCAB, tiny_backbone, tiny_twotower

from twotower import TwoTowerConfig, TwoTowerForDiffusionLM, checks
from twotower.block_context import DecodeContext
from twotower.cache import TowerCache
from twotower.walk import context_forward

torch.set_num_threads(1)
NAMES = sorted(TINY_CONFIGS)
B = 4
FUSED = dict(attention_conditioning="fused_kv")


def ids(b, length, seed=0):
    return torch.randint(3, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def noise(b, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, length, generator=g) < 0.5
    mask[:, ::B] = False
    return mask, torch.rand(b, length // B, generator=g) * 0.9 + 0.05


def has_attention(name) -> bool:
    return any(sub.kind == "attention" for sub in tiny_twotower(name).context_walk.subs)


@pytest.mark.parametrize("layers, n, picked", [(4, 30, [0, 10, 19, 29]), (1, 5, [4]), ([2, 3], 5, [2, 3])])
def test_fused_layers_pick_evenly_spaced_or_listed_layers(layers, n, picked):
    assert TwoTowerConfig(fused_layers=layers).fused_context_layers(n) == picked


@pytest.mark.parametrize("kw, message", [
    (dict(fused_layers=0), r"twotower\.fused_layers must be >= 1"),
    (dict(fused_layers=[2, 1]), r"twotower\.fused_layers=\[2, 1\].*ascending"),
    (dict(fused_layers=None), r"twotower\.fused_layers must be an integer"),
    (dict(attention_conditioning="fused_kv", context_position_keys=4),
     "context_position_keys needs attention_conditioning=context_kv"),
])
def test_bad_fused_choices_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        TwoTowerConfig(**kw)


def test_fused_layers_the_backbone_lacks_are_named():
    with pytest.raises(ValueError, match=r"twotower\.fused_layers names layer\(s\) \[7\]"):
        tiny_twotower("llama", fused_layers=[0, 7], **FUSED)


def test_validate_names_fused_layers_at_config_time():
    """`pipeline validate` reads the backbone's layer count offline (the shipped Nemotron-3-Nano
    config, 52 layers) and stops on a fused layer it lacks; without fused_kv the key is unused."""
    from pathlib import Path

    from pipeline.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[1] / "recipes/nemotron_nano.yaml"
    with pytest.raises(ConfigError, match=r"twotower\.fused_layers names layer\(s\) \[60\].*52 layers"):
        load_config(recipe, ["twotower.attention_conditioning=fused_kv", "twotower.fused_layers=[3,60]"])
    load_config(recipe, ["twotower.attention_conditioning=fused_kv", "twotower.fused_layers=[3,51]"])


def test_fusion_reads_exactly_the_named_layers():
    """Perturbing a context layer's output changes the fused keys only when that layer is fused
    (the fused feature of layer 0 and the last; a middle layer's change reaches the last only
    through the layers after it, so perturb the last-but-one's MLP and compare with/without)."""
    model = tiny_twotower("llama", perturb=0.05, fused_layers=[0], **FUSED)  # (perturbed: the gates open)
    n_layers = 1 + max(sub.layer for sub in model.context_walk.subs)
    x = ids(1, 6, seed=1)
    feats = model.denoiser.context_features()
    assert feats.layers == frozenset([0])
    _, base = context_forward(model.context_walk, x, TowerCache.empty(1, "cpu"), chunk=B, features=feats)
    with torch.no_grad():  # a later layer changes: layer 0's output, so the fused keys, must not
        for p in model.context_tower.model.layers[n_layers - 1].parameters():
            p.add_(0.5)
    _, after = context_forward(model.context_walk, x, TowerCache.empty(1, "cpu"), chunk=B, features=feats)
    assert base.fused_keys.keys() == after.fused_keys.keys() and base.fused_keys
    for i in base.fused_keys:
        torch.testing.assert_close(base.fused_keys[i], after.fused_keys[i])
    assert any(not torch.equal(base.keys[i], after.keys[i]) for i in base.keys)  # the tower did change
    last = tiny_twotower("llama", perturb=0.05, fused_layers=1, **FUSED)
    feats = last.denoiser.context_features()
    _, before = context_forward(last.context_walk, x, TowerCache.empty(1, "cpu"), chunk=B, features=feats)
    with torch.no_grad():
        for p in last.context_tower.model.layers[n_layers - 1].parameters():
            p.add_(0.5)
    _, changed = context_forward(last.context_walk, x, TowerCache.empty(1, "cpu"), chunk=B, features=feats)
    assert all((before.fused_keys[i] - changed.fused_keys[i]).abs().max() > 1e-3 for i in before.fused_keys)


@pytest.mark.parametrize("name", [n for n in NAMES if n in ("llama", "nemotron_h", "gemma3_text", "granitemoehybrid")])
@pytest.mark.parametrize("depth", [None, 1])
def test_fused_training_logits_equal_decode_logits(name, depth):
    """Block k's training logits equal the decode path's on a cache built block by block with the
    denoiser's context features (the fused keys grow with the cache)."""
    model = tiny_twotower(name, perturb=0.05, denoiser_layers=depth, fused_layers=2, **FUSED)
    x = ids(2, 16, seed=3)
    mask, t = noise(2, 16, seed=3)
    opts = model.context_options()
    with torch.no_grad():
        train = model(x, noise_mask=mask, t=t, skip_unmasked_blocks=False).logits
        cache = TowerCache.empty(2, "cpu")
        for k in range(16 // B):
            block = x[:, k * B:(k + 1) * B]
            m = mask[:, k * B:(k + 1) * B]
            positions = cache.next_pos[:, None] + torch.arange(B)
            dec = model.denoiser(block.masked_fill(m, 0), m, t[:, k], positions,
                                 DecodeContext(cache, model.tt_config, B))
            torch.testing.assert_close(dec, train[:, k * B:(k + 1) * B], atol=2e-5, rtol=1e-5)
            _, cache = context_forward(model.context_walk, block, cache, chunk=B, **opts)


def test_decode_cache_without_features_is_a_clear_error():
    model = tiny_twotower("llama", **FUSED)
    _, cache = context_forward(model.context_walk, ids(1, 5), TowerCache.empty(1, "cpu"), chunk=B)
    with pytest.raises(ValueError, match="no fused keys for sublayer .*features=model.denoiser.context_features"):
        model.denoiser(ids(1, B), torch.ones(1, B, dtype=torch.bool), torch.full((1,), 0.5),
                       cache.next_pos[:, None] + torch.arange(B), DecodeContext(cache, model.tt_config, B))


@pytest.mark.parametrize("name", ["llama", "nemotron_h", "gemma2"])
def test_zero_gates_give_the_layer_aligned_keys_and_the_identity(name):
    """With the gates at their zero init the fused keys are the context tower's own keys (the
    layer-aligned wiring) and the full-depth denoiser computes the backbone (invariant 4); with
    the gates open the keys move."""
    model = tiny_twotower(name, **FUSED)
    _, cache = context_forward(model.context_walk, ids(2, 7), TowerCache.empty(2, "cpu"), chunk=B,
                               **model.context_options())
    assert cache.fused_keys and cache.fused_keys.keys() <= cache.keys.keys()
    for i in cache.fused_keys:
        torch.testing.assert_close(cache.fused_keys[i], cache.keys[i], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache.fused_values[i], cache.values[i], atol=1e-6, rtol=1e-6)
    assert checks.zero_init_identity(model, ids(1, 9)) <= 1e-4
    opened = tiny_twotower(name, perturb=0.05, **FUSED)
    _, moved = context_forward(opened.context_walk, ids(2, 7), TowerCache.empty(2, "cpu"), chunk=B,
                               **opened.context_options())
    assert all((moved.fused_keys[i] - moved.keys[i]).abs().max() > 1e-4 for i in moved.fused_keys)


@pytest.mark.parametrize("name", NAMES)
def test_fused_denoiser_decodes_exactly_on_every_family(name, tmp_path):
    """verified and mock_ar equal ar (the rollback cuts the fused keys too), diffusion runs, and a
    save/load round trip keeps the fusion (same diffusion output)."""
    model = tiny_twotower(name, perturb=0.05, denoiser_layers=2, fused_layers=2, **FUSED)
    # the copy starts as the backbone
    assert checks.kept_layers_match(model, tiny_backbone(name, seed=0, scale=1.0)) == []
    prompts = [ids(1, 5, seed=1)[0].tolist(), ids(1, 3, seed=2)[0].tolist()]
    kw = dict(max_new_tokens=10, block_size=B, eos_token_id=-1)
    ar = model.generate(prompts, mode="ar", **kw).sequences
    for mode, extra in (("mock_ar", {}), ("verified", dict(gamma=0.3)), ("verified", dict(gamma=0.3, draft="full"))):
        assert torch.equal(model.generate(prompts, mode=mode, **kw, **extra).sequences, ar), (mode, extra)
    g = dict(mode="diffusion", gamma=0.6, **kw)
    out = model.generate(prompts, **g).sequences
    model.save_pretrained(tmp_path)
    loaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.generate(prompts, **g).sequences, out)
    if has_attention(name):
        assert any(k.startswith("denoiser.fusion.") for k in dict(loaded.named_parameters()))


def test_fusion_trains_and_changes_what_the_denoiser_reads():
    """The fusion gets gradients through every attention layer's context keys, and an optimizer
    step on it changes the logits of blocks that have context (not block 0)."""
    model = tiny_twotower("nemotron_h", perturb=0.05, fused_layers=2, **FUSED).train()
    x = ids(2, 12, seed=5)
    mask, t = noise(2, 12, seed=5)
    out = model(x, noise_mask=mask, t=t, skip_unmasked_blocks=False)
    out.loss.backward()
    fusion = model.denoiser.fusion
    assert fusion.proj.weight.grad is not None and fusion.proj.weight.grad.abs().sum() > 0
    assert fusion.norm_weight.grad.abs().sum() > 0
    assert all(g.grad.abs().sum() > 0 for g in fusion.gate.values())
    before = out.logits.detach()
    with torch.no_grad():
        fusion.proj.weight.add_(torch.randn_like(fusion.proj.weight) * 0.1)
        after = model(x, noise_mask=mask, t=t, skip_unmasked_blocks=False).logits
    torch.testing.assert_close(after[:, :B], before[:, :B])  # block 0 sees no context
    assert (after[:, B:] - before[:, B:]).abs().max() > 1e-3


def test_layer_map_and_new_parameters_name_the_fusion():
    model = tiny_twotower("nemotron_h", fused_layers=2, **FUSED)
    conds = {row["kind"]: row["conditioning"] for row in model.layer_map()}
    assert conds["attention"].startswith("fused_kv") and conds["mamba"].startswith("seeded_state")
    names = set(model.new_parameter_names())
    assert {"denoiser.fusion.proj.weight", "denoiser.fusion.norm_weight"} <= names
    assert {f"denoiser.fusion.gate.{sub.index}" for sub in model.denoiser.walk.subs if sub.kind == "attention"} <= names


def test_draft_quality_scores_the_first_draft_step_against_the_context_towers_greedy():
    """bench/draft_quality.py's score: per-position accuracy and teacher-forced acceptance equal a
    direct loop over the blocks (each block's drafts from one all-masked denoiser forward against
    the context tower's teacher-forced greedy tokens); block 0 and blocks with pads are not scored."""
    from bench.draft_quality import score
    from twotower.positions import prediction_logits

    model = tiny_twotower("llama", perturb=0.05, fused_layers=2, **FUSED)
    rows = ids(3, 16, seed=7)
    attn = torch.ones_like(rows)
    attn[2, 12:] = 0  # row 2's last block has pads: skipped
    loss_mask = torch.ones_like(rows)
    got = score(model, rows, attn, loss_mask)
    hits, accepted, blocks = [], [], 0
    with torch.no_grad():
        for r in range(3):
            greedy = model.context_walk.logits(context_forward(model.context_walk, rows[r:r + 1],
                                                               TowerCache.empty(1, "cpu"), chunk=B)[0]).argmax(-1)[0]
            for k in range(1, 4):
                if r == 2 and k == 3:
                    continue
                ctx = rows[r:r + 1, : k * B]
                _, cache = context_forward(model.context_walk, ctx, TowerCache.empty(1, "cpu"), chunk=B,
                                           **model.context_options())
                block = rows[r:r + 1, k * B:(k + 1) * B].clone()
                mask = torch.ones(1, B, dtype=torch.bool)
                mask[:, 0] = False
                logits = model.denoiser(block.masked_fill(mask, 0), mask, torch.ones(1),
                                        cache.next_pos[:, None] + torch.arange(B),
                                        DecodeContext(cache, model.tt_config, B))
                pred = prediction_logits(logits, True).argmax(-1)[0]
                right = [bool(pred[j] == greedy[k * B + j - 1]) for j in range(1, B)]
                hits.append(right)
                n = 0
                while n < len(right) and right[n]:
                    n += 1
                accepted.append(1 + n)
                blocks += 1
    assert got["blocks"] == blocks == 8
    assert got["acc_pos1"] == pytest.approx(sum(h[0] for h in hits) / blocks)
    assert got["acc_all"] == pytest.approx(sum(map(sum, hits)) / (blocks * (B - 1)))
    assert got["teacher_forced_acceptance"] == pytest.approx(sum(accepted) / blocks)
