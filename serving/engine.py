"""Jobs through `generate`, and what the server counts.

The mode follows the batch: `auto` runs, block by block, the mode the export's `auto_modes` table
gives for the rows decoding then (the fastest mode that met the quality target at that size in
calibration), so a batch that grows as requests join and shrinks as rows end changes mode as the
table says. `Engine.decode` runs one `generate` call for jobs sharing a (mode, γ), whose rows
leave it as they finish and which more jobs may join while it runs (`admit`: the scheduler's
continuous batching). A `RowStreamer` routes each row's commits to its job: text for a streaming
client as blocks commit, the row's own `max_tokens` and stop strings, a client that went away
ending its row at the next commit, and the job's `Result` the moment its row ends.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from serving.requests import Job
from serving.text import TextStream
from twotower.generate import auto_mode
from twotower.streaming import RowStreamer


@dataclass
class Result:
    """What a job produced."""

    text: str
    finish_reason: str
    """"stop" (EOS or a stop string), "length" (max_tokens) or "cancelled" (the client left)."""
    prompt_tokens: int
    completion_tokens: int
    mode: str
    """The mode that committed most of its tokens (an `auto` row may run several, block by block)."""
    batch_size: int
    decode_seconds: float = 0.0
    """Wall time from the job's prefill to its last token."""
    modes: dict[str, int] = field(default_factory=dict)
    """Tokens committed per mode."""


@dataclass
class Metrics:
    """Counters since the server started (rendered by `/metrics` in Prometheus' text format)."""

    requests: Counter = field(default_factory=Counter)
    """Per mode run (the mode of most of each request's tokens)."""
    blocks: Counter = field(default_factory=Counter)
    """`auto` batches: blocks decoded per mode the table picked."""
    finish: Counter = field(default_factory=Counter)
    batches: Counter = field(default_factory=Counter)
    """Per batch size."""
    tokens: int = 0
    row_forwards: int = 0
    busy_seconds: float = 0.0
    in_flight: int = 0
    """Requests accepted and not yet answered (queued or decoding): 0 when idle, whatever happened."""
    joined: int = 0
    """Requests that joined a batch already decoding (continuous batching)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self) -> str:
        with self.lock:
            lines = ["# TYPE twotower_requests_total counter"]
            lines += [f'twotower_requests_total{{mode="{m}"}} {n}' for m, n in sorted(self.requests.items())]
            lines.append("# TYPE twotower_auto_blocks_total counter")
            lines += [f'twotower_auto_blocks_total{{mode="{m}"}} {n}' for m, n in sorted(self.blocks.items())]
            lines.append("# TYPE twotower_finished_total counter")
            lines += [f'twotower_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finish.items())]
            lines.append("# TYPE twotower_batches_total counter")
            lines += [f'twotower_batches_total{{size="{s}"}} {n}' for s, n in sorted(self.batches.items())]
            lines += ["# TYPE twotower_generated_tokens_total counter",
                      f"twotower_generated_tokens_total {self.tokens}",
                      "# TYPE twotower_busy_seconds_total counter",
                      f"twotower_busy_seconds_total {self.busy_seconds:.6f}",
                      "# TYPE twotower_tokens_per_second gauge",
                      f"twotower_tokens_per_second {self.tokens / self.busy_seconds if self.busy_seconds else 0:.3f}",
                      "# TYPE twotower_requests_in_flight gauge", f"twotower_requests_in_flight {self.in_flight}",
                      "# TYPE twotower_joined_total counter", f"twotower_joined_total {self.joined}",
                      "# TYPE twotower_tokens_per_forward gauge",
                      f"twotower_tokens_per_forward {self.tokens / self.row_forwards if self.row_forwards else 0:.4f}"]
        return "\n".join(lines) + "\n"


@dataclass
class _Row:
    """One job's row in a `generate` call, as the streamer follows it."""

    job: Job
    text: TextStream
    batch_size: int
    """The batch's rows once this one was in."""
    started: float = field(default_factory=time.perf_counter)
    count: int = 0
    """Completion tokens so far (at most `job.max_tokens`)."""
    modes: Counter = field(default_factory=Counter)
    """Tokens committed per mode."""
    result: Result | None = None
    """Set when the row ends."""


class _JobStreamer(RowStreamer):
    """Routes one `generate` call's rows to their jobs (row i is the i-th job added) and builds each
    job's `Result` when its row ends, handing it to `done` at once."""

    def __init__(self, tokenizer, eos: int | None, mode: str, metrics: Metrics, done: Callable | None):
        self.tokenizer, self.eos, self.metrics, self.done = tokenizer, eos, metrics, done
        self.rows: list[_Row] = []
        self.current = mode
        """The mode of the block being decoded (what its tokens are counted under)."""

    def add(self, job: Job, batch_size: int) -> None:
        """The next row is `job`'s; `batch_size`: the batch's rows once it is in."""
        self.rows.append(_Row(job, TextStream(self.tokenizer, job.stop, live=job.stream), batch_size))

    @property
    def results(self) -> list[Result | None]:
        return [row.result for row in self.rows]

    def _send(self, job: Job, piece: str | None) -> None:
        if job.sink is not None and job.loop is not None and (piece or piece is None):
            job.loop.call_soon_threadsafe(job.sink.put_nowait, piece)

    def put_row(self, index: int, tokens: list[int], finished: bool) -> bool:
        row = self.rows[index]
        job = row.job
        if job.cancelled.is_set():
            self._finish(row, "cancelled")
            return True
        tokens = tokens[: job.max_tokens - row.count]
        row.count += len(tokens)
        row.modes[self.current] += len(tokens)
        hit_eos = self.eos is not None and bool(tokens) and tokens[-1] == self.eos
        full = row.count >= job.max_tokens
        self._send(job, row.text.add(tokens, final=finished or full or hit_eos))
        if row.text.stopped or hit_eos:
            self._finish(row, "stop")
        elif full or finished:
            self._finish(row, "length")
        return row.result is not None

    def _finish(self, row: _Row, reason: str) -> None:
        self._send(row.job, None)
        mode = max(row.modes, key=row.modes.get) if row.modes else self.current
        row.result = Result(row.text.text, reason, len(row.job.prompt_ids), row.count, mode, row.batch_size,
                            time.perf_counter() - row.started, dict(row.modes))
        with self.metrics.lock:
            self.metrics.requests[mode] += 1
            self.metrics.finish[reason] += 1
            self.metrics.tokens += row.count
        if self.done is not None:
            self.done(row.job, row.result)

    def end(self) -> None:
        for row in self.rows:  # rows generate gave up on (an error): close their streams
            if row.result is None:
                self._send(row.job, None)


class Engine:
    """The loaded export and its defaults; `run` decodes one batch of jobs."""

    def __init__(self, model, tokenizer, generation: dict, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.gamma = float(generation.get("gamma", 0.9))
        self.max_tokens = int(generation.get("max_new_tokens", 64))
        self.auto_modes = getattr(model, "auto_modes", None)
        self.max_positions = model.adapter.max_positions(model.context_tower.config)
        self.metrics = Metrics()

    @classmethod
    def load(cls, export_dir: str | Path, context_device: str = "auto", denoiser_device: str = "auto") -> "Engine":
        """Model (placed on devices), tokenizer and generation defaults of an export directory."""
        import json

        from transformers import AutoTokenizer

        from twotower import TwoTowerForDiffusionLM
        from twotower.devices import place

        export = Path(export_dir)
        if not (export / "config.json").is_file():
            raise FileNotFoundError(f"{export}: not an export directory (no config.json)")
        model = TwoTowerForDiffusionLM.from_pretrained(str(export)).eval()
        place(model, context_device, denoiser_device, ("--context-device", "--denoiser-device"))
        gen_file = export / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls(model, AutoTokenizer.from_pretrained(str(export)), generation, export.resolve().name)

    def mode_at(self, batch_size: int) -> str:
        """The mode `auto` runs in a batch of `batch_size` (the table's entry; AR without one)."""
        return auto_mode(self.auto_modes, batch_size) if self.auto_modes else "ar"

    def resolve(self, jobs: list[Job]) -> list[str]:
        """Each job's mode in this batch (`auto`: the mode at the batch's size)."""
        auto = self.mode_at(len(jobs))
        return [auto if job.mode == "auto" else job.mode for job in jobs]

    def run(self, jobs: list[Job]) -> list[Result]:
        """Decode a batch of jobs as one (blocking): `auto` resolved at the batch's size, then one
        `decode` per (mode, γ) group, one after the other."""
        modes = self.resolve(jobs)
        groups: dict[tuple[str, float], list[int]] = {}
        for i, (job, mode) in enumerate(zip(jobs, modes)):
            groups.setdefault((mode, job.gamma), []).append(i)
        results: list[Result | None] = [None] * len(jobs)
        for (mode, gamma), members in groups.items():
            for i, result in zip(members, self.decode([jobs[i] for i in members], mode, gamma, len(jobs))):
                results[i] = result
        return results

    def decode(self, jobs: list[Job], mode: str, gamma: float, batch_size: int | None = None,
               admit: Callable[[int, str, float], list[Job]] | None = None,
               done: Callable[[Job, Result], None] | None = None) -> list[Result]:
        """One `generate` call for `jobs` (all run `mode` at `gamma`, `auto` picked block by block;
        `batch_size`: what their answers report, default their number). `admit(active_rows, mode,
        gamma)` is asked between forwards for jobs to join; `done(job, result)` is told as each row
        ends. Returns every job's result, the joined ones after the first, in the order they came."""
        import torch

        eos = self.model.context_tower.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        streamer = _JobStreamer(self.tokenizer, eos, mode, self.metrics, done)
        if mode == "auto":
            streamer.current = self.mode_at(len(jobs))
        for job in jobs:
            streamer.add(job, batch_size or len(jobs))

        def join(active: int, next_row: int) -> list[list[int]]:
            new = admit(active, mode, gamma)
            for job in new:
                streamer.add(job, active + len(new))
            with self.metrics.lock:
                self.metrics.joined += len(new)
            return [job.prompt_ids for job in new]

        def pick(active: int) -> str:
            streamer.current = self.mode_at(active)
            with self.metrics.lock:
                self.metrics.blocks[streamer.current] += 1
            return streamer.current

        # with joins, each row's own max_tokens ends it (the streamer); the call's budget is no limit
        budget = max(job.max_tokens for job in jobs) if admit is None else (self.max_positions or 1 << 30)
        table = set((self.auto_modes or {}).values()) or {"ar"}
        runs = mode  # what generate runs; `mode` stays what joining requests ask for
        if mode == "auto" and len(table) == 1:  # one mode at every size: run it as such (`ar`: its own loop)
            runs = streamer.current = next(iter(table))
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate([job.prompt_ids for job in jobs], mode=runs, gamma=gamma, max_new_tokens=budget,
                                      streamer=streamer, admit=None if admit is None else join,
                                      pick=pick if runs == "auto" else None)
        with self.metrics.lock:
            self.metrics.busy_seconds += time.perf_counter() - start
            self.metrics.batches[len(jobs)] += 1
            self.metrics.row_forwards += int(out.row_forwards.sum())
        if any(result is None for result in streamer.results):
            raise RuntimeError("decoding ended with rows unfinished")
        return streamer.results
