"""Peak memory of the data path at two corpus sizes 10x apart: does it grow with the corpus?

For each size (a JSONL text corpus of `--docs` and 10x as many documents, ~2,000 characters each,
char tokenizer: one token per character), three fresh subprocesses report their peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which counts the pages of memory-mapped files that
were touched too):

- `prepare`: `prepare_data.run` streaming the corpus into token shards;
- `worker`: one training worker's data path and steps: a Lightning fit of a tiny next-token model
  for `--steps` steps on `ShardLoaders` (memory-mapped `ShardRows` + `RowSampler`), as each Ray
  Train worker runs it;
- `materialize`: for contrast, the whole train split loaded as int64 tensors, which is what every
  worker held before shards (`stages.training.optimisation.load_tokens`).

    python -m bench.data_rss [--docs 3000] [--steps 50]

Prints one table: per process and corpus size, ru_maxrss and the peaks of RssAnon (private
memory) and RssFile (pages of mapped files and libraries: shared, reclaimable page cache),
sampled every 20 ms, and the ratio large/small.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("block tower token shard model stream noise mask row seed denoiser context backbone layer "
         "expert attention mamba state gradient epoch batch worker restart checkpoint").split()


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(300))[:2000]
            f.write(json.dumps({"text": text}) + "\n")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class AnonPeak:
    """Samples `RssAnon` / `RssFile` of /proc/self/status every 20 ms from a thread: the peak of
    private memory apart from the pages of mapped files (shared, reclaimable page cache), which
    ru_maxrss lumps together."""

    def __init__(self) -> None:
        import threading

        self.anon = self.file = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                self.anon = max(self.anon, int(line.split()[1]) / 1024.0)
            elif line.startswith("RssFile:"):
                self.file = max(self.file, int(line.split()[1]) / 1024.0)

    def _loop(self) -> None:
        while not self.stop.wait(0.02):
            self.sample()

    def done(self) -> dict:
        self.stop.set()
        self.thread.join()
        self.sample()
        return {"peak_anon_mb": self.anon, "peak_file_mb": self.file}


def child_prepare(corpus: str, out: str) -> dict:
    from stages import prepare_data
    from stages.api import StageContext

    cfg = prepare_data.Config(source="files", paths=[corpus], max_documents=10**9, seq_len=128, block_size=16,
                              eval_fraction=0.01, shard_tokens=1 << 20)
    t0 = time.monotonic()
    m = prepare_data.run(cfg, {}, StageContext(name="prepare_data", out_dir=Path(out), work_dir=Path(out) / "work",
                                               run_dir=Path(out)))
    return {"seconds": time.monotonic() - t0, "train_tokens": m["metrics"]["train_tokens"],
            "shards": m["metrics"]["train_shards"]}


def child_worker(shards: str, steps: int) -> dict:
    import pytorch_lightning as pl
    import torch

    from stages.data.row_sampler import sampler_checkpoint
    from stages.data.rows import ShardLoaders, ShardRows
    from stages.data.token_shards import TokenShards

    torch.set_num_threads(1)
    rows = ShardRows(TokenShards(Path(shards) / "train_shards"), "all", pad_id=-1)
    val = ShardRows(TokenShards(Path(shards) / "eval_shards"), "all", pad_id=-1)
    train_dl, _ = ShardLoaders(rows, val, block_size=16, batch_size=16, seed=0)()
    vocab = int(rows.shards.index["vocab_size"])

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(vocab, 32), torch.nn.Linear(32, vocab)

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            logits = self.out(self.emb(ids[:, :-1]))
            return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    t0 = time.monotonic()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[sampler_checkpoint(train_dl.batch_sampler)])
    trainer.fit(Tiny(), train_dl)
    return {"seconds": time.monotonic() - t0, "rows": len(rows), "steps": int(trainer.global_step)}


def child_materialize(shards: str) -> dict:
    from stages.training.optimisation import load_tokens

    ids, mask = load_tokens(str(Path(shards) / "train_shards"), "train_tokens")
    return {"rows": int(ids.shape[0]), "bytes": int(ids.numel() * ids.element_size() + mask.numel())}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.data_rss", "--child", *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="documents of the small corpus (large: 10x)")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the worker")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        sampler = AnonPeak()
        result = {"prepare": lambda: child_prepare(*rest), "worker": lambda: child_worker(rest[0], int(rest[1])),
                  "materialize": lambda: child_materialize(rest[0])}[kind]()
        print(json.dumps({**result, **sampler.done(), "peak_rss_mb": peak_rss_mb()}))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, n in (("small", args.docs), ("large", 10 * args.docs)):
            corpus = Path(tmp) / f"{label}.jsonl"
            write_corpus(corpus, n)
            out = str(Path(tmp) / f"{label}-data")
            rows[label] = {"docs": n, "prepare": run_child("prepare", str(corpus), out),
                           "worker": run_child("worker", out, str(args.steps)),
                           "materialize": run_child("materialize", out)}
    s, large = rows["small"], rows["large"]
    print(f"corpus: {s['docs']} vs {large['docs']} documents; train tokens {s['prepare']['train_tokens']:,} vs "
          f"{large['prepare']['train_tokens']:,} ({s['prepare']['shards']} vs {large['prepare']['shards']} shards)")
    print(f"{'process':<34}{'measure':<18}{'small MB':>10}{'large MB':>10}{'large/small':>13}")
    for key, name in (("prepare", "prepare_data (streaming, shards)"),
                      ("worker", f"training worker ({args.steps} steps, mmap)"),
                      ("materialize", "whole split as int64 (before)")):
        for measure, label in (("peak_rss_mb", "ru_maxrss"), ("peak_anon_mb", "RssAnon peak"),
                               ("peak_file_mb", "RssFile peak")):
            a, b = s[key][measure], large[key][measure]
            print(f"{name:<34}{label:<18}{a:>10.0f}{b:>10.0f}{b / a:>13.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
