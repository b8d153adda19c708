"""Conformance kit: the seven invariants of docs/design.md section 5 for every registered tiny backbone.

A new adapter joins by adding its tiny config to `tests/twotower_fixtures.TINY_CONFIGS`.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel
from twotower_fixtures import EOS, TINY_CONFIGS, VOCAB, tiny_backbone, tiny_twotower

from twotower import TwoTowerForDiffusionLM, place_towers_on_devices
from twotower.block_context import DecodeContext
from twotower.cache import TowerCache
from twotower.walk import context_forward

torch.set_num_threads(1)
NAMES = sorted(TINY_CONFIGS)
B = 4


def rand_ids(b, length, seed=0):
    return torch.randint(3, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def fixed_noise(b, length, seed=0):
    """A noise mask (never position 0 of a block) and times for `[b, length]`."""
    g = torch.Generator().manual_seed(seed)
    n = -(-length // B)
    mask = torch.rand(b, length, generator=g) < 0.5
    mask[:, ::B] = False
    return mask, torch.rand(b, n, generator=g) * 0.9 + 0.05


@pytest.mark.parametrize("length", [13, 70])  # one scan chunk (<= ONE_CHUNK_MAX), chunks of B
@pytest.mark.parametrize("name", NAMES)
def test_context_walk_matches_hf_forward(name, length):
    """Our layer walk of the context tower reproduces the HF model's own logits, and recording the
    block-boundary states (training) changes neither the output nor the cache."""
    backbone = tiny_backbone(name)
    model = TwoTowerForDiffusionLM.from_backbone(backbone)
    ids = rand_ids(2, length)
    with torch.no_grad():
        ref = backbone(ids).logits
        hidden, cache = context_forward(model.context_walk, ids, TowerCache.empty(2, "cpu"), chunk=B)
        rec_hidden, rec_cache = context_forward(model.context_walk, ids, TowerCache.empty(2, "cpu"), chunk=B,
                                                record={})
    torch.testing.assert_close(model.context_walk.logits(hidden), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec_hidden, hidden, atol=1e-5, rtol=1e-5)
    for i in cache.ssm:
        torch.testing.assert_close(rec_cache.ssm[i], cache.ssm[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_incremental_and_left_padded_context_match_full_pass(name):
    """Prefill + block commit + single tokens, with left padding, equal one clean pass."""
    model = tiny_twotower(name)
    walk = model.context_walk
    ids = rand_ids(1, 11)
    with torch.no_grad():
        full, _ = context_forward(walk, ids, TowerCache.empty(1, "cpu"), chunk=B)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:, :5]], 1)
        valid = torch.tensor([[False] * 3 + [True] * 5])
        h1, cache = context_forward(walk, padded, TowerCache.empty(1, "cpu"), valid=valid, chunk=B)
        h2, cache = context_forward(walk, ids[:, 5:9], cache, chunk=B)
        h3, cache = context_forward(walk, ids[:, 9:10], cache, chunk=B)
        h4, cache = context_forward(walk, ids[:, 10:11], cache, chunk=B)
    got = torch.cat([h1[:, 3:], h2, h3, h4], 1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_inv1_context_tower_bit_identical_after_training(name):
    backbone = tiny_backbone(name)
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = TwoTowerForDiffusionLM.from_backbone(backbone)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    den_before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    for step in range(3):
        out = model(rand_ids(2, 12, seed=step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert not any(p.requires_grad for p in model.context_tower.parameters())
    for k, v in model.context_tower.state_dict().items():
        assert torch.equal(v, reference[k]), k
    changed = [k for k, v in model.denoiser.state_dict().items() if not torch.equal(v, den_before[k])]
    assert any(k.startswith("backbone.") for k in changed) and "adaln.weight" in changed


@pytest.mark.parametrize("name", NAMES)
def test_inv2_block_causality(name):
    """Logits of block k do not change when tokens of later blocks change."""
    model = tiny_twotower(name, perturb=0.05)
    ids = rand_ids(2, 16)
    mask, t = fixed_noise(2, 16)
    other = ids.clone()
    other[:, 8:] = rand_ids(2, 8, seed=5)
    with torch.no_grad():
        a = model(ids, noise_mask=mask, t=t).logits
        b = model(other, noise_mask=mask, t=t).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=2e-6, rtol=0)  # MoE expert batches vary: float noise only
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4  # and the later blocks do react


@pytest.mark.parametrize("name", NAMES)
def test_inv3_bidirectional_inside_block(name):
    """Changing a clean token at block position j changes the logits at i < j in that block."""
    model = tiny_twotower(name, perturb=0.05)
    ids = rand_ids(1, 12)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 5] = True  # block 1 = positions 4..7; position 7 stays clean
    t = torch.full((1, 3), 0.5)
    other = ids.clone()
    other[0, 7] = (ids[0, 7] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        a = model(ids, noise_mask=mask, t=t).logits
        b = model(other, noise_mask=mask, t=t).logits
    assert (a[0, 4:7] - b[0, 4:7]).abs().max() > 1e-5
    torch.testing.assert_close(a[0, :4], b[0, :4], atol=2e-6, rtol=0)  # MoE expert batches vary: float noise only


ZERO_INIT_TOL = 1e-5
"""Float rounding between the denoiser's per-block key layout and the context tower's causal one."""


@pytest.mark.parametrize("name", NAMES)
def test_inv4_zero_init_identity(name):
    """The check runs the denoiser's real forward: at zero init it gives the backbone's logits, and
    any new module moved off zero (here the AdaLN output bias) makes it fail."""
    from twotower import checks

    model = tiny_twotower(name)
    ids = rand_ids(2, 9)
    assert checks.zero_init_identity(model, ids) <= ZERO_INIT_TOL
    assert checks.context_matches(model, tiny_backbone(name))
    with torch.no_grad():
        model.denoiser.adaln.bias.add_(0.05)
    assert checks.zero_init_identity(model, ids) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_inv5_mock_ar_equals_ar_odd_prompts_batched(name):
    model = tiny_twotower(name, perturb=0.05)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 5)]
    kw = dict(max_new_tokens=13, eos_token_id=-1)
    ar = model.generate(prompts, mode="ar", **kw)
    mock = model.generate(prompts, mode="mock_ar", **kw)
    assert torch.equal(ar.sequences, mock.sequences)
    assert ar.sequences.shape == (3, 7 + 13)
    assert ar.num_context_forwards == 13 and ar.num_denoiser_forwards == 0
    # each row equals decoding that prompt alone (left padding is exact)
    for i, p in enumerate(prompts):
        alone = model.generate([p], mode="ar", **kw)
        assert alone.generated[0].tolist() == ar.generated[i].tolist()
    # an EOS in the middle of a block: take a token ar emits at step 6 of row 0 as EOS
    eos = int(ar.generated[0, 6])
    ar_e = model.generate(prompts, mode="ar", max_new_tokens=13, eos_token_id=eos, pad_token_id=0)
    mock_e = model.generate(prompts, mode="mock_ar", max_new_tokens=13, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ar_e.sequences, mock_e.sequences)
    assert torch.equal(ar_e.num_generated, mock_e.num_generated)
    row = ar_e.generated[0].tolist()
    assert eos in row and all(x == 0 for x in row[row.index(eos) + 1:])


@pytest.mark.parametrize("name", NAMES)
def test_verified_equals_ar_at_every_gamma_batched_eos_odd_budget(name):
    """`verified` is `ar` token for token: several γ and every draft policy, prompts of different
    lengths in one batch, a budget that is not a multiple of B, an EOS in the middle of a block; and
    the rollback really ran (rows of one verification kept different numbers of tokens)."""
    model = tiny_twotower(name, perturb=0.05)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 5)]
    kw = dict(max_new_tokens=13, eos_token_id=-1)
    ar = model.generate(prompts, mode="ar", **kw)
    kept, paused = [], []
    for gamma in (0.02, 0.5, 1.0):
        for draft in ("full", "confident", 1):
            v = model.generate(prompts, mode="verified", gamma=gamma, draft=draft, return_trace=True, **kw)
            assert torch.equal(v.sequences, ar.sequences), (gamma, draft)
            kept += [steps[-1]["accepted"] for steps in v.trace]
            paused += [not any(m) for steps in v.trace for m in steps[0]["masked"]]
            assert v.num_accepted >= 13 * 3 and 1 <= v.accepted_per_verify <= B
    assert any(len(set(k)) > 1 for k in kept) and any(max(k) > 1 for k in kept)
    assert any(paused) and not all(paused)  # rows whose drafts kept nothing verified blocks without one
    eos = int(ar.generated[0, 6])
    ar_e = model.generate(prompts, mode="ar", max_new_tokens=13, eos_token_id=eos, pad_token_id=0)
    v_e = model.generate(prompts, mode="verified", gamma=0.3, max_new_tokens=13, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ar_e.sequences, v_e.sequences)
    assert torch.equal(ar_e.num_generated, v_e.num_generated) and int(v_e.num_generated[0]) <= 7
    for i, p in enumerate(prompts):  # each row equals decoding that prompt alone
        alone = model.generate([p], mode="verified", gamma=0.5, **kw)
        assert alone.generated[0].tolist() == ar.generated[i].tolist()


@pytest.mark.parametrize("name", ["nemotron_h", "granitemoehybrid", "mistral", "gemma2"])
def test_drop_last_equals_the_cache_of_the_kept_prefix(name):
    """Rolling a block commit back per row (different lengths) leaves a cache that continues
    exactly like one extended by the kept tokens only: K/V, positions, Mamba conv and SSM states."""
    from twotower.decoding import verify_block
    from twotower.rows import Rows, Tally

    model = tiny_twotower(name, perturb=0.05)
    walk = model.context_walk
    prompts = rand_ids(3, 6, seed=1)
    block = rand_ids(3, B, seed=2)
    nxt = rand_ids(3, 3, seed=3)
    with torch.no_grad():
        hidden, cache = context_forward(walk, prompts, TowerCache.empty(3, "cpu"), chunk=B)
        greedy = walk.logits(hidden[:, -1]).argmax(-1)
        block[:, 0] = greedy
        # make row 1 agree with the context tower on its first two drafts: it keeps 3 tokens
        h, _ = context_forward(walk, block[1:2, :1], cache.select(torch.tensor([1])), chunk=B)
        block[1, 1] = walk.logits(h[:, -1]).argmax(-1)
        h, _ = context_forward(walk, block[1:2, :2], cache.select(torch.tensor([1])), chunk=B)
        block[1, 2] = walk.logits(h[:, -1]).argmax(-1)
        block[1, 3] = (walk.logits(h[:, -1]).argmax(-1) + 1) % VOCAB  # a wrong draft after a right one
        rows = Rows(torch.arange(3), greedy, cache, [[] for _ in range(3)])
        kept = verify_block(model, block, rows, model.context_options(),
                            Tally(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)), None)
        assert int(kept[1]) >= 3 and len(set(kept.tolist())) > 1
        got, _ = context_forward(walk, nxt, rows.cache, chunk=B)
        for r in range(3):
            a = int(kept[r])
            _, ref_cache = context_forward(walk, block[r:r + 1, :a], cache.select(torch.tensor([r])), chunk=B)
            ref, _ = context_forward(walk, nxt[r:r + 1], ref_cache, chunk=B)
            torch.testing.assert_close(got[r:r + 1], ref, atol=1e-5, rtol=1e-5)
            assert int(rows.cache.next_pos[r]) == int(ref_cache.next_pos[0])


@pytest.mark.parametrize("mode", ["ar", "diffusion", "verified", "mock_ar"])
def test_finished_rows_leave_the_batch(mode):
    """A row that hits EOS takes part in no later forward; the order of the rows is kept."""
    model = tiny_twotower("nemotron_h", perturb=0.05)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 5, 4)]
    ar = model.generate(prompts, mode="ar", max_new_tokens=13, eos_token_id=-1)
    eos = int(ar.generated[1, 2])
    kw = dict(max_new_tokens=13, eos_token_id=eos, pad_token_id=0, gamma=0.3)
    g = model.generate(prompts, mode=mode, return_trace=True, **kw)
    assert int(g.num_generated.min()) < int(g.num_generated.max())  # some row finished early
    for i, p in enumerate(prompts):
        alone = model.generate([p], mode=mode, **kw)
        assert alone.generated[0].tolist() == g.generated[i, : alone.generated.shape[1]].tolist()
        assert int(alone.row_forwards[0]) == int(g.row_forwards[i])  # no forward after it finished
        assert int(alone.row_denoiser_forwards[0]) == int(g.row_denoiser_forwards[i])
        assert int(alone.row_denoiser_forwards[0]) == alone.num_denoiser_forwards
    assert int(g.row_denoiser_forwards.max()) <= g.num_denoiser_forwards
    if mode == "ar":
        assert torch.equal(g.row_forwards, g.num_generated) and int(g.row_denoiser_forwards.sum()) == 0
    if mode in ("diffusion", "verified"):  # a row with a complete draft sits out its neighbours' steps
        for steps in g.trace:
            for before, after in zip(steps, steps[1:]):
                live = [any(m) for m in before["masked"]]
                assert all(not any(m) for m, alive in zip(after["masked"], live) if not alive)
        assert int(g.row_forwards.sum()) < (g.num_denoiser_forwards + g.num_context_forwards) * len(prompts)


@pytest.mark.parametrize("mode", ["diffusion", "verified", "mock_ar"])
def test_a_row_ended_by_the_context_tower_is_not_denoised(mode):
    """When the context tower's own next token is EOS the row is done: no denoiser step for it."""
    model = tiny_twotower("nemotron_h", perturb=0.05)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 7)]
    eos = int(model.generate(prompts, mode="ar", max_new_tokens=1, eos_token_id=-1).generated[0, 0])
    g = model.generate(prompts, mode=mode, gamma=0.3, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert g.generated[0].tolist()[:1] == [eos] and int(g.num_generated[0]) == 1
    assert int(g.row_forwards[0]) == 1  # the prefill only: it left before the first block
    alone = model.generate(prompts[:1], mode=mode, gamma=0.3, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert int(alone.row_forwards[0]) == 1 and alone.num_denoiser_forwards == 0


@pytest.mark.parametrize("name", NAMES)
def test_ar_matches_hf_greedy(name):
    """Mode `ar` is the backbone's own greedy decoding."""
    model = tiny_twotower(name)
    ids = rand_ids(1, 5)
    ours = model.generate(ids, mode="ar", max_new_tokens=9, eos_token_id=-1)
    with torch.no_grad():
        ref = model.context_tower.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None,
                                           min_new_tokens=9, pad_token_id=0)
    assert ours.sequences.tolist() == ref.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_inv6_training_logits_equal_decode_logits(name):
    """Block k's training-forward logits == the decode path's on the same noisy block, with the
    context cache built incrementally (prefill, then block commits)."""
    model = tiny_twotower(name, perturb=0.05)
    ids = rand_ids(2, 16, seed=3)
    mask, t = fixed_noise(2, 16, seed=3)
    assert_training_logits_equal_decode_logits(model, ids, mask, t)


def assert_training_logits_equal_decode_logits(model, ids, mask, t) -> torch.Tensor:
    """Each block's logits in one training forward (every block) == the denoiser's on that block with
    a DecodeContext over the cache built block by block; returns the training logits."""
    with torch.no_grad():
        train = model(ids, noise_mask=mask, t=t, skip_unmasked_blocks=False).logits  # every block's logits
        cache = TowerCache.empty(ids.shape[0], "cpu")
        for k in range(ids.shape[1] // B):
            block = ids[:, k * B:(k + 1) * B]
            noisy = block.masked_fill(mask[:, k * B:(k + 1) * B], 0)
            positions = cache.next_pos[:, None] + torch.arange(B)
            ctx = DecodeContext(cache, model.tt_config, B)
            dec = model.denoiser(noisy, mask[:, k * B:(k + 1) * B], t[:, k], positions, ctx)
            torch.testing.assert_close(dec, train[:, k * B:(k + 1) * B], atol=2e-5, rtol=1e-5)
            _, cache = context_forward(model.context_walk, block, cache, chunk=B)
    return train


@pytest.mark.parametrize("name", ["nemotron_h", "llama"])
def test_context_position_keys_train_equals_decode_and_act(name):
    """With (perturbed) context position keys, block k's training logits still equal the decode
    path's on an incrementally built cache, the keys change those logits, and at zero init they
    change nothing."""
    model = tiny_twotower(name, perturb=0.05, context_position_keys=8)
    ids = rand_ids(2, 16, seed=3)
    mask, t = fixed_noise(2, 16, seed=3)
    train = assert_training_logits_equal_decode_logits(model, ids, mask, t)
    with torch.no_grad():
        for p in model.denoiser.context_key_pos.values():
            p.zero_()
        plain = model(ids, noise_mask=mask, t=t, skip_unmasked_blocks=False).logits
    reference = tiny_twotower(name, perturb=0.05)  # the same perturbation of every other new module
    with torch.no_grad():
        ref = reference(ids, noise_mask=mask, t=t, skip_unmasked_blocks=False).logits
    later = slice(B, None)  # block 0 has no context keys to shift
    assert (train[:, later] - plain[:, later]).abs().max() > 1e-3
    torch.testing.assert_close(plain, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_inv7_export_round_trip(name, tmp_path):
    model = tiny_twotower(name, perturb=0.05)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "twotower"
    assert not list(tmp_path.glob("*.bin"))
    loaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, TwoTowerForDiffusionLM)
    ids = rand_ids(2, 12)
    mask, t = fixed_noise(2, 12)
    with torch.no_grad():
        a = model(ids, noise_mask=mask, t=t).logits
        for other in (loaded, auto):
            assert torch.equal(a, other(ids, noise_mask=mask, t=t).logits)
    kw = dict(mode="diffusion", gamma=0.7, max_new_tokens=10)
    assert torch.equal(model.generate(ids[:, :5], **kw).sequences, loaded.generate(ids[:, :5], **kw).sequences)


@pytest.mark.parametrize("name", NAMES)
def test_diffusion_decoding_batch_counts_and_eos(name):
    model = tiny_twotower(name, perturb=0.05)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 6)]
    g = model.generate(prompts, mode="diffusion", gamma=0.5, max_new_tokens=10, eos_token_id=-1, return_trace=True)
    assert g.generated.shape == (2, 10)
    # 3 blocks of 4 cover 10 tokens: 1 prefill + 2 commits; each block needs 1..3 denoiser steps
    assert g.num_context_forwards == 3 and 3 <= g.num_denoiser_forwards <= 9
    assert len(g.trace) == 3 and all(not any(map(any, s[-1]["masked"])) for s in g.trace)
    assert all(any(map(any, s[0]["masked"])) for s in g.trace)  # each block starts masked
    # gamma=1 can still commit (at least one position per step): B-1 steps per block
    g1 = model.generate(prompts, mode="diffusion", gamma=1.0, max_new_tokens=8, eos_token_id=-1)
    assert g1.num_denoiser_forwards in (4, 6)
    # batched equals alone
    for i, p in enumerate(prompts):
        alone = model.generate([p], mode="diffusion", gamma=0.5, max_new_tokens=10, eos_token_id=-1)
        assert alone.generated[0].tolist() == g.generated[i].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_place_towers_on_devices_cpu(name):
    model = tiny_twotower(name, perturb=0.05)
    ids = rand_ids(1, 6)
    before = model.generate(ids, mode="diffusion", max_new_tokens=8).sequences
    place_towers_on_devices(model, context_device="cpu", denoiser_device="cpu")
    assert torch.equal(before, model.generate(ids, mode="diffusion", max_new_tokens=8).sequences)
    assert model(ids).loss.isfinite()


def test_layer_map_lists_every_kind():
    model = tiny_twotower("nemotron_h")
    kinds = [r["kind"] for r in model.layer_map()]
    assert kinds == ["mamba", "attention", "moe", "mamba", "mlp"]
    assert model.layer_map()[1]["conditioning"].startswith("context_kv")
    assert model.layer_map()[0]["conditioning"].startswith("seeded_state")


@pytest.mark.parametrize("name", NAMES)
def test_inv6_block_aligned_left_padded_training_equals_decoding(name):
    """With answers left-aligned to block boundaries (pads as exact no-ops), the training logits
    of the first answer block equal the decode path's logits right after prefilling the prompt."""
    from twotower.data import block_aligned_batch

    model = tiny_twotower(name, perturb=0.05)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 6)]
    answers = [rand_ids(1, 6, seed=10 + i)[0].tolist() for i in range(2)]
    batch = block_aligned_batch(prompts, answers, B, pad_id=0)
    starts = [4, 8]
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for i, s in enumerate(starts):
        mask[i, s + 1], mask[i, s + 3] = True, True
    t = torch.full((2, batch["input_ids"].shape[1] // B), 0.4)
    with torch.no_grad():
        train = model(batch["input_ids"], noise_mask=mask, t=t, attention_mask=batch["attention_mask"]).logits
        for i, (p, s) in enumerate(zip(prompts, starts)):
            _, cache = context_forward(model.context_walk, torch.tensor([p]), TowerCache.empty(1, "cpu"), chunk=B)
            block = batch["input_ids"][i:i + 1, s:s + B]
            m = mask[i:i + 1, s:s + B]
            dec = model.denoiser(block.masked_fill(m, 0), m, t[i:i + 1, 0], cache.next_pos[:, None] + torch.arange(B),
                                 DecodeContext(cache, model.tt_config, B))
            torch.testing.assert_close(dec, train[i:i + 1, s:s + B], atol=2e-5, rtol=1e-5)


VARIANTS = {
    "cross_attention": dict(cross_attention=True),
    "no_adaln": dict(time_conditioning="none", block_position_embedding=False),
    "no_token_shift": dict(token_shift=False),
    "mask_token_id": dict(mask_token_id=3),
    "ablations": dict(attention_conditioning="none", mamba_conditioning="zero_state", loss_weighting="elbo"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_keep_invariants(variant, tmp_path):
    """Every TwoTowerConfig option keeps zero-init identity, train/decode consistency, mock_ar ==
    ar == verified, trains, and round-trips (on the Nemotron-H tiny config, which has every layer kind)."""
    from twotower import checks

    assert checks.zero_init_identity(tiny_twotower("nemotron_h", **VARIANTS[variant]), rand_ids(1, 9)) <= ZERO_INIT_TOL
    model = tiny_twotower("nemotron_h", perturb=0.05, **VARIANTS[variant])
    shift = model.tt_config.token_shift
    ids = rand_ids(2, 8, seed=4)
    mask, t = fixed_noise(2, 8, seed=4)
    if not shift:
        mask[:, 4] = True
    with torch.no_grad():
        train = model(ids, noise_mask=mask, t=t).logits
        _, cache = context_forward(model.context_walk, ids[:, :4], TowerCache.empty(2, "cpu"), chunk=B,
                                   keep_hidden=model.tt_config.cross_attention)
        fill = model.tt_config.mask_token_id or 0
        dec = model.denoiser(ids[:, 4:].masked_fill(mask[:, 4:], fill), mask[:, 4:], t[:, 1],
                             cache.next_pos[:, None] + torch.arange(B), DecodeContext(cache, model.tt_config, B))
    torch.testing.assert_close(dec, train[:, 4:], atol=2e-5, rtol=1e-5)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 6)]
    kw = dict(max_new_tokens=9, eos_token_id=-1)
    ar = model.generate(prompts, mode="ar", **kw).sequences
    assert torch.equal(ar, model.generate(prompts, mode="mock_ar", **kw).sequences)
    for draft in ("full", 1):  # the rollback also cuts cross-attention's hidden states
        assert torch.equal(ar, model.generate(prompts, mode="verified", gamma=0.3, draft=draft, **kw).sequences)
    out = model(rand_ids(2, 8))
    out.loss.backward()
    assert out.loss.isfinite() and 0 <= out.masked_accuracy <= 1
    model.save_pretrained(tmp_path)
    loaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    g = dict(mode="diffusion", gamma=0.6, max_new_tokens=9, eos_token_id=-1)
    assert torch.equal(model.generate(prompts, **g).sequences, loaded.generate(prompts, **g).sequences)


def test_bf16_round_trip_keeps_dtype(tmp_path):
    """A bf16 model reloads as bf16 with identical outputs (a `.to(bf16)`-cast original differs
    only in RoPE's non-persistent inv_freq buffer, so compare two reloads)."""
    model = tiny_twotower("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "a")
    first = TwoTowerForDiffusionLM.from_pretrained(tmp_path / "a")
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    first.save_pretrained(tmp_path / "b")
    second = TwoTowerForDiffusionLM.from_pretrained(tmp_path / "b")
    ids = rand_ids(1, 8)
    mask, t = fixed_noise(1, 8)
    with torch.no_grad():
        assert torch.equal(first(ids, noise_mask=mask, t=t).logits, second(ids, noise_mask=mask, t=t).logits)


def test_sharded_checkpoint_loads(tmp_path):
    """Export may write several shards (`context_tower.*`, `denoiser.*`); tied weights stored once."""
    from safetensors.torch import load_file, save_file

    model = tiny_twotower("llama", perturb=0.05)  # tied embeddings
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    for prefix in ("context_tower.", "denoiser."):
        save_file({k: v for k, v in state.items() if k.startswith(prefix)},
                  str(tmp_path / f"{prefix[:-1]}.safetensors"))
    loaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    ids = rand_ids(1, 8)
    mask, t = fixed_noise(1, 8)
    with torch.no_grad():
        assert torch.equal(model(ids, noise_mask=mask, t=t).logits, loaded(ids, noise_mask=mask, t=t).logits)


SKIP_CASES = [(name, {}) for name in NAMES] + [
    ("nemotron_h", dict(cross_attention=True)),
    ("nemotron_h", dict(attention_conditioning="none", mamba_conditioning="zero_state")),
    ("nemotron_h", dict(mask_token_id=3, token_shift=False)),
    ("nemotron_h", dict(context_position_keys=8)),
    ("llama", dict(context_position_keys=8)),
]


@pytest.mark.parametrize("name,cfg", SKIP_CASES, ids=[f"{n}-{'-'.join(c) or 'default'}" for n, c in SKIP_CASES])
def test_skipping_unmasked_blocks_changes_neither_logits_nor_gradients(name, cfg):
    """Training on left-padded prompt/answer rows denoises only the answer blocks: the masked
    positions' logits, the loss and every gradient equal the all-blocks reference path."""
    from twotower.data import block_aligned_batch

    model = tiny_twotower(name, perturb=0.05, **cfg).train()
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 13)]
    answers = [rand_ids(1, k, seed=20 + k)[0].tolist() + [EOS] for k in (2, 5, 7)]
    batch = block_aligned_batch(prompts, answers, B, pad_id=0, fill_id=EOS)
    kw = dict(attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"])
    outs, grads = [], []
    for skip in (True, False):
        model.zero_grad()
        out = model(batch["input_ids"], generator=torch.Generator().manual_seed(3), skip_unmasked_blocks=skip, **kw)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    sparse, dense = outs
    assert torch.equal(sparse.noise_mask, dense.noise_mask) and sparse.noise_mask.any()
    n_blocks = batch["input_ids"].shape[1] // B
    active = sparse.noise_mask.view(3, n_blocks, B).any(-1)
    assert 0 < int(active.sum()) < active.numel()  # some blocks really are skipped
    sel = sparse.noise_mask
    torch.testing.assert_close(sparse.logits[sel], dense.logits[sel], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for pname in grads[0]:
        torch.testing.assert_close(grads[0][pname], grads[1][pname], atol=1e-5, rtol=1e-4, msg=pname)


def test_block_aligned_fill_completes_the_answer_block():
    """fill_id completes each answer's last block (real and scored); the prompt stays unscored."""
    from twotower.data import block_aligned_batch

    batch = block_aligned_batch([[5, 6, 7], [5] * 6], [[9, EOS], [8, 8, 8, 8, 9, EOS]], B, pad_id=0, fill_id=EOS)
    ids, attn, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert ids.shape == (2, 16)
    assert ids[0].tolist() == [0, 5, 6, 7, 9, EOS, EOS, EOS] + [0] * 8
    assert loss[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] + [0] * 8
    assert attn[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1] + [0] * 8
    assert ids[1].tolist() == [0, 0, 5, 5, 5, 5, 5, 5, 8, 8, 8, 8, 9, EOS, EOS, EOS]
    assert loss[1, 8:].tolist() == [1] * 8 and attn[1, :2].tolist() == [0, 0]
    plain = block_aligned_batch([[5, 6, 7]], [[9, EOS]], B, pad_id=0)
    assert plain["input_ids"][0].tolist() == [0, 5, 6, 7, 9, EOS, 0, 0] and plain["loss_mask"][0, 6:].sum() == 0


def test_adaln_memo_follows_weight_updates():
    """Decoding memoises the AdaLN modulation per t; an in-place weight update (optimizer step,
    weight load) must invalidate it, and a hit must equal a fresh computation."""
    model = tiny_twotower("nemotron_h", perturb=0.05)
    den = model.denoiser
    t = torch.tensor([1.0, 0.4])
    with torch.no_grad():
        first = den.sublayer_modulation(t)
        assert den.sublayer_modulation(t) is first  # memo hit
        den.adaln.bias.add_(0.5)
        after = den.sublayer_modulation(t)
    assert after is not first
    fresh = den.sublayer_modulation(t)  # grad enabled: never memoised
    for (s0, a0, g0), (s1, a1, g1) in zip(after.values(), fresh.values()):
        torch.testing.assert_close(s0, s1), torch.testing.assert_close(a0, a1), torch.testing.assert_close(g0, g1)
    assert not torch.allclose(first[0][0], after[0][0])


def test_suffix_masks_mask_the_last_fraction_t():
    """suffix_mask_prob=1: every block masks exactly its last floor-complement of maskable positions
    (never position 0 under token shift), at least one; 0 keeps i.i.d. draws (some non-suffix)."""
    model = tiny_twotower("nemotron_h", suffix_mask_prob=1.0)
    maskable = torch.ones(64, 3, B, dtype=torch.bool)
    maskable[..., 0] = False
    t, mask = model.sample_noise(maskable, torch.Generator().manual_seed(0))
    n_mask = mask.sum(-1)
    assert (n_mask >= 1).all()
    first = torch.where(mask.any(-1), mask.float().argmax(-1), torch.full_like(n_mask, B))
    assert torch.equal(first + n_mask, torch.full_like(n_mask, B))  # a contiguous suffix
    assert not mask[..., 0].any()
    expected = (B - 1) - ((1 - t) * (B - 1)).floor().long()
    assert torch.equal(n_mask, expected.clamp(min=1))
    iid = tiny_twotower("nemotron_h")
    _, m2 = iid.sample_noise(maskable, torch.Generator().manual_seed(0))
    f2 = torch.where(m2.any(-1), m2.float().argmax(-1), torch.full_like(n_mask, B))
    assert not torch.equal(f2 + m2.sum(-1), torch.full_like(n_mask, B))


def test_auto_picks_the_mode_of_the_batch_size_from_the_export(tmp_path):
    """`auto` runs the table's mode for the batch size (the largest measured size <= the batch),
    read from the export's generation_config.json, and says which one ran."""
    model = tiny_twotower("nemotron_h", perturb=0.05)
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"auto_modes": {"1": "verified", "4": "ar"}}))
    loaded = TwoTowerForDiffusionLM.from_pretrained(tmp_path)
    assert loaded.auto_modes == {1: "verified", 4: "ar"}
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 5, 4, 6)]
    kw = dict(max_new_tokens=9, eos_token_id=-1, gamma=0.3)
    for batch, expect in ((1, "verified"), (3, "verified"), (4, "ar"), (5, "ar")):
        g = loaded.generate(prompts[:batch], mode="auto", **kw)
        assert g.mode == expect
        assert torch.equal(g.sequences, loaded.generate(prompts[:batch], mode=expect, **kw).sequences)
    g = model.generate(prompts[:2], mode="auto", auto_modes={1: "diffusion"}, **kw)
    assert g.mode == "diffusion" and g.num_denoiser_forwards > 0
    with pytest.raises(ValueError, match="needs an auto_modes table"):
        model.generate(prompts[:1], mode="auto", **kw)
    (tmp_path / "generation_config.json").write_text(json.dumps({"auto_modes": {"1": "beam"}}))
    with pytest.raises(ValueError, match=r"generation_config.json: auto_modes\['1'\]"):
        TwoTowerForDiffusionLM.from_pretrained(tmp_path)
