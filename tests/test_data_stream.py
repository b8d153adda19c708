"""Data that streams: token shards on disk (dtype, index, checksums, atomic publish), lazy
memory-mapped reading, the seeded per-rank row order and its exact mid-epoch resume, and
prepare_data -> train_denoiser on a plain-text corpus through the lazy path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import prepare_data
from stages.api import StageContext
from stages.data.row_sampler import RowSampler
from stages.data.token_shards import INDEX_FILE, ShardWriter, TokenShards, token_dtype


def _rows(n: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len))


def _write(path: Path, rows: np.ndarray, vocab: int, shard_tokens: int, masks=None) -> dict:
    with ShardWriter(path, rows.shape[1], vocab, shard_tokens) as w:
        for i, r in enumerate(rows):
            w.add(r, None if masks is None else masks[i])
    return json.loads((path / INDEX_FILE).read_text())


def test_dtype_follows_the_vocabulary():
    assert token_dtype(64) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(262144) == np.uint32


@pytest.mark.parametrize("vocab", [300, 70000])
def test_shards_index_and_lazy_reading_round_trip(tmp_path, vocab):
    rows = _rows(23, 8, vocab)
    masks = (np.arange(8) >= 3)[None].repeat(23, 0).astype(np.uint8)
    index = _write(tmp_path / "s", rows, vocab, shard_tokens=40, masks=masks)  # 5 rows per shard
    assert index["rows"] == 23 and [s["rows"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert index["dtype"] == ("uint16" if vocab <= 65536 else "uint32")
    assert index["loss_tokens"] == int(masks.sum())
    first = np.load(tmp_path / "s" / index["shards"][0]["tokens"])
    assert first.dtype == token_dtype(vocab) and first.shape == (5, 8)
    shards = TokenShards(tmp_path / "s")
    shards.verify()
    assert len(shards) == 23
    ids, m = shards.batch(range(23))
    assert ids.dtype == np.int64 and (ids == rows).all() and (m == masks.astype(bool)).all()
    # lazy: only the shards of the rows read are mapped, and as read-only memory maps
    fresh = TokenShards(tmp_path / "s")
    fresh.row(12)
    assert list(fresh._maps) == [2] and isinstance(fresh._maps[2][0], np.memmap)
    assert fresh._maps[2][0].base is not None and not fresh._maps[2][0].flags.writeable


def test_all_ones_mask_is_not_stored(tmp_path):
    index = _write(tmp_path / "s", _rows(4, 8, 100), 100, shard_tokens=1000)
    assert index["shards"][0]["mask"] is None and sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        INDEX_FILE, "tokens-00000.npy"]
    assert TokenShards(tmp_path / "s").row(3)[1].all()


def test_writing_is_atomic_and_replaces_a_previous_split(tmp_path):
    out = tmp_path / "train_shards"
    _write(out, _rows(4, 8, 100, seed=1), 100, shard_tokens=16)
    with pytest.raises(RuntimeError, match="source died"):
        with ShardWriter(out, 8, 100, shard_tokens=16) as w:
            for r in _rows(6, 8, 100, seed=2):
                w.add(r)  # shards of the new split are being written into train_shards.partial
            assert (tmp_path / "train_shards.partial").is_dir()
            raise RuntimeError("source died")
    assert not (tmp_path / "train_shards.partial").exists()
    assert (TokenShards(out).batch(range(4))[0] == _rows(4, 8, 100, seed=1)).all()  # the old one, intact
    _write(out, _rows(6, 8, 100, seed=2), 100, shard_tokens=16)
    assert len(TokenShards(out)) == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["train_shards"]


def test_bad_rows_and_damaged_shards_are_named(tmp_path):
    with pytest.raises(ValueError, match="data.seq_len"):
        with ShardWriter(tmp_path / "a", 8, 100, 16) as w:
            w.add([1, 2, 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with ShardWriter(tmp_path / "a", 2, 100, 16) as w:
            w.add([1, 100])
    _write(tmp_path / "s", _rows(4, 8, 100), 100, shard_tokens=16)
    with pytest.raises(ValueError, match="prepare_data.artifacts.train_tokens: .*no index.json"):
        TokenShards(tmp_path / "a", "prepare_data.artifacts.train_tokens")
    path = tmp_path / "s" / "tokens-00001.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="tokens-00001.npy has sha256"):
        TokenShards(tmp_path / "s").verify()


# ---- the row order -----------------------------------------------------------------------------


def test_order_is_seeded_per_epoch_and_covers_the_rows():
    a, b = RowSampler(50, 4, seed=7), RowSampler(50, 4, seed=7)
    assert (a.epoch_batches(0) == b.epoch_batches(0)).all()
    assert not (a.epoch_batches(0) == a.epoch_batches(1)).all()
    assert not (a.epoch_batches(0) == RowSampler(50, 4, seed=8).epoch_batches(0)).all()
    flat = a.epoch_batches(0).ravel()
    assert len(a) == 12 and len(set(flat.tolist())) == 48  # 12 whole batches, no row twice


def test_ranks_read_disjoint_parts_of_equal_length():
    parts = [RowSampler(103, 5, seed=3, rank=r, world_size=4) for r in range(4)]
    assert {len(p) for p in parts} == {5}  # 103 // 4 = 25 rows each, 5 batches
    for epoch in (0, 1):
        seen = [set(p.epoch_batches(epoch).ravel().tolist()) for p in parts]
        assert all(len(s) == 25 for s in seen)
        assert len(set().union(*seen)) == 100  # pairwise disjoint
    with pytest.raises(ValueError, match="train.batch_size=5 x 4 workers"):
        RowSampler(12, 5, seed=0, rank=0, world_size=4)


def test_workers_validate_disjoint_eval_parts_of_equal_length():
    """`ShardLoaders.for_rank`: worker r of w validates every w-th eval row from r (cut to equal
    lengths); one process, or an eval split smaller than w, validates every row."""
    import torch

    from stages.data.rows import ShardLoaders

    rows = [(torch.full((8,), i), torch.ones(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool)) for i in range(11)]
    loaders = ShardLoaders(rows, rows, block_size=4, batch_size=2, seed=0)
    parts = [loaders.for_rank(r, 3)[1] for r in range(3)]
    seen = [[int(b[0][i, 0]) for b in part for i in range(b[0].shape[0])] for part in parts]
    assert [len(s) for s in seen] == [3, 3, 3] and len(set().union(*map(set, seen))) == 9  # 11 // 3 * 3, disjoint
    assert seen[1] == [1, 4, 7]
    whole = [int(b[0][i, 0]) for b in loaders.for_rank(0, 1)[1] for i in range(b[0].shape[0])]
    assert whole == list(range(11))
    tiny = ShardLoaders(rows, rows[:2], block_size=4, batch_size=2, seed=0)
    assert len(tiny.for_rank(2, 3)[1].dataset) == 2


def test_cursor_resumes_at_the_exact_batch_across_epochs():
    straight = RowSampler(30, 4, seed=1)  # 7 batches per epoch
    expected = []
    for _ in range(3):
        for batch in straight:
            expected.append(batch)
            straight.advance()
    interrupted = RowSampler(30, 4, seed=1)
    got = []
    for batch in interrupted:  # a crash after 10 trained batches (epoch 1, position 3)
        got.append(batch)
        interrupted.advance()
    it = iter(interrupted)
    for _ in range(3):
        got.append(next(it))
        interrupted.advance()
    state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in a checkpoint
    assert (state["epoch"], state["position"]) == (1, 3) and interrupted.samples_seen == 40
    resumed = RowSampler(30, 4, seed=1)
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        for batch in resumed:
            got.append(batch)
            resumed.advance()
    assert got == expected
    with pytest.raises(ValueError, match="train.batch_size, train.num_workers"):
        RowSampler(30, 5, seed=1).load_state_dict(state)


class _Recorder:
    """A tiny LightningModule factory that records every row index it trains on."""

    @staticmethod
    def module(log: list[int]):
        import pytorch_lightning as pl

        class Rec(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def training_step(self, batch, batch_idx):
                (idx,) = batch
                log.extend(idx.tolist())
                return (self.w * idx.float()).sum() ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Rec()


def _lightning_fit(log, sampler, max_steps: int, ckpt_dir: Path, resume: bool):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from stages.data.row_sampler import sampler_checkpoint

    data = DataLoader(TensorDataset(torch.arange(sampler.n_rows)), batch_sampler=sampler)
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[sampler_checkpoint(sampler),
                                    ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=3, save_last=True)],
                         default_root_dir=str(ckpt_dir))
    last = ckpt_dir / "last.ckpt"
    trainer.fit(_Recorder.module(log), data, ckpt_path=str(last) if resume else None)


def test_lightning_resume_continues_at_the_exact_sample(tmp_path):
    """A Lightning fit stopped mid-epoch at a checkpoint (step 9 of 7-batch epochs) and resumed
    trains on exactly the rows an uninterrupted fit trains on, in the same order."""
    straight: list[int] = []
    _lightning_fit(straight, RowSampler(30, 4, seed=5), 15, tmp_path / "a", resume=False)
    first: list[int] = []
    _lightning_fit(first, RowSampler(30, 4, seed=5), 9, tmp_path / "b", resume=False)
    rest: list[int] = []
    _lightning_fit(rest, RowSampler(30, 4, seed=5), 15, tmp_path / "b", resume=True)
    assert len(straight) == 60 and first + rest == straight


# ---- prepare_data and training on a streamed text corpus ---------------------------------------


def _corpus(path: Path, n_docs: int) -> Path:
    rng = np.random.default_rng(0)
    words = ["block", "tower", "token", "shard", "model", "stream", "noise", "mask", "row", "seed"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(20, 60))))}) + "\n"
                            for _ in range(n_docs)), encoding="utf-8")
    return path


def _ctx(tmp_path: Path, name: str) -> StageContext:
    return StageContext(name=name, out_dir=tmp_path / name, work_dir=tmp_path / f"{name}_work", run_dir=tmp_path)


def test_prepare_data_streams_text_into_small_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "TOKENIZE_CHUNK", 7)  # several chunks even for a small corpus
    cfg = prepare_data.Config(source="files", paths=[str(_corpus(tmp_path / "c.jsonl", 200))], seq_len=32,
                              block_size=16, eval_fraction=0.1, eval_prompt_tokens=16, eval_answer_tokens=8,
                              shard_tokens=32 * 50)
    m = prepare_data.run(cfg, {}, _ctx(tmp_path, "data"))
    index = json.loads((Path(m["artifacts"]["train_tokens"]) / INDEX_FILE).read_text())
    assert index["dtype"] == "uint16" and len(index["shards"]) == m["metrics"]["train_shards"] > 2
    assert all(s["rows"] == 50 for s in index["shards"][:-1]) and index["shards"][0]["mask"] is None
    train, evals = TokenShards(m["artifacts"]["train_tokens"]), TokenShards(m["artifacts"]["eval_tokens"])
    train.verify()
    eos = m["eos_token_id"]
    stream = np.concatenate([train.batch(range(len(train)))[0].ravel(), evals.batch(range(len(evals)))[0].ravel()])
    n_docs = int((stream == eos).sum())
    assert 180 < n_docs <= 200  # every document once, cut into rows (the tails shorter than a row dropped)
    assert len(evals) >= 1 and m["metrics"]["eval_examples"] >= 1
    again = prepare_data.run(cfg, {}, _ctx(tmp_path, "data2"))
    assert json.loads((Path(again["artifacts"]["train_tokens"]) / INDEX_FILE).read_text()) == index  # seeded


def test_train_denoiser_reads_text_shards_lazily_and_resumes(tmp_path):
    """train_denoiser on a text corpus takes the lazy path (`ShardRows` + `RowSampler`, no
    in-memory corpus): it trains, its checkpoint holds the sample cursor, and a second run with more
    steps resumes from that step and cursor."""
    from test_stages_fixtures import BLOCK, make_ctx, tiny_backbone

    from stages import attach_conditioning, duplicate_backbone, freeze_context, train_denoiser

    torch.set_num_threads(1)
    cfg = prepare_data.Config(source="files", paths=[str(_corpus(tmp_path / "c.jsonl", 120))], seq_len=32,
                              block_size=16, eval_fraction=0.1, eval_prompt_tokens=16, eval_answer_tokens=8)
    m = {"prepare_data": prepare_data.run(cfg, {}, _ctx(tmp_path, "data"))}
    m["pretrain_backbone"] = {"artifacts": {"model": str(tiny_backbone(tmp_path / "backbone"))}}
    m["duplicate_backbone"] = duplicate_backbone.run(duplicate_backbone.Config(), m, make_ctx(tmp_path, "dup"))
    m["freeze_context"] = freeze_context.run(freeze_context.Config(), m, make_ctx(tmp_path, "freeze"))
    m["attach_conditioning"] = attach_conditioning.run(attach_conditioning.Config(block_size=BLOCK), m,
                                                       make_ctx(tmp_path, "attach"))
    common = dict(batch_size=4, checkpoint_every=2, accelerator="cpu", warmup_steps=1, progress_bar=False,
                  val_every=0, val_batches=1, num_threads=1)
    ctx = make_ctx(tmp_path, "train")
    first = train_denoiser.run(train_denoiser.Config(max_steps=4, **common), m, ctx)
    n_rows = len(TokenShards(m["prepare_data"]["artifacts"]["train_tokens"]))
    assert first["metrics"]["steps"] == 4 and first["metrics"]["train_rows"] == n_rows
    last = Path(ctx.work_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["callbacks"]["RowSamplerCheckpoint"]["position"] == 4 % (n_rows // 4)
    second = train_denoiser.run(train_denoiser.Config(max_steps=6, **common), m, ctx)
    assert second["metrics"]["resumed_from_step"] == 4 and second["metrics"]["steps"] == 6
    state = torch.load(last, weights_only=False)["callbacks"]["RowSamplerCheckpoint"]
    assert state["epoch"] * (n_rows // 4) + state["position"] == 6
