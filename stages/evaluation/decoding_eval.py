"""Side-by-side AR vs diffusion measurement, shared by `calibrate_gamma` and `evaluate`.

Both stages ask the same question: on held-out prompts, how good and how fast is diffusion decoding
at some γ compared with the AR tower alone? Answering it fairly needs care, so it lives here once:

- the same model object serves both modes (`mode="ar"` runs the context tower alone), in the same
  process, one prompt at a time (batch 1: latency, where a speedup is claimed);
- timings are *interleaved* per prompt (AR, then every diffusion setting, order flipped on odd
  repeats) and repeated, and each prompt's median is kept, so a noisy neighbour on a shared CPU
  hits both modes alike;
- quality is exact match where the row has an answer (all synthetic families); otherwise agreement
  with AR greedy (token by token) plus the AR tower's NLL of the generated text.

`measure(...)` returns plain rows; `summarise(...)` turns rows into per-task and overall numbers.
"""
from __future__ import annotations

import json
import resource
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twotower.devices import input_device

AR = "ar"


@dataclass(frozen=True)
class Setting:
    """One decoding configuration measured against AR."""

    gamma: float
    """Confidence threshold γ."""
    block_size: int | None = None
    """Block size B for decoding; None: the model's own."""

    @property
    def label(self) -> str:
        return f"g{self.gamma:g}" + (f"_B{self.block_size}" if self.block_size else "")


@dataclass
class Row:
    """One prompt decoded one way (AR or a diffusion setting)."""

    task: str
    kind: str
    setting: str
    """`ar` or a `Setting.label`."""
    text: str
    """The decoded answer (up to EOS)."""
    correct: float | None
    """Exact match (1/0) when the example has an answer; None when not verifiable."""
    new_tokens: int
    denoiser_forwards: int
    context_forwards: int
    seconds: float
    """Median wall-clock seconds over the repeats."""
    agreement: float = 1.0
    """Fraction of the AR greedy answer tokens reproduced position by position (AR: 1)."""
    ids: list[int] = field(default_factory=list, repr=False)
    verifies: float = 0.0
    """`verified`: the row's share of its batch's verification row-blocks (0 in other modes)."""
    accepted: float = 0.0
    """`verified`: the row's share of the tokens those verifications kept."""


def load_examples(path: str, per_task: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Rows `{task, kind, prompt, answer}` of an eval_examples.jsonl; `per_task` from `offset` per task.

    Calibration and evaluation take disjoint slices (different `offset`) of the held-out split.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"eval examples file {path} does not exist")
    rows, seen = [], {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"{path}: line {i + 1} has no 'prompt' key")
        task = row.setdefault("task", "text")
        row.setdefault("kind", "global")
        k = seen.get(task, 0)
        seen[task] = k + 1
        if k < offset or (per_task is not None and k >= offset + per_task):
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples (per_task={per_task}, offset={offset})")
    return rows


def answer_text(tokenizer, new_ids: list[int]) -> tuple[str, list[int]]:
    """Decode generated ids up to (not including) the first EOS."""
    eos = tokenizer.eos_token_id
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    return tokenizer.decode(new_ids, skip_special_tokens=True), new_ids


def _generate(model, ids, mode: str, setting: Setting | None, max_new_tokens: int):
    import torch

    from stages.evaluation.batch_sweep import timed_generate

    kwargs: dict[str, Any] = {"mode": mode, "max_new_tokens": max_new_tokens}
    if setting is not None:
        kwargs["gamma"] = setting.gamma
        if setting.block_size:
            kwargs["block_size"] = setting.block_size
    with torch.inference_mode():
        return timed_generate(model, ids, **kwargs)


def _agreement(ar_ids: list[int], ids: list[int]) -> float:
    if not ar_ids:
        return 1.0 if not ids else 0.0
    return sum(a == b for a, b in zip(ar_ids, ids)) / max(len(ar_ids), len(ids))


def measure(model, tokenizer, examples: list[dict], settings: list[Setting], *, repeats: int = 3,
            max_new_tokens: int = 32, progress=None) -> list[Row]:
    """Decode every example with AR and every setting, interleaved, `repeats` times (medians)."""
    import torch

    from stages.data.tasks import exact_match

    rows: list[Row] = []
    device = input_device(model)  # prompts go where the context tower is (twotower.devices)
    plan: list[tuple[str, Setting | None]] = [(AR, None)] + [("diffusion", s) for s in settings]
    if examples:  # warm-up, untimed: first calls pay for allocations and lazy kernel selection
        warm = torch.tensor([tokenizer(examples[0]["prompt"])["input_ids"]], device=device)
        for mode, setting in plan[:2]:
            _generate(model, warm, mode, setting, max_new_tokens)
    for n, ex in enumerate(examples):
        ids = torch.tensor([tokenizer(ex["prompt"])["input_ids"]], device=device)
        times: dict[int, list[float]] = {i: [] for i in range(len(plan))}
        gens: dict[int, Any] = {}
        for r in range(max(1, repeats)):
            order = range(len(plan)) if r % 2 == 0 else reversed(range(len(plan)))
            for i in order:
                mode, setting = plan[i]
                gen, secs = _generate(model, ids, mode, setting, max_new_tokens)
                times[i].append(secs)
                gens.setdefault(i, gen)
        ar_ids: list[int] = []
        for i, (_mode, setting) in enumerate(plan):
            gen = gens[i]
            generated = gen.sequences[0, ids.shape[1]:].tolist()
            text, new = answer_text(tokenizer, generated)
            if i == 0:
                ar_ids = new
            answer = ex.get("answer")
            rows.append(Row(
                task=ex["task"], kind=ex["kind"], setting=AR if setting is None else setting.label,
                text=text, correct=None if answer in (None, "") else float(exact_match(text, answer)),
                new_tokens=min(len(new) + 1, len(generated)),  # answer + its EOS
                denoiser_forwards=int(getattr(gen, "num_denoiser_forwards", 0) or 0),
                context_forwards=int(getattr(gen, "num_context_forwards", 0) or 0),
                seconds=statistics.median(times[i]), agreement=_agreement(ar_ids, new), ids=new))
        if progress is not None:
            progress(n + 1, len(examples))
    return rows


def ar_nll(model, tokenizer, prompt: str, ids: list[int]) -> float:
    """Mean NLL (nats/token) the AR tower assigns to generated ids after the prompt."""
    import torch

    if not ids:
        return 0.0
    p = tokenizer(prompt)["input_ids"]
    full = torch.tensor([p + ids], device=input_device(model))
    with torch.inference_mode():
        logits = model.context_tower(input_ids=full).logits.float()
    logp = torch.log_softmax(logits[0, len(p) - 1 : -1], -1)
    return float(-logp.gather(-1, full[0, len(p):, None]).mean())


def quality(rows: list[Row]) -> float:
    """Mean exact match where verifiable, else mean agreement with AR greedy."""
    if not rows:
        return 0.0
    return statistics.fmean(score(r) for r in rows)


def relative(q: float, q_ar: float) -> float:
    """Diffusion quality relative to AR (1.0 when both are zero)."""
    if q_ar <= 0:
        return 1.0 if q <= 0 else float("inf")
    return q / q_ar


def score(r: Row) -> float:
    """One prompt's quality: exact match where verifiable, else agreement with AR greedy."""
    return r.correct if r.correct is not None else r.agreement


def relative_ci(ar: list[Row], dif: list[Row]) -> tuple[float, float]:
    """Paired-bootstrap interval of relative quality (`stages.evaluation.confidence`); rows in prompt order."""
    from stages.evaluation.confidence import paired_bootstrap

    if not dif:
        return 0.0, 0.0
    return paired_bootstrap([score(r) for r in ar], [score(r) for r in dif])


def summarise(rows: list[Row], setting: str) -> dict[str, Any]:
    """Quality (overall and per task), relative quality with its paired-bootstrap interval over
    prompts (`relative_quality_low` / `relative_quality_high`), speedup and tokens/forward of `setting`."""
    ar = [r for r in rows if r.setting == AR]
    dif = [r for r in rows if r.setting == setting]
    tasks = sorted({r.task for r in ar})
    per_task = {}
    for t in tasks:
        a = [r for r in ar if r.task == t]
        d = [r for r in dif if r.task == t]
        qa, qd = quality(a), quality(d)
        lo, hi = relative_ci(a, d)
        per_task[t] = {"kind": a[0].kind, "ar_quality": qa, "diffusion_quality": qd,
                       "relative_quality": relative(qd, qa),
                       "relative_quality_low": lo, "relative_quality_high": hi,
                       "speedup": sum(r.seconds for r in a) / max(1e-12, sum(r.seconds for r in d)),
                       "tokens_per_forward": sum(r.new_tokens for r in d) / max(1, sum(r.denoiser_forwards for r in d)),
                       "n": len(a)}
    qa, qd = quality(ar), quality(dif)
    ar_s, d_s = sum(r.seconds for r in ar), sum(r.seconds for r in dif)
    tokens = sum(r.new_tokens for r in dif)
    lo, hi = relative_ci(ar, dif)
    return {
        "ar_quality": qa, "diffusion_quality": qd, "relative_quality": relative(qd, qa),
        "relative_quality_low": lo, "relative_quality_high": hi,
        "speedup": ar_s / max(1e-12, d_s),
        "median_speedup": statistics.median(a.seconds / max(1e-12, d.seconds) for a, d in zip(ar, dif)) if dif else 0.0,
        "tokens_per_forward": tokens / max(1, sum(r.denoiser_forwards for r in dif)),
        "tokens_per_model_forward": tokens / max(1, sum(r.denoiser_forwards + r.context_forwards for r in dif)),
        "ar_tokens_per_second": sum(r.new_tokens for r in ar) / max(1e-12, ar_s),
        "diffusion_tokens_per_second": tokens / max(1e-12, d_s),
        "agreement_with_ar": statistics.fmean(r.agreement for r in dif) if dif else 0.0,
        "per_task": per_task,
    }


def reset_peak_memory() -> bool:
    """Start a new peak-memory window for this process: Linux's `clear_refs` 5 resets VmHWM, so a
    Ray worker reused from an earlier stage (training) does not report that stage's peak; the
    CUDA peak too. Returns False where the RSS peak cannot be reset (then it is the process's)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process since `reset_peak_memory` (VmHWM; the whole process
    life where /proc is missing), and peak CUDA allocation when on a GPU, in MB."""
    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        with open("/proc/self/status") as fh:
            peak = next(int(line.split()[1]) / 1024.0 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    out = {"peak_rss_mb": peak}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def losers(per_task: dict[str, dict]) -> list[str]:
    """Task names whose relative quality is below 1, worst first (who loses to parallel decoding)."""
    return sorted((t for t in per_task if per_task[t]["relative_quality"] < 1.0),
                  key=lambda t: (per_task[t]["relative_quality"], t))
