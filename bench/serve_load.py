"""Load test of `python -m pipeline serve`: a real OpenAI client at several concurrencies, the same
server asked for `auto` (the mode per batch) and for `ar`, side by side.

    python bench/serve_load.py runs/cache/export/<key>/model --requests 32 --concurrency 1 4 16

Starts the server on loopback (Ray Serve, a free port), sends the tiny recipe's held-out task
prompts through `openai.OpenAI` from `c` client threads, and prints per concurrency and mode:
p50/p95 latency, throughput (completion tokens per second of wall time), the modes the server
chose, and the ratios auto / ar. Then checks that `verified` (and `auto` wherever every block of
the answer ran `verified` or `ar`) returned AR's text for every prompt. The rounds alternate ar / auto so load
on the machine drifts on both alike. `--json FILE` keeps every number.

Mixed lengths (`--long-every K --long-tokens N`: every K-th request asks for N tokens) show what
continuous batching is for: the table then also gives the p50 latency of the short requests, which
wait behind the long ones unless they can join a batch in flight. An export whose model has no EOS
runs every request to its max_tokens: `tests/serving_fixtures.tiny_export(path, eos=False,
max_positions=4096)` writes one (random weights).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXACT = ("verified", "ar")


def prompts_for(n: int, seed: int = 424242) -> list[str]:
    """`n` prompts from the tiny recipe's task families (a seed the data stage never uses)."""
    from stages.data.tasks import generate
    from stages.prepare_data import DEFAULT_TASKS

    rows = generate(list(DEFAULT_TASKS), -(-n // len(DEFAULT_TASKS)), seed=seed)
    return [row["prompt"] for row in rows[:n]]


def one(client, prompt: str, mode: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    reply = client.completions.create(model="twotower", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"mode": mode})
    seconds = time.perf_counter() - start
    extra = (reply.model_extra or {}).get("twotower", {})
    return {"text": reply.choices[0].text, "tokens": reply.usage.completion_tokens, "seconds": seconds,
            "mode": extra.get("mode"), "ran": sorted(extra.get("modes") or [extra.get("mode")]),
            "batch": extra.get("batch_size"), "decode_s": extra.get("decode_ms", 0) / 1000,
            "server_s": extra.get("server_ms", 0) / 1000}


def round_of(client, prompts: list[str], mode: str, concurrency: int, max_tokens: int | list[int]) -> dict:
    """Every prompt once, `concurrency` requests in flight (`max_tokens`: one for all, or per prompt)."""
    budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(lambda pb: one(client, pb[0], mode, pb[1]), zip(prompts, budgets)))
    wall = time.perf_counter() - start
    latencies = sorted(r["seconds"] for r in replies)
    short = min(budgets)
    tokens = sum(r["tokens"] for r in replies)
    return {"mode": mode, "concurrency": concurrency, "requests": len(prompts), "wall_s": wall,
            "p50_s": statistics.median(latencies),
            "decode_p50_s": statistics.median(r["decode_s"] for r in replies),
            "server_p50_s": statistics.median(r["server_s"] for r in replies),
            "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
            "short_p50_s": statistics.median(r["seconds"] for r, b in zip(replies, budgets) if b == short),
            "tokens": tokens, "tokens_per_s": tokens / wall, "chosen": dict(Counter(r["mode"] for r in replies)),
            "batches": dict(Counter(r["batch"] for r in replies)), "texts": [r["text"] for r in replies],
            "modes": [r["ran"] for r in replies]}


def run(url: str, prompts: list[str], concurrency: list[int], max_tokens: int, repeats: int = 1,
        long_every: int = 0, long_tokens: int = 0) -> dict:
    """The load test against a running server at `url` (every `long_every`-th request asking for
    `long_tokens` tokens when long_every > 0)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    for mode in ("ar", "auto", "verified"):  # warm-up: first calls pay one-off costs
        round_of(client, prompts[:4], mode, 4, max_tokens)
    budgets = [long_tokens if long_every and i % long_every == 0 else max_tokens for i in range(len(prompts))]
    rounds = []
    for c in concurrency:
        for k in range(repeats):
            for mode in (("ar", "auto") if k % 2 == 0 else ("auto", "ar")):
                rounds.append(round_of(client, prompts, mode, c, budgets))
    verified = round_of(client, prompts, "verified", max(concurrency), budgets)
    ar_texts = next(r["texts"] for r in rounds if r["mode"] == "ar")
    exact = {"verified": sum(a == b for a, b in zip(verified["texts"], ar_texts)), "of": len(prompts)}
    checked = [(t, a) for r in rounds if r["mode"] == "auto" for t, a, ran in zip(r["texts"], ar_texts, r["modes"])
               if set(ran) <= set(EXACT)]  # every block of it ran verified or ar
    exact["auto_exact_modes"] = {"equal": sum(t == a for t, a in checked), "of": len(checked)}
    table = []
    for c in concurrency:
        ar = [r for r in rounds if r["concurrency"] == c and r["mode"] == "ar"]
        auto = [r for r in rounds if r["concurrency"] == c and r["mode"] == "auto"]
        med = lambda rs, key: statistics.median(r[key] for r in rs)
        table.append({"concurrency": c, "ar_p50_s": med(ar, "p50_s"), "auto_p50_s": med(auto, "p50_s"),
                      "ar_p95_s": med(ar, "p95_s"), "auto_p95_s": med(auto, "p95_s"),
                      "ar_tokens_per_s": med(ar, "tokens_per_s"), "auto_tokens_per_s": med(auto, "tokens_per_s"),
                      "ar_decode_p50_s": med(ar, "decode_p50_s"), "auto_decode_p50_s": med(auto, "decode_p50_s"),
                      "ar_server_p50_s": med(ar, "server_p50_s"), "auto_server_p50_s": med(auto, "server_p50_s"),
                      "ar_short_p50_s": med(ar, "short_p50_s"), "auto_short_p50_s": med(auto, "short_p50_s"),
                      "auto_chosen": auto[0]["chosen"], "auto_batches": auto[0]["batches"],
                      "latency_ratio": med(auto, "p50_s") / med(ar, "p50_s"),
                      "throughput_ratio": med(auto, "tokens_per_s") / med(ar, "tokens_per_s")})
    for r in rounds + [verified]:
        r.pop("texts"), r.pop("modes")
    return {"table": table, "exact": exact, "rounds": rounds, "verified_round": verified,
            "mixed": {"long_every": long_every, "long_tokens": long_tokens} if long_every else None}


def render(result: dict) -> str:
    lines = ["| concurrency | p50 latency auto / ar (s) | of which in the server | of which decoding | "
             "p95 auto / ar (s) | tokens/s auto / ar | latency ratio | throughput ratio | auto chose | "
             "batch sizes (auto) |", "|---" * 10 + "|"]
    for row in result["table"]:
        lines.append(f"| {row['concurrency']} | {row['auto_p50_s']:.3f} / {row['ar_p50_s']:.3f} | "
                     f"{row['auto_server_p50_s']:.3f} / {row['ar_server_p50_s']:.3f} | "
                     f"{row['auto_decode_p50_s']:.3f} / {row['ar_decode_p50_s']:.3f} | "
                     f"{row['auto_p95_s']:.3f} / {row['ar_p95_s']:.3f} | "
                     f"{row['auto_tokens_per_s']:.0f} / {row['ar_tokens_per_s']:.0f} | "
                     f"{row['latency_ratio']:.2f} | {row['throughput_ratio']:.2f} | {row['auto_chosen']} | "
                     f"{row['auto_batches']} |")
    if result.get("mixed"):
        lines[0] += " p50 of the short requests auto / ar (s) |"
        lines[1] += "---|"
        for i, row in enumerate(result["table"]):
            lines[2 + i] += f" {row['auto_short_p50_s']:.3f} / {row['ar_short_p50_s']:.3f} |"
    ex = result["exact"]
    lines.append(f"\n`verified` returned AR's text for {ex['verified']}/{ex['of']} prompts; `auto` where every block "
                 f"ran verified or ar: {ex['auto_exact_modes']['equal']}/{ex['auto_exact_modes']['of']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir")
    p.add_argument("--requests", type=int, default=32, help="prompts per round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="rounds per mode and concurrency (alternating order)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the replica (0: every core)")
    p.add_argument("--long-every", type=int, default=0, help="every K-th request is a long one (0: none)")
    p.add_argument("--long-tokens", type=int, default=256, help="max_tokens of the long requests")
    p.add_argument("--local", action="store_true", help="start the server without Ray (`pipeline serve --local`)")
    p.add_argument("--url", default=None, help="a server already running (default: start one here)")
    p.add_argument("--json", default=None, help="write every number to this file")
    args = p.parse_args(argv)
    from serving import launch

    url = args.url
    if url is None:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options = dict(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, threads=args.threads)
        local = launch.LocalServer(args.export_dir, "127.0.0.1", port, **options) if args.local else None
        url = local.url if local else launch.start(args.export_dir, port=port, **options)
    try:
        result = run(url, prompts_for(args.requests), args.concurrency, args.max_tokens, args.repeats,
                     args.long_every, args.long_tokens)
    finally:
        if args.url is None:
            local.stop() if local else launch.stop()
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
