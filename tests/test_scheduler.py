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
TABLE = {1: "ar", 4: "verified"}


def resolve(size: int) -> str:
    return TABLE[max(s for s in TABLE if s <= size)]


def job(mode="auto", gamma=0.9, prompt="ab", max_tokens=12) -> Job:
    return parse_job({"prompt": prompt, "mode": mode, "gamma": gamma, "max_tokens": max_tokens}, tokenizer=TOK,
                     chat=False, default_max_tokens=12, default_gamma=0.9, max_positions=4096, model_name="m")


def test_the_oldest_request_leads_a_new_batch():
    a, b, c, d = job("diffusion"), job("auto"), job("diffusion", gamma=0.5), job("diffusion")
    assert starting([a, b, c, d], resolve, 8) == ([a, d], "diffusion", 0.9)  # auto at 3 would be ar
    autos = [job() for _ in range(5)]
    assert starting(autos + [a], resolve, 8) == (autos, "verified", 0.9)  # five auto -> the table at 5
    assert starting(autos, resolve, 3) == (autos[:3], "ar", 0.9)  # at most max_batch
    v = job("verified")
    assert starting([v] + autos[:3], resolve, 8) == ([v] + autos[:3], "verified", 0.9)  # 4 -> verified


def test_who_joins_a_running_batch():
    same, auto = job("verified"), job()
    assert joining([same, auto], resolve, "verified", 0.9, active=3, room=5) == [same, auto]  # 5 -> verified
    assert joining([auto], resolve, "ar", 0.9, active=3, room=5) == []  # at 4 auto would be verified
    assert joining([auto], resolve, "ar", 0.9, active=2, room=5) == [auto]  # at 3 it is still ar
    assert joining([same, job("ar")], resolve, "verified", 0.9, 1, 7) == []  # another mode waits: drain
    assert joining([same, job("verified", gamma=0.5)], resolve, "verified", 0.9, 1, 7) == []  # another γ too
    many = [job("verified") for _ in range(4)]
    assert joining(many, resolve, "verified", 0.9, active=6, room=2) == many[:2]  # no more than the room


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
