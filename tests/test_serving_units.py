"""The server's parts without a server: request validation (every refusal names its field), text
as blocks commit with stop strings, and one batch through the engine (mode per batch, per-row
budgets and stops, a cancelled row leaving the batch)."""
from __future__ import annotations

import pytest
from serving_fixtures import tiny_export

from serving.requests import BadRequest, parse_job
from serving.text import TextStream
from stages.data.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()


def job(body, chat=False, limit=256):
    return parse_job(body, tokenizer=TOK, chat=chat, default_max_tokens=12, default_gamma=0.9,
                     max_positions=limit, model_name="m")


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "ab", "mode": "fast"}, "mode", "mode must be one of"),
    ({"prompt": "ab", "max_tokens": -1}, "max_tokens", ">= 1"),
    ({"prompt": "ab", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "ab", "max_tokens": "5"}, "max_tokens", "integer"),
    ({"prompt": "ab", "temperature": 0.7}, "temperature", "greedily"),
    ({"prompt": "ab", "top_p": 0.5}, "top_p", "greedily"),
    ({"prompt": "ab", "n": 2}, "n", "not supported"),
    ({"prompt": "ab", "logprobs": 3}, "logprobs", "not supported"),
    ({"prompt": "ab", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "ab", "stop": [""]}, "stop", "non-empty"),
    ({"prompt": "ab", "gamma": 1.5}, "gamma", "(0, 1]"),
    ({"prompt": "ab", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": ["ab", "cd"]}, "prompt", "one prompt per request"),
    ({"prompt": [1, 10**9]}, "prompt", "token ids must be in"),
    ({}, "prompt", "non-empty string"),
    ({"prompt": "x" * 300}, "prompt", "exceeds the model's limit of 256"),
    ({"prompt": "x" * 250, "max_tokens": 20}, "max_tokens", "exceeds the model's limit"),
])
def test_each_bad_request_is_refused_naming_its_field(body, param, words):
    with pytest.raises(BadRequest, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
        job(body)
    assert err.value.param == param
    assert err.value.body()["error"]["param"] == param and err.value.body()["error"]["type"] == "invalid_request_error"


def test_bad_chat_messages_and_a_non_object_body_are_refused():
    with pytest.raises(BadRequest, match="messages"):
        job({"messages": [{"role": "user"}]}, chat=True)
    with pytest.raises(BadRequest, match="JSON object"):
        job(["prompt"])


def test_a_good_request_and_the_chat_fallback_template():
    j = job({"prompt": "ab", "max_tokens": 5, "stop": "x", "mode": "verified", "temperature": 0, "user": "u"})
    assert (j.max_tokens, j.stop, j.mode, j.gamma) == (5, ["x"], "verified", 0.9)
    assert j.prompt_ids == TOK("ab")["input_ids"]
    c = job({"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert TOK.decode(c.prompt_ids) == "user: hi\nassistant: "  # no template in the tokenizer: role lines
    assert job({"prompt": "ab"}).mode == "auto" and job({"prompt": "ab"}).max_tokens == 12


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_text_is_held_back_while_it_may_be_a_stop_string_and_cut_before_it():
    stream = TextStream(TOK, ["END", "##"])
    pieces = [stream.add(ids(t)) for t in ("ab", "cE", "N", "xy#", "z", "qEND", "more")]
    assert pieces == ["ab", "c", "", "ENxy", "#z", "q", ""]
    assert stream.stopped and stream.text == "abcENxy#zq"
    tail = TextStream(TOK, ["END"])
    assert tail.add(ids("abEN")) == "ab" and tail.add([], final=True) == "EN"  # the end settles what was held


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from serving.engine import Engine

    return Engine.load(tiny_export(tmp_path_factory.mktemp("export") / "model"), "cpu", "cpu")


def test_auto_takes_its_mode_from_the_batch_size_and_verified_equals_ar(engine):
    prompts = ["copy abc=", "12+34=", "sort: zyx=", "rev: abc="]
    one = engine.run([job({"prompt": prompts[0]})])
    assert one[0].mode == "ar"  # batch 1 -> "ar" in the export's table
    four = engine.run([job({"prompt": p}) for p in prompts])
    assert {r.mode for r in four} == {"verified"} and four[0].batch_size == 4
    ar = engine.run([job({"prompt": p, "mode": "ar"}) for p in prompts])
    assert [r.text for r in four] == [r.text for r in ar]
    mixed = engine.run([job({"prompt": prompts[0], "mode": "diffusion"}), job({"prompt": prompts[1]})])
    assert [r.mode for r in mixed] == ["diffusion", "ar"]  # explicit modes stay; auto at batch 2 -> ar
    assert "twotower_requests_total{mode=\"verified\"} 4" in engine.metrics.render()


def test_rows_keep_their_own_budget_and_stop_strings(engine):
    full = engine.run([job({"prompt": "copy abc=", "mode": "ar", "max_tokens": 10})])[0]
    if full.finish_reason == "stop" or len(full.text) < 4:
        pytest.skip("the random model ends too early for this prompt")
    stop = full.text[2:4]
    short, stopped = engine.run([job({"prompt": "copy abc=", "mode": "ar", "max_tokens": 3}),
                                 job({"prompt": "copy abc=", "mode": "ar", "max_tokens": 10, "stop": [stop]})])
    assert (short.text, short.finish_reason, short.completion_tokens) == (full.text[:3], "length", 3)
    assert stopped.text == full.text[: full.text.index(stop)] and stopped.finish_reason == "stop"


def test_a_cancelled_job_leaves_the_batch_at_its_next_commit(engine):
    a, b = job({"prompt": "copy abc=", "mode": "ar", "max_tokens": 10}), job({"prompt": "12+3=", "mode": "ar",
                                                                          "max_tokens": 10})
    b.cancelled.set()
    ra, rb = engine.run([a, b])
    assert rb.finish_reason == "cancelled" and rb.completion_tokens <= 1
    assert ra.finish_reason in ("stop", "length") and ra.completion_tokens >= 1


def test_the_ray_serve_builder_names_what_it_needs(tmp_path):
    from ray.serve import Application

    from serving.app import app_builder

    with pytest.raises(ValueError, match="export_dir=DIR"):
        app_builder({})
    assert isinstance(app_builder({"export_dir": str(tmp_path), "max_batch_size": "8"}), Application)


def test_a_non_streaming_row_without_stops_is_decoded_once_at_the_end():
    calls = []

    class Counting:
        def decode(self, ids, **kw):
            calls.append(list(ids))
            return TOK.decode(ids, **kw)

    quiet = TextStream(Counting(), [], live=False)
    assert quiet.add(ids("ab")) == "" and quiet.add(ids("cd")) == "" and calls == []
    assert quiet.add(ids("e"), final=True) == "abcde" and len(calls) == 1
    assert TextStream(Counting(), ["x"], live=False).live  # stop strings are looked for at every commit
