"""Continuous batching: one decoding thread, and requests that join the batch already decoding.

A request waits in `pending` only until the running batch reaches its next block boundary (every
token in `ar`): there it joins, if it runs the batch's mode at the batch's γ, and is prefilled on
its own while the others wait one forward. A row leaves as soon as it ends, and its answer goes
out at once, not when the batch ends. Which requests start a batch and which join it (`starting`,
`joining`):

- the oldest pending request leads: a new batch takes the requests sharing its mode and γ, up to
  `max_batch`. `auto` requests make an `auto` batch, whose mode the export's table picks block by
  block for the rows decoding then (`Engine.decode`), so any `auto` request at that γ can join;
- nothing joins while a request that cannot join is waiting (another mode or γ), so the running
  batch drains and that request leads the next one: no request waits behind an endless stream.

A batch that starts while others are queued behind it waits up to `batch_wait_s` for more (a lone
request starts at once); requests arriving later join at the next boundary anyway.
"""
from __future__ import annotations

import asyncio
import threading
import time

from serving.engine import Engine, Result
from serving.requests import Job


def starting(pending: list[Job], max_batch: int) -> tuple[list[Job], str, float]:
    """The jobs that start the next batch (led by the oldest), its mode and γ."""
    head = pending[0]
    group = [job for job in pending if job.mode == head.mode and job.gamma == head.gamma][:max_batch]
    return group, head.mode, head.gamma


def joining(pending: list[Job], mode: str, gamma: float, room: int) -> list[Job]:
    """The pending jobs that join a batch running `mode` at `gamma` (at most `room`)."""
    if any(job.gamma != gamma or job.mode != mode for job in pending):
        return []  # a request that cannot join leads the next batch: this one drains first
    return pending[:room]


class Scheduler:
    """Owns the decoding thread; `submit` is called on the server's event loop."""

    def __init__(self, engine: Engine, max_batch: int, batch_wait_s: float):
        self.engine, self.max_batch, self.batch_wait_s = engine, max_batch, batch_wait_s
        self.pending: list[Job] = []
        """Requests not started, oldest first."""
        self.running: list[Job] = []
        """The requests of the batch decoding now (those that joined it included)."""
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._serve, name="twotower-decode", daemon=True)
        self.thread.start()

    async def submit(self, job: Job) -> Result:
        """Queue `job`; its result once its row ends (cancelled with the request: the row ends at
        its next commit, or the job is dropped before it starts)."""
        loop = asyncio.get_running_loop()
        job.loop, job.done = loop, loop.create_future()
        metrics = self.engine.metrics
        metrics.in_flight += 1  # only the event loop's thread changes it
        try:
            with self.cond:
                self.pending.append(job)
                self.cond.notify()
            return await job.done
        finally:
            metrics.in_flight -= 1

    def _answer(self, job: Job, result: Result | BaseException) -> None:
        """Hand `result` (or an error) to the job's waiting request, from any thread."""
        def settle(future: asyncio.Future = job.done):
            if not future.done():
                future.set_exception(result) if isinstance(result, BaseException) else future.set_result(result)

        job.loop.call_soon_threadsafe(settle)

    def _drop_cancelled(self) -> None:
        """Requests whose client left before they started: answered without decoding. (Lock held.)"""
        for job in [job for job in self.pending if job.cancelled.is_set()]:
            self.pending.remove(job)
            with self.engine.metrics.lock:
                self.engine.metrics.finish["cancelled"] += 1
            self._answer(job, Result("", "cancelled", len(job.prompt_ids), 0, job.mode, 0))

    def _admit(self, active: int, mode: str, gamma: float) -> list[Job]:
        with self.cond:
            self._drop_cancelled()
            if not self.pending:
                return []
            new = joining(self.pending, mode, gamma, self.max_batch - active)
            for job in new:
                self.pending.remove(job)
            self.running += new
            return new

    def _serve(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending)
                if len(self.pending) > 1 and self.batch_wait_s > 0:
                    deadline = time.monotonic() + self.batch_wait_s
                    self.cond.wait_for(lambda: len(self.pending) >= self.max_batch,
                                       timeout=max(0.0, deadline - time.monotonic()))
                self._drop_cancelled()
                if not self.pending:
                    continue
                jobs, mode, gamma = starting(self.pending, self.max_batch)
                for job in jobs:
                    self.pending.remove(job)
                self.running = list(jobs)
            try:
                self.engine.decode(jobs, mode, gamma, admit=self._admit, done=self._answer)
            except Exception as err:  # noqa: BLE001 - every request of the batch gets the error
                for job in self.running:
                    self._answer(job, RuntimeError(f"decoding failed: {err}"))
            finally:
                with self.cond:
                    self.running = []
