"""Denoiser depth (`twotower.denoiser_layers`) and targets from the context tower (`twotower.targets`).

A shallow denoiser keeps some backbone layers, each starting from the backbone's weights and still
reading its *own* layer of the context tower; every decoding invariant that does not need the
zero-init identity holds at every depth (verified == ar, mock_ar == ar, save/load). The context
targets are checked against the HF backbone's own teacher-forced logits, computed independently.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from twotower_fixtures import TINY_CONFIGS, VOCAB, tiny_backbone, tiny_twotower

from twotower import TwoTowerConfig, TwoTowerForDiffusionLM, checks
from twotower.block_context import DecodeContext
from twotower.cache import TowerCache
from twotower.walk import context_forward

torch.set_num_threads(1)
NAMES = sorted(TINY_CONFIGS)
B = 4


def ids(b, length, seed=0):
    return torch.randint(3, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layers, n, kept", [
    (None, 5, [0, 1, 2, 3, 4]), (1, 30, [29]), (2, 30, [0, 29]), (4, 30, [0, 10, 19, 29]),
    (5, 5, [0, 1, 2, 3, 4]), ([3, 7], 30, [3, 7]), ((0,), 2, [0])])
def test_kept_layers(layers, n, kept):
    assert TwoTowerConfig(denoiser_layers=layers).kept_layers(n) == kept


@pytest.mark.parametrize("layers, message", [
    (0, ">= 1"), (-2, ">= 1"), ([], "empty list"), ([3, 1], "ascending"), ([1, 1], "distinct"),
    ([-1], ">= 0"), ("two", "integer k"), (True, "integer k"), ([1.5], "integer k")])
def test_bad_denoiser_layers_are_named(layers, message):
    with pytest.raises(ValueError, match=r"twotower\.denoiser_layers.*" + message):
        TwoTowerConfig(denoiser_layers=layers)


@pytest.mark.parametrize("layers, message", [(3, "has only 2 layers"), ([0, 5], r"names layer\(s\) \[5\]")])
def test_layers_the_backbone_lacks_are_named(layers, message):
    with pytest.raises(ValueError, match=r"twotower\.denoiser_layers.*" + message):
        tiny_twotower("llama", denoiser_layers=layers)


def test_context_targets_need_token_shift():
    with pytest.raises(ValueError, match="twotower.targets='context_greedy' needs token_shift"):
        TwoTowerConfig(targets="context_greedy", token_shift=False)
    with pytest.raises(ValueError, match="twotower.targets must be one of"):
        TwoTowerConfig(targets="teacher")


@pytest.mark.parametrize("name", NAMES)
def test_shallow_denoiser_is_smaller_starts_from_the_backbone_and_decodes_exactly(name):
    """One kept layer: fewer parameters, the dropped layer never copied, the kept one bit-identical
    to the backbone's; verified and mock_ar equal ar token for token, on every family."""
    backbone = tiny_backbone(name)
    full = TwoTowerForDiffusionLM.from_backbone(tiny_backbone(name), TwoTowerConfig(block_size=B))
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=B, denoiser_layers=1)).eval()
    n_layers = 1 + max(sub.layer for sub in model.context_walk.subs)
    assert model.denoiser_layers == [n_layers - 1] and not model.full_depth and full.full_depth
    assert sum(p.numel() for p in model.denoiser.parameters()) < sum(p.numel() for p in full.denoiser.parameters())
    assert checks.kept_layers_match(model, backbone) == []
    assert all(sub.layer == n_layers - 1 for sub in model.denoiser.walk.subs)
    dropped = [row for row in model.layer_map() if row["conditioning"] == "not in denoiser"]
    assert {row["layer"] for row in dropped} == set(range(n_layers - 1))
    with torch.no_grad():  # perturb the kept layer so the check below is not vacuous
        for p in model.denoiser.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert checks.kept_layers_match(model, backbone)
    prompts = [ids(1, 5, seed=1)[0].tolist(), ids(1, 3, seed=2)[0].tolist()]
    ar = model.generate(prompts, mode="ar", max_new_tokens=10, block_size=B)
    for mode in ("verified", "mock_ar"):
        out = model.generate(prompts, mode=mode, max_new_tokens=10, block_size=B)
        assert torch.equal(out.sequences, ar.sequences), mode
    model.generate(prompts, mode="diffusion", max_new_tokens=10, block_size=B)


@pytest.mark.parametrize("name", ["nemotron_h", "gemma3_text", "granitemoehybrid"])
def test_shallow_save_load_round_trip(name, tmp_path):
    model = tiny_twotower(name, denoiser_layers=[0], perturb=0.1)
    model.save_pretrained(tmp_path)
    back = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    assert back.denoiser_layers == [0]
    x = ids(2, 12)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 1::4] = True
    t = torch.full((2, 3), 0.5)
    torch.testing.assert_close(back(x, noise_mask=mask, t=t).logits, model(x, noise_mask=mask, t=t).logits)


@pytest.mark.parametrize("name", ["llama", "nemotron_h"])
def test_kept_layer_reads_its_own_context_layer(name):
    """Layer alignment: a denoiser of layer [1] reads the context tower's sublayers of layer 1 and
    no other: changing the context keys or states of another layer changes nothing, of layer 1
    changes the logits."""
    model = tiny_twotower(name, denoiser_layers=[1], perturb=0.1)
    x = ids(1, 6)
    with torch.no_grad():
        _, cache = context_forward(model.context_walk, x, TowerCache.empty(1, "cpu"), chunk=B)
        tokens = torch.zeros(1, B, dtype=torch.long)
        is_mask = torch.ones(1, B, dtype=torch.bool)
        pos = cache.next_pos[:, None] + torch.arange(B)

        def logits(c):
            return model.denoiser(tokens, is_mask, torch.ones(1), pos, DecodeContext(c, model.tt_config, B))

        ref = logits(cache)
        own = {s.index for s in model.denoiser.walk.subs}
        for i in set(cache.keys) | set(cache.ssm):
            shifted = cache.clone()
            for table in (shifted.keys, shifted.values, shifted.ssm):
                if i in table:
                    table[i] = table[i] + 1.0
            changed = not torch.allclose(logits(shifted), ref)
            assert changed == (i in own), (i, own)


def _teacher_logits(backbone, x):
    with torch.no_grad():
        return backbone(x).logits  # [b, L, V]: position p predicts token p+1


@pytest.mark.parametrize("name", ["llama", "nemotron_h"])
def test_context_targets_match_the_backbones_own_predictions(name):
    """`context_greedy` is cross-entropy to the backbone's argmax at p-1 and `context_kl` the
    cross-entropy to its softmax, at every masked position, computed here from the HF forward."""
    x = ids(2, 16, seed=3)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 16, generator=g) < 0.5
    mask[:, ::B] = False
    t = torch.full((2, 4), 0.5)
    teacher = _teacher_logits(tiny_backbone(name), x)
    prev = torch.zeros_like(mask)
    prev[:, :-1] = mask[:, 1:]
    for targets in ("data", "context_greedy", "context_kl"):
        model = tiny_twotower(name, block_size=B, perturb=0.1, targets=targets)
        out = model(x, noise_mask=mask, t=t)
        pred = torch.cat([torch.zeros_like(out.logits[:, :1]), out.logits[:, :-1]], 1)  # [b, L]: predicts token p
        logp = F.log_softmax(pred[mask], -1)
        if targets == "data":
            want = -logp.gather(1, x[mask][:, None]).mean()
        elif targets == "context_greedy":
            want = -logp.gather(1, teacher[prev].argmax(-1)[:, None]).mean()
        else:
            want = -(F.softmax(teacher[prev], -1) * logp).sum(-1).mean()
        torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    greedy = tiny_twotower(name, block_size=B, perturb=0.1, targets="context_greedy")(x, noise_mask=mask, t=t)
    data = tiny_twotower(name, block_size=B, perturb=0.1, targets="data")(x, noise_mask=mask, t=t)
    assert not torch.allclose(greedy.loss, data.loss)  # random ids: the backbone disagrees with the data


def test_context_targets_fall_back_to_data_after_a_pad():
    """A masked position right after a left pad has no context prediction: it keeps its label."""
    model = tiny_twotower("llama", block_size=B, perturb=0.1, targets="context_greedy")
    data = tiny_twotower("llama", block_size=B, perturb=0.1, targets="data")
    x = ids(1, 8)
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 1] = True  # first real token, right after the pad
    t = torch.full((1, 2), 0.5)
    torch.testing.assert_close(model(x, noise_mask=mask, t=t, attention_mask=attn).loss,
                               data(x, noise_mask=mask, t=t, attention_mask=attn).loss)


def test_shallow_denoiser_trains_toward_greedy_targets():
    """A few optimizer steps on the greedy targets raise agreement with the context tower."""
    torch.manual_seed(0)
    model = tiny_twotower("llama", block_size=B, denoiser_layers=[1], targets="context_greedy").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x = ids(8, 16, seed=5)
    first = None
    for _ in range(30):
        out = model(x, generator=torch.Generator().manual_seed(1))
        first = first if first is not None else float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.loss.detach()) < 0.7 * first


def test_noise_draws_share_one_context_pass():
    """K noise draws: the loss is the mean of K single-draw losses with the same generator stream,
    and the frozen context forward runs once."""
    import twotower.model as tm

    x = ids(2, 16, seed=4)
    one = tiny_twotower("nemotron_h", block_size=B, perturb=0.1)
    many = tiny_twotower("nemotron_h", block_size=B, perturb=0.1, noise_draws=3)
    g = torch.Generator().manual_seed(7)
    maskable = torch.ones(2, 4, B, dtype=torch.bool)
    maskable[:, :, 0] = False
    draws = [one.sample_noise(maskable, g) for _ in range(3)]
    want = torch.stack([one(x, noise_mask=m.view(2, 16), t=t).loss for t, m in draws]).mean()
    calls = []
    real_forward = tm.context_forward
    tm.context_forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    try:
        got = many(x, generator=torch.Generator().manual_seed(7))
    finally:
        tm.context_forward = real_forward
    torch.testing.assert_close(got.loss, want)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="twotower.noise_draws must be an integer >= 1"):
        TwoTowerConfig(noise_draws=0)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "nemotron_h"])
def test_shared_embeddings_are_the_context_towers_and_stay_frozen(name, tmp_path):
    """`share_embeddings`: the denoiser reads the context tower's own embedding and LM head (one
    copy, frozen); training moves only the denoiser's own parameters, and the model saves, loads
    and decodes exactly."""
    from stages.freeze_context import trainable_report

    backbone = tiny_backbone(name)
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = TwoTowerForDiffusionLM.from_backbone(
        backbone, TwoTowerConfig(block_size=B, denoiser_layers=1, share_embeddings=True))
    den, ctx = model.denoiser.backbone, model.context_tower
    assert den.get_input_embeddings() is ctx.get_input_embeddings()
    assert den.get_output_embeddings() is ctx.get_output_embeddings()
    assert trainable_report(model)["violations"] == []
    assert model.denoiser.mask_embedding.requires_grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(ids(2, 12)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, reference[k]) for k, v in ctx.state_dict().items())
    model.eval().save_pretrained(tmp_path)
    back = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    assert back.denoiser.backbone.get_input_embeddings() is back.context_tower.get_input_embeddings()
    prompts = [ids(1, 5, seed=1)[0].tolist()]
    ar = back.generate(prompts, mode="ar", max_new_tokens=9, block_size=B)
    assert torch.equal(back.generate(prompts, mode="verified", max_new_tokens=9, block_size=B).sequences, ar.sequences)
    torch.testing.assert_close(back.generate(prompts, mode="diffusion", max_new_tokens=9, block_size=B).sequences,
                               model.generate(prompts, mode="diffusion", max_new_tokens=9, block_size=B).sequences)


@pytest.mark.parametrize("override, message", [
    ("twotower.denoiser_layers=[0,60]", r"names layer\(s\) \[60\], but the backbone has 52 layers"),
    ("twotower.denoiser_layers=53", "has only 52 layers"),
    ("twotower.denoiser_layers=0", "must be >= 1"),
    ("twotower.targets=teacher", "twotower.targets must be one of")])
def test_validate_names_bad_depths_and_targets_at_config_time(override, message):
    """`pipeline validate` (exit 2) catches a depth the backbone cannot have before anything runs,
    when the backbone's config is readable offline (the shipped Nemotron-3-Nano config here)."""
    from pathlib import Path

    from pipeline.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[1] / "recipes/nemotron_nano.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, [override])
    load_config(recipe, ["twotower.denoiser_layers=[0,51]"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("gamma", [0.05, 0.5, 0.99])
def test_prefix_drafts_stay_exact(name, gamma):
    """draft="prefix" verifies each block only through the first guessed position: the output is
    still `ar`'s token for token, on every family, whether the denoiser is sure or not."""
    model = tiny_twotower(name, denoiser_layers=1, perturb=0.2)
    prompts = [ids(1, 5, seed=1)[0].tolist(), ids(1, 3, seed=2)[0].tolist(), ids(1, 7, seed=3)[0].tolist()]
    ar = model.generate(prompts, mode="ar", max_new_tokens=11, block_size=B)
    out = model.generate(prompts, mode="verified", gamma=gamma, draft="prefix", max_new_tokens=11, block_size=B)
    assert torch.equal(out.sequences, ar.sequences)


def test_prefix_cut_keeps_each_rows_first_guess():
    """The verification covers, for the row that needs most, its positions through its first guess;
    a paused row needs only the context tower's token; a row with no guess needs the whole block."""
    from twotower.decoding import _through_first_guess

    block = torch.arange(24).view(3, 8)
    sure = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 0],     # first guess at 3: needs 4 columns
                         [1, 0, 0, 0, 0, 0, 0, 0],     # first guess at 1: needs 2
                         [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # paused below: needs 1
    drafting = torch.tensor([True, True, False])
    assert torch.equal(_through_first_guess(block, sure, drafting), block[:, :4])
    assert _through_first_guess(block, torch.ones_like(sure), torch.tensor([True, False, False])).shape[1] == 8
    assert _through_first_guess(block, sure, torch.tensor([False, False, False])).shape[1] == 1


def test_params_read_per_forward_counts_a_tied_head_once_and_no_embedding_table():
    from twotower.sizing import params_read_per_forward

    full = tiny_twotower("llama")
    shallow = tiny_twotower("llama", denoiser_layers=[1], share_embeddings=True)
    ctx = full.context_tower
    emb = ctx.get_input_embeddings()
    n_emb = emb.weight.numel()
    total = sum(p.numel() for p in ctx.parameters())  # tied: the table is the head, counted once
    assert params_read_per_forward(ctx, emb) == total  # the tied head is read whole
    den_full = params_read_per_forward(full.denoiser, full.denoiser.backbone.get_input_embeddings())
    den_shallow = params_read_per_forward(shallow.denoiser, shallow.denoiser.backbone.get_input_embeddings())
    assert den_shallow < den_full and den_full > total - n_emb
