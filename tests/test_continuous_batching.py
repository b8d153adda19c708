"""Continuous batching in the runtime (`generate(admit=)`): prompts that join a batch in flight, at
a block boundary (every token in `ar`), decode exactly what they decode alone, in every mode, on
attention-only, sliding-window and Mamba-2 hybrid backbones; the rows already running are not
disturbed; a streamer sees the new rows under the indices `admit` was told; the result holds every
row. `TowerCache.join` aligns caches of different widths."""
from __future__ import annotations

import pytest
import torch
from twotower_fixtures import tiny_twotower

from twotower.cache import TowerCache
from twotower.streaming import RowStreamer

MODES = ("diffusion", "verified", "mock_ar", "ar")
FAMILIES = ("llama", "gemma2", "nemotron_h", "falcon_h1", "granitemoehybrid")
FIRST = [[5, 6, 7, 8, 9], [11, 12, 13]]
LATER = {2: [[20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38]], 4: [[40, 41, 42, 43, 44, 45, 46, 47, 9, 8, 7, 6, 5,
                                                                  4, 3, 30, 31, 32, 33]]}
"""Call number of `admit` -> prompts joining then: a short and a long one, later one longer than
every row's cache so far (both sides of `TowerCache.join` get left pads)."""
NEW = 11


class Admit:
    """Hands out LATER's prompts at its calls; records what it was told."""

    def __init__(self):
        self.calls, self.told = 0, []

    def __call__(self, active: int, next_row: int):
        self.calls += 1
        new = LATER.get(self.calls)
        if new:
            self.told.append((active, next_row))
        return new


class Collect(RowStreamer):
    def __init__(self):
        self.rows: dict[int, list[int]] = {}

    def put_row(self, row, tokens, finished):
        self.rows.setdefault(row, []).extend(tokens)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_twotower(request.param, perturb=0.05)


@pytest.mark.parametrize("mode", MODES)
def test_rows_that_join_in_flight_decode_what_they_decode_alone(model, mode):
    kw = dict(mode=mode, gamma=0.5, max_new_tokens=NEW, eos_token_id=-1)
    admit, streamer = Admit(), Collect()
    out = model.generate(FIRST, admit=admit, streamer=streamer, **kw)
    everyone = FIRST + LATER[2] + LATER[4]
    assert admit.told[0] == (2, 2) and admit.told[1][1] == 4  # two running, rows 2 and 3 next; then row 4
    assert out.sequences.shape[0] == 5 and out.prompt_lengths.tolist() == [len(p) for p in everyone]
    for row, prompt in enumerate(everyone):
        alone = model.generate([prompt], **kw).generated[0].tolist()
        assert out.generated[row].tolist() == alone, (mode, row)
        assert streamer.rows[row] == alone, (mode, row)
        assert out.sequences[row, out.prompt_columns - len(prompt): out.prompt_columns].tolist() == prompt
    assert bool((out.row_forwards > 0).all())


def test_join_right_aligns_caches_of_different_widths():
    model = tiny_twotower("nemotron_h")
    from twotower.walk import context_forward

    def prefill(prompts):
        ids = torch.tensor(prompts)
        return context_forward(model.context_walk, ids, TowerCache.empty(len(prompts), "cpu"), chunk=4,
                               **model.context_options())[1]

    short, long = prefill([[5, 6, 7]]), prefill([[1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9]])
    joined = short.join(long)
    assert joined.length == 6 and joined.valid.tolist()[0] == [False] * 3 + [True] * 3
    assert joined.positions[0].tolist() == [0, 0, 0, 0, 1, 2] and joined.next_pos.tolist() == [3, 6, 6]
    for i, k in short.keys.items():
        assert torch.equal(joined.keys[i][0, :, 3:], k[0]) and not bool(joined.keys[i][0, :, :3].any())
        assert torch.equal(joined.keys[i][1:], long.keys[i])
    for i, s in short.ssm.items():
        assert torch.equal(joined.ssm[i][0], s[0]) and torch.equal(joined.ssm[i][1:], long.ssm[i])
    assert torch.equal(long.join(short).valid, joined.valid[[1, 2, 0]])  # either order
    with pytest.raises(ValueError, match="different sublayers"):
        short.join(TowerCache.empty(1, "cpu"))


def test_an_admitted_prompt_past_the_limit_is_refused_and_no_prompt_means_no_change(model):
    plain = model.generate(FIRST, mode="ar", max_new_tokens=5, eos_token_id=-1)
    same = model.generate(FIRST, mode="ar", max_new_tokens=5, eos_token_id=-1, admit=lambda active, row: [])
    assert torch.equal(plain.sequences, same.sequences)
    with pytest.raises(ValueError, match="admitted prompt of 300 tokens exceeds .*max_position_embeddings=256"):
        model.generate(FIRST, mode="ar", max_new_tokens=5, admit=lambda active, row: [[5] * 300])


def test_auto_picked_block_by_block_switches_modes_and_keeps_ar_exact_where_it_runs_exact_modes(model):
    """`generate(mode="auto", pick=...)`: the mode chosen per block. Alternating `verified` and `ar`
    blocks (both exact), with rows joining: every row is AR's output. A pick by batch size that
    puts `diffusion` on the bigger batches runs both modes in one call."""
    kw = dict(max_new_tokens=NEW, eos_token_id=-1, gamma=0.5)
    seen: list[tuple[int, str]] = []

    def alternate(active):
        seen.append((active, ("verified", "ar")[len(seen) % 2]))
        return seen[-1][1]

    out = model.generate(FIRST, mode="auto", pick=alternate, admit=Admit(), **kw)
    assert out.mode == "auto" and {m for _, m in seen} == {"verified", "ar"}
    assert {n for n, _ in seen} >= {2, 4}  # the pick saw the batch grow
    for row, prompt in enumerate(FIRST + LATER[2] + LATER[4]):
        assert out.generated[row].tolist() == model.generate([prompt], mode="ar", **kw).generated[0].tolist()
    chosen: list[str] = []

    def by_size(active):
        chosen.append("diffusion" if active >= 3 else "verified")
        return chosen[-1]

    streamer = Collect()
    out = model.generate(FIRST, mode="auto", pick=by_size, admit=Admit(), streamer=streamer, **kw)
    assert set(chosen) == {"diffusion", "verified"}
    assert all(streamer.rows[r] == out.generated[r].tolist() for r in range(5))


def test_pick_goes_with_auto_and_names_a_mode(model):
    with pytest.raises(ValueError, match="pick chooses the mode of each block for mode='auto'"):
        model.generate(FIRST, mode="diffusion", pick=lambda n: "ar")
    with pytest.raises(ValueError, match="pick returned 'fastest'"):
        model.generate(FIRST, mode="auto", pick=lambda n: "fastest")
