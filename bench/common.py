"""Shared pieces of the benchmarks: Nemotron-H-pattern configs, synthetic data, timed loops.

The data is a copy task (a random segment repeated to fill the row): learnable in a few hundred
steps by attention and by the denoiser alike, so decode measurements run on a model that is
confident enough for diffusion decoding to commit several tokens per forward. Timings synchronise
the accelerator around each measured region and drop a warm-up.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# The Nano pattern's first 25 layers: Mamba-2 / MoE alternating, attention every ~7 layers.
PATTERN_1B = "MEMEM*EMEMEM*EMEMEM*EMEME"


@dataclass(frozen=True)
class ModelSize:
    """Widths of a Nemotron-H-pattern backbone."""

    hidden: int
    """Hidden size."""
    pattern: str
    """Layer pattern: M Mamba-2, E MoE, * attention, - MLP."""
    vocab: int
    """Vocabulary size."""
    experts: int
    """Routed experts per MoE layer."""
    top_k: int
    """Experts per token."""
    expert_width: int
    """Routed expert intermediate size (shared expert: twice this)."""
    heads: int
    """Attention heads (KV heads: a quarter)."""
    head_dim: int
    """Attention head dim."""
    mamba_heads: int
    """Mamba-2 heads."""
    mamba_head_dim: int
    """Mamba-2 head dim."""
    state: int
    """SSM state size."""
    chunk: int
    """Mamba chunk size (keep near the block size on CPU: the torch fallback pads to it)."""


SIZES = {
    # ~1.17 B parameters in total, ~0.44 B active per token.
    "1b": ModelSize(hidden=1536, pattern=PATTERN_1B, vocab=32768, experts=32, top_k=4, expert_width=768,
                    heads=16, head_dim=96, mamba_heads=48, mamba_head_dim=64, state=64, chunk=128),
    # A CPU model that learns the copy task in a couple of minutes (decode benchmark on CPU).
    "small": ModelSize(hidden=96, pattern="MEM*EME*", vocab=32, experts=4, top_k=2, expert_width=96,
                       heads=4, head_dim=24, mamba_heads=4, mamba_head_dim=24, state=16, chunk=16),
    # The same pattern kinds at a width a 2-core CPU runs in seconds.
    "tiny": ModelSize(hidden=32, pattern="MEM*EME", vocab=64, experts=4, top_k=2, expert_width=16,
                      heads=4, head_dim=8, mamba_heads=4, mamba_head_dim=8, state=8, chunk=16),
}


def nemotron_h_config(size: ModelSize):
    """A transformers `NemotronHConfig` with the Nano's kinds of layers at `size`."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "nemotron_h", hidden_size=size.hidden, hybrid_override_pattern=size.pattern,
        num_hidden_layers=len(size.pattern), vocab_size=size.vocab, tie_word_embeddings=False,
        num_attention_heads=size.heads, num_key_value_heads=max(1, size.heads // 4), head_dim=size.head_dim,
        mamba_num_heads=size.mamba_heads, mamba_head_dim=size.mamba_head_dim, ssm_state_size=size.state,
        n_groups=max(1, size.mamba_heads // 16), conv_kernel=4, chunk_size=size.chunk,
        n_routed_experts=size.experts, num_experts_per_tok=size.top_k, moe_intermediate_size=size.expert_width,
        moe_shared_expert_intermediate_size=2 * size.expert_width, intermediate_size=size.expert_width,
        routed_scaling_factor=2.5, mlp_hidden_act="relu2", max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def copy_task_batch(batch: int, length: int, vocab: int, generator: torch.Generator,
                    period: tuple[int, int] = (8, 24)) -> torch.Tensor:
    """[batch, length] rows: a random segment (ids >= 3) of a random period, repeated."""
    rows = []
    for _ in range(batch):
        p = int(torch.randint(period[0], period[1] + 1, (1,), generator=generator))
        seg = torch.randint(3, vocab, (p,), generator=generator)
        rows.append(seg.repeat(length // p + 1)[:length])
    return torch.stack(rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: dict, key: str):
    """Adds the wall time of the block, accelerator synchronised, to `out[key]`."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    out[key] = out.get(key, 0.0) + time.perf_counter() - start


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the device (fp32 master weights), or a no-op."""
    if not bf16:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_steps(step_fn, params, *, steps: int, warmup: int, tokens_per_step: int, lr: float,
                device: torch.device, bf16: bool, max_seconds: float | None = None) -> dict:
    """Run `steps` AdamW steps of `loss = step_fn(i)` (fewer if `max_seconds` runs out first);
    tokens/s over the steps after `warmup`."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses: list[float] = []
    timing: dict[str, float] = {}
    done = 0
    for i in range(steps):
        if max_seconds is not None and sum(timing.values()) > max_seconds:
            break
        key = "measured" if i >= warmup else "warmup"
        with timed(device, timing, key):
            with autocast(device, bf16):
                loss = step_fn(i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        losses.append(loss.item())
        done += 1
    measured = max(done - warmup, 0)
    seconds = timing.get("measured", 0.0)
    return {
        "steps": done,
        "first_loss": losses[0],
        "last_loss": sum(losses[-5:]) / len(losses[-5:]),
        "tokens_per_s": measured * tokens_per_step / seconds if seconds else None,
    }


DECODE_MODES = ("ar", "diffusion", "verified")
"""The modes `decode_side_by_side` times by default: AR, and the two faster ones against it."""
SHOWN_MODES = ("diffusion", "verified", "auto")
"""The modes `format_decode_table` shows beside AR, when a row has them."""


def auto_table(rows: list[dict], min_agreement: float) -> dict[int, str]:
    """Per measured batch size the fastest mode whose output is AR's or agrees with it on at least
    `min_agreement` of the tokens (ar and verified always qualify): `generate`'s `auto_modes`."""
    table = {}
    for r in rows:
        ok = [m for m in DECODE_MODES if f"{m}_tokens_per_s" in r
              and (m in ("ar", "verified") or r[f"{m}_agreement"] >= min_agreement)]
        table[r["batch"]] = max(ok, key=lambda m: r[f"{m}_tokens_per_s"])
    return table


def decode_side_by_side(model, prompts: torch.Tensor, *, gamma: float, max_new_tokens: int,
                        device: torch.device, bf16: bool, repeats: int = 2,
                        modes: tuple[str, ...] = DECODE_MODES, draft: str | int = "confident",
                        auto_modes: dict[int, str] | None = None) -> dict:
    """The modes on the same prompts in the same process, interleaved (every repeat times each mode
    once, so a load change on a shared machine hits all alike): tokens/s, forwards, agreement.
    Keys per mode `m`: `{m}_tokens_per_s`, `{m}_speedup` (vs ar), `{m}_tokens_per_forward`
    (generated tokens per model forward a row took part in), `{m}_agreement` (with ar), `{m}_wait`
    (the batch's forwards / the mean row's: 1.0 when no row waits for a slower neighbour);
    `verified_accepted_per_verify`; and, for the older tables, `speedup` and
    `tokens_per_diffusion_forward` (diffusion's) and `agreement_with_ar`. draft: verified's
    draft policy (`generate`'s `draft`)."""
    if "ar" not in modes:
        raise ValueError(f"decode_side_by_side: modes must include 'ar' (the reference), got {modes}")
    timing: dict[str, float] = {}
    gens = {}
    kwargs = {m: dict(mode=m, gamma=gamma, max_new_tokens=max_new_tokens) for m in modes}
    if "verified" in kwargs:
        kwargs["verified"]["draft"] = draft
    if "auto" in kwargs:
        kwargs["auto"].update(auto_modes=auto_modes, draft=draft)
    with autocast(device, bf16):
        for mode in modes:  # warm-up
            model.generate(prompts, **kwargs[mode])
        for _ in range(repeats):
            for mode in modes:
                with timed(device, timing, mode):
                    gens[mode] = model.generate(prompts, **kwargs[mode])
    row: dict = {"batch": len(prompts)}
    ar = gens["ar"].generated.cpu()
    for mode in modes:
        gen = gens[mode]
        tokens = int(gen.num_generated.sum())
        row[f"{mode}_tokens"], row[f"{mode}_seconds"] = tokens * repeats, timing[mode]
        row[f"{mode}_tokens_per_s"] = tokens * repeats / timing[mode]
        row[f"{mode}_forwards"] = gen.num_denoiser_forwards + gen.num_context_forwards
        row[f"{mode}_tokens_per_forward"] = gen.tokens_per_forward
        # the batch's forwards over an average row's: what rows pay for waiting on their slowest neighbour
        row[f"{mode}_wait"] = row[f"{mode}_forwards"] / float(gen.row_forwards.float().mean())
        out = gen.generated.cpu()
        width = min(ar.shape[1], out.shape[1])
        row[f"{mode}_agreement"] = (ar[:, :width] == out[:, :width]).float().mean().item()
    for mode in modes:
        row[f"{mode}_speedup"] = row[f"{mode}_tokens_per_s"] / row["ar_tokens_per_s"]
    if "verified" in gens:
        row["verified_accepted_per_verify"] = gens["verified"].accepted_per_verify
    if "auto" in gens:
        row["auto_picked"] = gens["auto"].mode
    if "diffusion" in gens:
        row.update(speedup=row["diffusion_speedup"], agreement_with_ar=row["diffusion_agreement"],
                   tokens_per_diffusion_forward=row["diffusion_tokens_per_forward"])
    return row


def decode_batches_side_by_side(model, batches: list, **kwargs) -> dict:
    """`decode_side_by_side` over several batches of one size (the same prompts cut into batches of
    b, so every batch size decodes the same prompts and no single prompt decides a size's figures),
    merged into one row: tokens/s and speedup from the summed tokens and seconds, tokens per forward
    from the summed forwards' share, agreement, wait and tokens kept per verification weighted by
    each batch's tokens."""
    parts = [decode_side_by_side(model, batch, **kwargs) for batch in batches]
    if len(parts) == 1:
        return parts[0]
    modes = [k[: -len("_tokens_per_s")] for k in parts[0] if k.endswith("_tokens_per_s")]
    row: dict = {"batch": parts[0]["batch"], "n_prompts": sum(len(b) for b in batches)}
    for m in modes:
        tokens = sum(p[f"{m}_tokens"] for p in parts)
        row[f"{m}_tokens"], row[f"{m}_seconds"] = tokens, sum(p[f"{m}_seconds"] for p in parts)
        row[f"{m}_tokens_per_s"] = tokens / row[f"{m}_seconds"]
        row[f"{m}_forwards"] = sum(p[f"{m}_forwards"] for p in parts)
        row[f"{m}_tokens_per_forward"] = tokens / sum(p[f"{m}_tokens"] / p[f"{m}_tokens_per_forward"] for p in parts)
        for key in (f"{m}_agreement", f"{m}_wait"):
            row[key] = sum(p[key] * p[f"{m}_tokens"] for p in parts) / tokens
    for m in modes:
        row[f"{m}_speedup"] = row[f"{m}_tokens_per_s"] / row["ar_tokens_per_s"]
    if "verified_accepted_per_verify" in parts[0]:
        row["verified_accepted_per_verify"] = sum(p["verified_accepted_per_verify"] * p["verified_tokens"]
                                                  for p in parts) / row["verified_tokens"]
    if "auto_picked" in parts[0]:
        row["auto_picked"] = "/".join(dict.fromkeys(p["auto_picked"] for p in parts))
    if "diffusion_speedup" in row:
        row.update(speedup=row["diffusion_speedup"], agreement_with_ar=row["diffusion_agreement"],
                   tokens_per_diffusion_forward=row["diffusion_tokens_per_forward"])
    return row


def format_decode_table(rows: list[dict]) -> str:
    """One line per batch size: AR tok/s, then per other mode tok/s, speedup over AR, tokens per
    model forward, agreement with AR and the waiting factor (verified: tokens kept per verification
    too)."""
    modes = [m for m in SHOWN_MODES if f"{m}_tokens_per_s" in rows[0]]
    head = f"{'batch':>5} {'ar tok/s':>9}" + "".join(
        f" | {m[:5] + ' tok/s':>11} {'speedup':>7} {'tok/fwd':>7} {'agree':>5} {'wait':>4}" for m in modes)
    if "verified" in modes:
        head += f" {'kept/verify':>11}"
    if "auto" in modes:
        head += f" {'auto ran':>9}"
    lines = [head]
    for r in rows:
        line = f"{r['batch']:>5} {r['ar_tokens_per_s']:>9.1f}" + "".join(
            f" | {r[f'{m}_tokens_per_s']:>11.1f} {r[f'{m}_speedup']:>6.2f}x {r[f'{m}_tokens_per_forward']:>7.2f}"
            f" {r[f'{m}_agreement']:>5.2f} {r[f'{m}_wait']:>4.2f}" for m in modes)
        if "verified" in modes:
            line += f" {r['verified_accepted_per_verify']:>11.2f}"
        if "auto" in modes:
            line += f" {r['auto_picked']:>9}"
        lines.append(line)
    return "\n".join(lines)
