"""`generate(streamer=...)`: tokens arrive as blocks commit, in every mode and any batch; a streamer
can end a row early; transformers' streamer convention works for one prompt."""
from __future__ import annotations

import pytest
import torch
from twotower_fixtures import tiny_twotower

from twotower.streaming import RowStreamer

MODES = ("diffusion", "verified", "mock_ar", "ar")
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23]]


class Collect(RowStreamer):
    """Records each row's tokens per call; ends `stop_row` once it holds `stop_after` tokens."""

    def __init__(self, stop_row: int | None = None, stop_after: int = 0):
        self.rows: dict[int, list[list[int]]] = {}
        self.finished: list[int] = []
        self.ended = 0
        self.stop_row, self.stop_after = stop_row, stop_after

    def put_row(self, row, tokens, finished):
        assert row not in self.finished, f"row {row} got tokens after it finished"
        self.rows.setdefault(row, []).append(list(tokens))
        if finished:
            self.finished.append(row)
        held = sum(len(t) for t in self.rows[row])
        if row == self.stop_row and held >= self.stop_after and not finished:
            self.finished.append(row)
            return True
        return None

    def end(self):
        self.ended += 1


@pytest.fixture(scope="module")
def model():
    return tiny_twotower("llama", block_size=4, perturb=0.05)


@pytest.mark.parametrize("mode", MODES)
def test_streamed_tokens_are_the_output_and_come_in_commits(model, mode):
    streamer = Collect()
    out = model.generate(PROMPTS, mode=mode, max_new_tokens=12, streamer=streamer)
    assert streamer.ended == 1 and sorted(streamer.finished) == [0, 1, 2]
    for row in range(len(PROMPTS)):
        got = [t for chunk in streamer.rows[row] for t in chunk]
        assert got == out.generated[row, : int(out.num_generated[row])].tolist()
    if mode in ("diffusion", "mock_ar"):  # whole blocks commit at once: some call carries > 1 token
        assert max(len(c) for chunks in streamer.rows.values() for c in chunks) > 1


@pytest.mark.parametrize("mode", ["ar", "verified"])
def test_a_streamer_ends_one_row_and_leaves_the_others_alone(model, mode):
    plain = model.generate(PROMPTS, mode=mode, max_new_tokens=12)
    streamer = Collect(stop_row=1, stop_after=2)
    cut = model.generate(PROMPTS, mode=mode, max_new_tokens=12, streamer=streamer)
    n = int(cut.num_generated[1])
    assert 2 <= n < int(plain.num_generated[1])  # ended at its first commit reaching 2 tokens
    assert cut.generated[1, :n].tolist() == plain.generated[1, :n].tolist()
    for row in (0, 2):
        k = int(plain.num_generated[row])
        assert cut.generated[row, :k].tolist() == plain.generated[row, :k].tolist()
    assert int(cut.row_forwards[1]) < int(plain.row_forwards[1])  # it left the batch: no more forwards


def test_the_transformers_streamer_convention_gets_the_prompt_then_the_new_ids(model):
    calls = []

    class Like:  # transformers' BaseStreamer: put(ids), end()
        def put(self, value):
            calls.append(value.tolist())

        def end(self):
            calls.append("end")

    out = model.generate([PROMPTS[0]], mode="diffusion", max_new_tokens=10, streamer=Like())
    assert calls[0] == [PROMPTS[0]] and calls[-1] == "end"
    assert [t for c in calls[1:-1] for t in c] == out.generated[0, : int(out.num_generated[0])].tolist()
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(PROMPTS, mode="ar", max_new_tokens=4, streamer=Like())
    with pytest.raises(TypeError, match="RowStreamer"):
        model.generate([PROMPTS[0]], mode="ar", max_new_tokens=4, streamer=object())


def test_a_real_text_iterator_streamer_yields_the_decoded_text(tmp_path):
    from threading import Thread

    from transformers import AutoModelForCausalLM, TextIteratorStreamer
    from twotower_fixtures import llama_config

    from stages.data.tokenizer import build_char_tokenizer
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    tok = build_char_tokenizer()
    cfg = llama_config().to_dict() | {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                      "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(llama_config().__class__(**cfg)).eval()
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=4)).eval()
    ids = torch.tensor([tok("copy abc=")["input_ids"]])
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}
    worker = Thread(target=lambda: result.update(out=model.generate(ids, mode="ar", max_new_tokens=12,
                                                                    streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join()
    out = result["out"]
    assert text == tok.decode(out.generated[0, : int(out.num_generated[0])].tolist(), skip_special_tokens=True)
