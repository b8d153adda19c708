"""One-GPU check of the runtime at a ~1 B-parameter Nemotron-H pattern; `--tiny` runs it on CPU.

    python bench/gpu_check.py                        # on a GPU: ~1.17 B params, <= 300 bf16 steps, ~10 min
    python bench/gpu_check.py --tiny --device cpu    # the same code path in ~a minute on a laptop
    python bench/gpu_check.py --out gpu_check.json   # also write the numbers as JSON

What it does, in order, and prints as it goes:
1. builds a Nemotron-H model with the Nano's layer kinds (Mamba-2, MoE, attention) and trains it
   as an AR LM on a copy task (bf16 autocast, AdamW): training tokens/s of the backbone;
2. wraps it as `TwoTowerForDiffusionLM` and trains the denoiser: training tokens/s of the two-tower
   forward (frozen context tower + denoiser);
3. decodes AR vs diffusion on the same prompts at batch 1 and batch 8, side by side: tokens/s,
   forwards, tokens per forward, agreement with AR;
4. the two-device code path with both towers on one device (`place_towers_on_devices(model,
   "cuda:0", "cuda:0")`): `mock_ar` and `verified` equal `ar` token for token, and diffusion output
   is unchanged by the placement; with two GPUs, also cuda:0 / cuda:1;
5. with `--fsdp`: the sharded training path the Nano recipe uses, FSDP2 under Ray Train with
   bf16-mixed precision, one worker per visible GPU (NCCL; on CPU: 2 gloo workers), on the tiny
   two-tower module of the tests: finite losses, one checkpoint shard per worker, and the shards
   gathered into one state dict. CI runs this path on CPU in fp32; what only this step shows is
   FSDP2 over NCCL and in bf16 (needs Ray on the machine).
Record the printed numbers and the card in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/gpu_check.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SIZES,
    copy_task_batch,
    decode_side_by_side,
    format_decode_table,
    nemotron_h_config,  # noqa: E402
    train_steps,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths and few steps (CPU test)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--ar-steps", type=int, default=None, help="backbone AR steps (default 300; tiny 30)")
    p.add_argument("--steps", type=int, default=None, help="denoiser steps (default 300; tiny 30)")
    p.add_argument("--minutes", type=float, default=3.0,
                   help="time cap per training phase (a device budget is short): fewer steps if reached")
    p.add_argument("--batch", type=int, default=None, help="training sequences per step (default 8; tiny 8)")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default 512; tiny 64)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gamma", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="decode length (default 256; tiny 32)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; tiny 32)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="also run FSDP2 training under Ray Train (step 5)")
    return p.parse_args(argv)


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    tiny = args.tiny
    for key, big, small in (("ar_steps", 300, 30), ("steps", 300, 30), ("batch", 8, 8), ("seq_len", 512, 64),
                            ("max_new_tokens", 256, 32), ("prompt_len", 128, 32)):
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else big)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_backbone(args, device: torch.device):
    from transformers import AutoModelForCausalLM

    from twotower import sizing

    config = nemotron_h_config(SIZES["tiny" if args.tiny else "1b"])
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    counts = sizing.count_parameters(model)
    return model, config, counts


def train_backbone(model, config, args, device) -> dict:
    g = torch.Generator().manual_seed(args.seed)

    def step(_: int):
        x = copy_task_batch(args.batch, args.seq_len, config.vocab_size, g).to(device)
        return model(input_ids=x, labels=x).loss

    model.train()
    out = train_steps(step, [p for p in model.parameters() if p.requires_grad], steps=args.ar_steps,
                      warmup=min(5, args.ar_steps // 3), tokens_per_step=args.batch * args.seq_len,
                      lr=1e-3 if args.tiny else 3e-4, device=device, bf16=device.type == "cuda",
                      max_seconds=60 * args.minutes)
    model.eval()
    return out


def train_denoiser(model, config, args, device) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)

    def step(_: int):
        x = copy_task_batch(args.batch, args.seq_len, config.vocab_size, g).to(device)
        return model(x).loss

    model.train()
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    out = train_steps(step, params, steps=args.steps, warmup=min(5, args.steps // 3),
                      tokens_per_step=args.batch * args.seq_len, lr=1e-3 if args.tiny else 3e-4,
                      device=device, bf16=device.type == "cuda", max_seconds=60 * args.minutes)
    model.eval()
    return out


def check_placement(model, prompts: torch.Tensor, args, device: torch.device) -> dict:
    """Both towers through the two-device code path on one device (and on two GPUs if present)."""
    from twotower import place_towers_on_devices

    kw = {"gamma": args.gamma, "max_new_tokens": min(args.max_new_tokens, 4 * args.block_size)}
    before = model.generate(prompts, mode="diffusion", **kw).sequences.cpu()
    place_towers_on_devices(model, context_device=device, denoiser_device=device)
    ar = model.generate(prompts, mode="ar", **kw).sequences.cpu()
    mock = model.generate(prompts, mode="mock_ar", **kw).sequences.cpu()
    verified = model.generate(prompts, mode="verified", **kw).sequences.cpu()
    after = model.generate(prompts, mode="diffusion", **kw).sequences.cpu()
    result = {"same_device": str(device), "mock_ar_equals_ar": bool(torch.equal(ar, mock)),
              "verified_equals_ar": bool(torch.equal(ar, verified)),
              "diffusion_unchanged_by_placement": bool(torch.equal(before, after))}
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        place_towers_on_devices(model, context_device="cuda:0", denoiser_device="cuda:1")
        two = model.generate(prompts, mode="diffusion", **kw).sequences.cpu()
        result["two_gpus_match_one"] = bool(torch.equal(two, after))
        result["two_gpus_verified_equals_ar"] = bool(torch.equal(
            model.generate(prompts, mode="verified", **kw).sequences.cpu(), ar))
        place_towers_on_devices(model, context_device=device, denoiser_device=device)
    return result


def check_fsdp2(device: torch.device, args) -> dict:
    """Step 5: `fit_distributed` with FSDP2 and bf16-mixed, one worker per GPU (2 on CPU)."""
    import tempfile

    import ray
    import ray.cloudpickle

    import tests.test_scale_distributed as harness
    from stages.training.train_distributed import DistributedConfig, fit_distributed

    ray.cloudpickle.register_pickle_by_value(harness)  # tests/ is not importable on the workers
    make_data, make_twotower_module = harness.make_data, harness.make_twotower_module

    on_gpu = device.type == "cuda"
    workers = max(1, torch.cuda.device_count()) if on_gpu else 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        cfg = DistributedConfig(storage_path=root, name="gpu-check-fsdp2", num_workers=workers, use_gpu=on_gpu,
                                strategy="fsdp", precision="bf16-mixed", max_steps=4, report_every=1,
                                checkpoint_every=2)
        owns = not ray.is_initialized()
        try:
            result = fit_distributed(make_twotower_module, make_data, cfg)
            shards = sorted(p.name for p in (Path(result.checkpoint_path) / "checkpoint.ckpt").glob("*.distcp"))
            state = result.load_state_dict()
        finally:
            if owns:
                ray.shutdown()
    losses = [r["loss"] for r in result.history]
    ok = len(losses) == 4 and all(x == x and abs(x) < 1e4 for x in losses) and len(shards) == workers \
        and any(k.startswith("model.denoiser.") for k in state)
    return {"ok": ok, "workers": workers, "backend": "nccl" if on_gpu else "gloo", "losses": losses,
            "shards": shards, "seconds": round(time.perf_counter() - started, 1)}


def run(args: argparse.Namespace) -> dict:
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    args = _defaults(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    report: dict = {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny,
                    "args": {k: v for k, v in vars(args).items() if k != "out"}}
    backbone, config, counts = build_backbone(args, device)
    report["params"] = counts.as_dict()
    print(f"[gpu_check] {report['device']}: Nemotron-H pattern {config.hybrid_override_pattern}, "
          f"{counts.total / 1e6:,.2f} M params ({counts.active / 1e6:,.2f} M active per token)", flush=True)

    report["train_backbone"] = train_backbone(backbone, config, args, device)
    print(f"[gpu_check] backbone AR training: {report['train_backbone']}", flush=True)

    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=args.block_size))
    model.to(device)
    report["train_denoiser"] = train_denoiser(model, config, args, device)
    print(f"[gpu_check] denoiser training: {report['train_denoiser']}", flush=True)

    g = torch.Generator().manual_seed(args.seed + 2)
    rows = []
    for batch in (1, 8):
        prompts = copy_task_batch(batch, args.prompt_len, config.vocab_size, g).to(device)
        rows.append(decode_side_by_side(model, prompts, gamma=args.gamma, max_new_tokens=args.max_new_tokens,
                                        device=device, bf16=device.type == "cuda"))
    report["decode"] = rows
    print("[gpu_check] decode, AR vs diffusion (gamma %.2f, B %d, %d new tokens):\n%s"
          % (args.gamma, args.block_size, args.max_new_tokens, format_decode_table(rows)), flush=True)

    prompts = copy_task_batch(2, args.prompt_len, config.vocab_size, g).to(device)
    report["placement"] = check_placement(model, prompts, args, device)
    print(f"[gpu_check] placement: {report['placement']}", flush=True)
    if args.fsdp:
        report["fsdp2"] = check_fsdp2(device, args)
        print(f"[gpu_check] FSDP2: {report['fsdp2']}", flush=True)
    if device.type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report["wall_s"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    report = run(parse_args(argv))
    placement = report["placement"]
    ok = all(placement[k] for k in ("mock_ar_equals_ar", "verified_equals_ar", "diffusion_unchanged_by_placement")) \
        and placement.get("two_gpus_verified_equals_ar", True) and report.get("fsdp2", {}).get("ok", True)
    print(f"[gpu_check] {'OK' if ok else 'FAILED'} in {report['wall_s']:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
