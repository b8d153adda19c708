"""`python -m pipeline generate EXPORT_DIR --prompt TEXT [--mode ...] [--gamma G] [--show-steps]`.

Loads an exported two-tower directory (no Ray, no MLflow), reads its `generation_config.json` for
the defaults (mode, γ, block size, max_new_tokens) and prints the continuation of the prompt with the
forward counts and the wall-clock time. `--show-steps` prints, for diffusion and verified decoding,
how each block fills in step by step (`_` marks a still-masked position, `·` padding after EOS);
in verified decoding also the draft, the prefix the context tower accepted and its correction.

    python -m pipeline generate runs/<run>/export/model --prompt "copy: abc=" --show-steps
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODES = ("diffusion", "verified", "mock_ar", "ar", "auto")
STEPPED = ("diffusion", "verified", "auto")
MASK_GLYPH = "_"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline generate",
                                description="Generate with an exported two-tower model.")
    p.add_argument("export_dir", help="directory written by the export stage")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--mode", choices=MODES, default=None, help="decoding mode (default: generation_config.json)")
    p.add_argument("--gamma", type=float, default=None, help="confidence threshold in (0, 1]")
    p.add_argument("--block-size", type=int, default=None, help="decoding block size (<= the trained one)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation cap")
    p.add_argument("--show-steps", action="store_true", help="show how each block fills in, step by step")
    p.add_argument("--context-device", default="auto",
                   help="device of the context tower (cpu, cuda:0, ...; auto: cuda:0 when a GPU exists)")
    p.add_argument("--denoiser-device", default="auto",
                   help="device of the denoiser (auto: cuda:1 with two GPUs, else the context tower's)")
    return p


def load_defaults(export_dir: Path) -> dict:
    """The export's generation_config.json (mode, gamma, block_size, max_new_tokens); {} if absent."""
    f = export_dir / "generation_config.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _piece(tokenizer, token_id: int) -> str:
    if token_id == tokenizer.pad_token_id:
        return "·"  # after EOS: padding
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return text.replace("\n", "\\n")


def render_steps(trace: list, tokenizer, first_block_start: int = 0) -> list[str]:
    """One line per denoiser step: the block's tokens, masked positions as `_`. Sequence 0 only."""
    lines = []
    for k, steps in enumerate(trace):
        lines.append(f"block {k + first_block_start}:")
        if not steps:
            lines.append("  (filled left to right by the context tower)")
        for s, step in enumerate(steps):
            toks, masked = step["tokens"][0], step["masked"][0]
            shown = "".join(MASK_GLYPH if m else _piece(tokenizer, t) for t, m in zip(toks, masked))
            lines.append(f"  step {s + 1:2d}  |{shown}|  ({sum(masked)} masked)")
        if steps and "accepted" in steps[-1]:
            kept, draft = steps[-1]["accepted"][0], steps[-1]["tokens"][0]
            shown = "".join(_piece(tokenizer, t) for t in draft[:kept])
            fix = _piece(tokenizer, steps[-1]["correction"][0])
            lines.append(f"  verify   |{shown}|  kept {kept} of {len(draft)}, then the context tower's {fix!r}")
    return lines


def main(argv: list[str]) -> int:
    """Entry point; returns a process exit status (2 for bad arguments or a bad export dir)."""
    args = build_parser().parse_args(argv)
    export_dir = Path(args.export_dir)
    if not (export_dir / "config.json").exists():
        print(f"error: {export_dir}: not an export directory (no config.json)", file=sys.stderr)
        return 2
    defaults = load_defaults(export_dir)
    mode = args.mode or defaults.get("mode", "diffusion")
    gamma = args.gamma if args.gamma is not None else float(defaults.get("gamma", 0.9))
    if not 0.0 < gamma <= 1.0:
        print(f"error: --gamma {gamma}: must be in (0, 1]", file=sys.stderr)
        return 2
    max_new = args.max_new_tokens or int(defaults.get("max_new_tokens", 64))
    block_size = args.block_size or defaults.get("block_size")

    import torch
    from transformers import AutoTokenizer

    from twotower import TwoTowerForDiffusionLM

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    from twotower.devices import DEVICE, input_device, place

    model = TwoTowerForDiffusionLM.from_pretrained(str(export_dir)).eval()
    try:
        for flag, value in (("--context-device", args.context_device), ("--denoiser-device", args.denoiser_device)):
            if not DEVICE.fullmatch(value):
                raise ValueError(f"{flag} {value!r}: expected auto, cpu, mps, cuda or cuda:N")
        place(model, args.context_device, args.denoiser_device, ("--context-device", "--denoiser-device"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ids = torch.tensor([tokenizer(args.prompt)["input_ids"]], device=input_device(model))
    kwargs = {"mode": mode, "gamma": gamma, "max_new_tokens": max_new,
              "return_trace": args.show_steps and mode in STEPPED}
    if block_size:
        kwargs["block_size"] = int(block_size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(ids, **kwargs)
    seconds = time.perf_counter() - t0
    new = gen.sequences[0, ids.shape[1]:].tolist()
    n = int(gen.num_generated[0]) if getattr(gen, "num_generated", None) is not None else len(new)
    if args.show_steps:
        if gen.mode not in STEPPED:
            print(f"(--show-steps shows denoising steps; mode {gen.mode} has none)")
        else:
            print("\n".join(render_steps(gen.trace or [], tokenizer)))
    text = tokenizer.decode(new[:n], skip_special_tokens=True)
    print(f"{args.prompt}{text}")
    if mode == "auto":
        mode = f"auto: {gen.mode}"
    print(f"[{mode}, γ={gamma:g}] {n} tokens, {gen.num_denoiser_forwards} denoiser + "
          f"{gen.num_context_forwards} context forwards, {seconds * 1000:.0f} ms"
          + (f", {gen.accepted_per_verify:.2f} tokens kept per verification" if gen.mode == "verified" else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
