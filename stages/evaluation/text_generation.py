"""Text in, text out: batched generation in any decoding mode that stops at stop strings.

Benchmark harnesses (HumanEval, lm-eval's `generate_until`) speak text and stop sequences, the
model speaks token ids and EOS. `generate_text` bridges them once for both:

- prompts are token ids (the caller tokenizes, as its harness prescribes), decoded in a batch;
- generation runs in chunks of whole blocks and a sequence leaves the batch as soon as its text
  holds a stop string or EOS, so a model that would write on to the cap stops early. A chunk
  restarts from the prompt plus everything generated so far, block-aligned, so diffusion decodes
  as one long call would (for `ar`, one long call and the chunks give the same tokens);
- the text is cut before the earliest stop string; the tokens and forwards spent are counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def cut_at_stops(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """`text` up to (not including) the earliest of `stops` (empty strings ignored)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


@dataclass
class Generated:
    """One prompt's generation."""

    text: str
    """Decoded up to EOS, cut before the first stop string."""
    new_tokens: int
    """Tokens generated (EOS excluded), including those past a stop string in the last chunk."""
    seconds: float = 0.0
    """Wall-clock seconds of the batch it was decoded in."""
    denoiser_forwards: int = 0
    """Denoiser forwards of that batch (each runs over every sequence still in it)."""
    context_forwards: int = 0
    """Context-tower forwards of that batch, prefills of every chunk included."""
    ids: list[int] = field(default_factory=list, repr=False)


def generate_text(model, tokenizer, prompts: list[list[int]], *, mode: str, max_new_tokens: int,
                  stops: tuple[str, ...] | list[str] = (), gamma: float | None = None,
                  block_size: int | None = None, chunk_blocks: int = 4) -> list[Generated]:
    """Decode every prompt (token ids) with `model.generate(mode=...)`; see the module docstring."""
    import torch

    from stages.evaluation.decoding_eval import answer_text

    if max_new_tokens < 1:
        raise ValueError(f"generate_text: max_new_tokens must be >= 1, got {max_new_tokens}")
    block = block_size or model.tt_config.block_size
    chunk = block * max(1, chunk_blocks)
    kwargs: dict[str, Any] = {"mode": mode}
    if gamma is not None:
        kwargs["gamma"] = gamma
    if block_size:
        kwargs["block_size"] = block_size
    generated: list[list[int]] = [[] for _ in prompts]
    texts = ["" for _ in prompts]
    active = list(range(len(prompts)))
    den = ctx = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while active:
            room = max_new_tokens - len(generated[active[0]])  # all active rows have generated alike
            out = model.generate([prompts[i] + generated[i] for i in active], max_new_tokens=min(chunk, room), **kwargs)
            den += int(out.num_denoiser_forwards)
            ctx += int(out.num_context_forwards)
            still = []
            for row, i in enumerate(active):
                new = out.generated[row].tolist()
                _, kept = answer_text(tokenizer, new)
                generated[i] += kept
                texts[i] = tokenizer.decode(generated[i], skip_special_tokens=True)
                ended = len(kept) < len(new) or len(generated[i]) >= max_new_tokens or not new
                if not ended and cut_at_stops(texts[i], stops) == texts[i]:
                    still.append(i)
            active = still
    seconds = time.perf_counter() - t0
    return [Generated(cut_at_stops(t, stops), len(g), seconds, den, ctx, g) for t, g in zip(texts, generated)]
