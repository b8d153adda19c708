"""Continuous batching in the server (`serving.scheduler`), without HTTP: who starts a batch and who
joins it, and the scheduler on a real engine: a request sent while a long one decodes joins it,
answers what it answers alone and is answered before the long one ends; a request whose client
left before it started is answered `cancelled` without decoding; nothing is left in flight."""
from __future__ import annotations

import asyncio

import pytest
from serving_fixtures import tiny_export

from serving.requests import Job, parse_job
from serving.scheduler import Scheduler, joining, starting
from stages.data.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()


def job(mode="auto", gamma=0.9, prompt="ab", max_tokens=12) -> Job:
    return parse_job({"prompt": prompt, "mode": mode, "gamma": gamma, "max_tokens": max_tokens}, tokenizer=TOK,
                     chat=False, default_max_tokens=12, default_gamma=0.9, max_positions=4096, model_name="m")


def test_the_oldest_request_leads_a_new_batch_of_its_mode_and_gamma():
    a, b, c, d = job("diffusion"), job("auto"), job("diffusion", gamma=0.5), job("diffusion")
    assert starting([a, b, c, d], 8) == ([a, d], "diffusion", 0.9)
    autos = [job() for _ in range(5)]
    assert starting(autos + [a], 8) == (autos, "auto", 0.9)  # auto: the table picks per block
    assert starting(autos, 3) == (autos[:3], "auto", 0.9)  # at most max_batch


def test_who_joins_a_running_batch():
    autos = [job() for _ in range(4)]
    assert joining(autos, "auto", 0.9, room=5) == autos
    assert joining(autos, "auto", 0.9, room=2) == autos[:2]  # no more than the room
    assert joining([job("verified")], "verified", 0.9, 3) != []
    assert joining(autos + [job("ar")], "auto", 0.9, 7) == []  # another mode waits: the batch drains
    assert joining(autos + [job(gamma=0.5)], "auto", 0.9, 7) == []  # another γ too
    assert joining([job("verified")], "auto", 0.9, 7) == []


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from serving.engine import Engine

    # no EOS: every row runs to its own max_tokens
    return Engine.load(tiny_export(tmp_path_factory.mktemp("export") / "model", eos=False, max_positions=4096),
                       "cpu", "cpu")


@pytest.mark.parametrize("mode", ["ar", "verified", "diffusion"])
def test_a_request_joins_the_batch_in_flight_and_is_answered_first(engine, mode):
    alone = engine.run([job(mode, prompt="12+34=", max_tokens=6)])[0]

    async def scenario():
        scheduler = Scheduler(engine, max_batch=8, batch_wait_s=0.0)
        long = asyncio.ensure_future(scheduler.submit(job(mode, prompt="copy abcdef=", max_tokens=400)))
        while not scheduler.running:  # the long request is decoding
            await asyncio.sleep(0.001)
        short = await scheduler.submit(job(mode, prompt="12+34=", max_tokens=6))
        assert not long.done()  # answered while the long one still decodes
        return short, await long

    joined_before = engine.metrics.joined
    short, long = asyncio.run(scenario())
    assert engine.metrics.joined == joined_before + 1
    assert short.batch_size == 2 and short.mode == mode and long.batch_size == 1
    assert (short.text, short.finish_reason, short.completion_tokens) == (alone.text, "length", 6)
    assert long.completion_tokens == 400
    assert engine.metrics.in_flight == 0


def test_a_request_whose_client_left_before_it_started_is_not_decoded(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_batch=8, batch_wait_s=0.0)
        long = asyncio.ensure_future(scheduler.submit(job("ar", max_tokens=200)))
        while not scheduler.running:
            await asyncio.sleep(0.001)
        gone = job("verified")  # another mode: it waits for the long one to drain
        gone.cancelled.set()
        return await scheduler.submit(gone), await long

    before = engine.metrics.requests["verified"]
    gone, long = asyncio.run(scenario())
    assert gone.finish_reason == "cancelled" and gone.completion_tokens == 0
    assert engine.metrics.requests["verified"] == before and long.completion_tokens == 200


def test_an_auto_batch_changes_mode_as_it_grows_and_stays_ar_exact(engine):
    """The fixture's table: `ar` below 4 rows, `verified` from 4. A long `auto` request alone runs
    `ar` blocks; three more join and the batch runs `verified`; every answer is AR's text."""
    prompts = ["copy abcdef=", "12+34=", "rev: abc=", "9+9="]
    alone = [engine.run([job("ar", prompt=p, max_tokens=n)])[0].text for p, n in zip(prompts, (400, 8, 8, 8))]

    async def scenario():
        scheduler = Scheduler(engine, max_batch=8, batch_wait_s=0.0)
        long = asyncio.ensure_future(scheduler.submit(job(prompt=prompts[0], max_tokens=400)))
        while not scheduler.running:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)  # a few `ar` blocks alone
        short = await asyncio.gather(*(scheduler.submit(job(prompt=p, max_tokens=8)) for p in prompts[1:]))
        return [await long] + list(short)

    before = dict(engine.metrics.blocks)
    results = asyncio.run(scenario())
    assert [r.text for r in results] == alone
    assert set(results[0].modes) == {"ar", "verified"} and sum(results[0].modes.values()) == 400
    assert all(r.modes.get("verified", 0) > 0 for r in results[1:])
    assert engine.metrics.blocks["verified"] > before.get("verified", 0)
    assert engine.metrics.blocks["ar"] > before.get("ar", 0)
    assert 'twotower_auto_blocks_total{mode="verified"}' in engine.metrics.render()


@pytest.mark.parametrize("table", [{1: "verified"}, None])
def test_auto_requests_join_when_the_table_names_one_mode_or_none(engine, monkeypatch, table):
    """A table with one mode at every size (run as that mode) or none (`auto` serves `ar`): `auto`
    requests still join the batch in flight."""
    monkeypatch.setattr(engine, "auto_modes", table)
    alone = engine.run([job("ar", prompt="12+34=", max_tokens=6)])[0].text

    async def scenario():
        scheduler = Scheduler(engine, max_batch=8, batch_wait_s=0.0)
        long = asyncio.ensure_future(scheduler.submit(job(prompt="copy abcdef=", max_tokens=400)))
        while not scheduler.running:
            await asyncio.sleep(0.001)
        short = await scheduler.submit(job(prompt="12+34=", max_tokens=6))
        assert not long.done()
        return short, await long

    joined = engine.metrics.joined
    short, long = asyncio.run(scenario())
    assert engine.metrics.joined == joined + 1 and short.batch_size == 2
    assert short.text == alone and short.mode == long.mode == (table or {1: "ar"})[1]


def test_a_decoding_error_answers_its_batch_and_the_scheduler_goes_on(engine, monkeypatch):
    real = engine.model.generate
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", failing_once)

    async def scenario():
        scheduler = Scheduler(engine, max_batch=8, batch_wait_s=0.0)
        with pytest.raises(RuntimeError, match="decoding failed: out of memory"):
            await scheduler.submit(job("ar", max_tokens=4))
        return await scheduler.submit(job("ar", max_tokens=4))

    assert asyncio.run(scenario()).completion_tokens == 4
    assert engine.metrics.in_flight == 0
