"""One batch of jobs through `generate`, and what the server counts.

The mode is chosen per batch: a job asking for `auto` runs the mode the export's `auto_modes`
table gives for the batch's size (the fastest mode that met the quality target at that size in
calibration); jobs then run grouped by (mode, γ), each group one `generate` call whose rows leave
it as they finish. A `RowStreamer` routes each row's commits to its job: text for a streaming
client as blocks commit, the row's own `max_tokens` and stop strings, and a client that went away
ending its row at the next commit.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
    batch_size: int
    decode_seconds: float = 0.0
    """Wall time of the batch's decoding (every group of it)."""


@dataclass
class Metrics:
    """Counters since the server started (rendered by `/metrics` in Prometheus' text format)."""

    requests: Counter = field(default_factory=Counter)
    """Per mode run."""
    finish: Counter = field(default_factory=Counter)
    batches: Counter = field(default_factory=Counter)
    """Per batch size."""
    tokens: int = 0
    row_forwards: int = 0
    busy_seconds: float = 0.0
    in_flight: int = 0
    """Requests accepted and not yet answered (queued or decoding): 0 when idle, whatever happened."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self) -> str:
        with self.lock:
            lines = ["# TYPE twotower_requests_total counter"]
            lines += [f'twotower_requests_total{{mode="{m}"}} {n}' for m, n in sorted(self.requests.items())]
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
                      "# TYPE twotower_tokens_per_forward gauge",
                      f"twotower_tokens_per_forward {self.tokens / self.row_forwards if self.row_forwards else 0:.4f}"]
        return "\n".join(lines) + "\n"


class _JobStreamer(RowStreamer):
    """Routes one `generate` call's rows to their jobs."""

    def __init__(self, jobs: list[Job], tokenizer, eos: int | None):
        self.jobs, self.eos = jobs, eos
        self.texts = [TextStream(tokenizer, job.stop, live=job.stream) for job in jobs]
        self.counts = [0] * len(jobs)
        self.reasons: list[str | None] = [None] * len(jobs)

    def _send(self, job: Job, piece: str | None) -> None:
        if job.sink is not None and job.loop is not None and (piece or piece is None):
            job.loop.call_soon_threadsafe(job.sink.put_nowait, piece)

    def put_row(self, row: int, tokens: list[int], finished: bool) -> bool:
        job, text = self.jobs[row], self.texts[row]
        if job.cancelled.is_set():
            self.reasons[row] = "cancelled"
            return True
        tokens = tokens[: job.max_tokens - self.counts[row]]
        self.counts[row] += len(tokens)
        hit_eos = self.eos is not None and bool(tokens) and tokens[-1] == self.eos
        full = self.counts[row] >= job.max_tokens
        piece = text.add(tokens, final=finished or full or hit_eos)
        self._send(job, piece)
        if text.stopped or hit_eos:
            self.reasons[row] = "stop"
        elif full or finished:
            self.reasons[row] = "length"
        if self.reasons[row] is not None:
            self._send(job, None)
            return True
        return False

    def end(self) -> None:
        for row, job in enumerate(self.jobs):  # rows generate gave up on (an error): close their streams
            if self.reasons[row] is None:
                self._send(job, None)


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

    def resolve(self, jobs: list[Job]) -> list[str]:
        """Each job's mode in this batch (`auto`: the table's entry at the batch size; AR without one)."""
        auto = auto_mode(self.auto_modes, len(jobs)) if self.auto_modes else "ar"
        return [auto if job.mode == "auto" else job.mode for job in jobs]

    def run(self, jobs: list[Job]) -> list[Result]:
        """Decode a batch of jobs (blocking: the server calls it in a worker thread)."""
        import torch

        modes = self.resolve(jobs)
        results: list[Result | None] = [None] * len(jobs)
        groups: dict[tuple[str, float], list[int]] = {}
        for i, (job, mode) in enumerate(zip(jobs, modes)):
            groups.setdefault((mode, job.gamma), []).append(i)
        eos = self.model.context_tower.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        start = time.perf_counter()
        forwards = 0
        for (mode, gamma), members in groups.items():
            group = [jobs[i] for i in members]
            streamer = _JobStreamer(group, self.tokenizer, eos)
            with torch.inference_mode():
                out = self.model.generate([job.prompt_ids for job in group], mode=mode, gamma=gamma,
                                          max_new_tokens=max(job.max_tokens for job in group), streamer=streamer)
            forwards += int(out.row_forwards.sum())
            for i, job, row_text, count, reason in zip(members, group, streamer.texts, streamer.counts,
                                                       streamer.reasons):
                results[i] = Result(row_text.text, reason or "length", len(job.prompt_ids), count, mode, len(jobs))
        seconds = time.perf_counter() - start
        for result in results:
            result.decode_seconds = seconds
        with self.metrics.lock:
            self.metrics.busy_seconds += seconds
            self.metrics.batches[len(jobs)] += 1
            self.metrics.row_forwards += forwards
            for result in results:
                self.metrics.requests[result.mode] += 1
                self.metrics.finish[result.finish_reason] += 1
                self.metrics.tokens += result.completion_tokens
        return results
