"""Shared builders for the stage tests: a tiny real Nemotron-H backbone and prepare_data-like data.

Nothing is mocked: the backbone is a real `NemotronHForCausalLM` with every layer kind (mamba,
attention, moe, mlp) at hidden size 32, saved with the project's character tokenizer, and the data
are real synthetic task rows tokenized and packed the way `prepare_data` documents its manifest.
Stages are called directly with `run(cfg, inputs, ctx)` on tmp dirs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.api import StageContext

SEQ_LEN = 32
BLOCK = 8
TASKS = ("copy", "reverse")


def make_ctx(root: Path, name: str, seed: int = 0, events: list | None = None) -> StageContext:
    """A StageContext with out/work dirs under `root/name`; events collected in `events`."""
    out, work = root / name / "out", root / name / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sink = events.append if events is not None else (lambda e: None)
    return StageContext(name=name, out_dir=out, work_dir=work, run_dir=root, seed=seed, report=sink)


def tiny_backbone(path: Path, seed: int = 0) -> Path:
    """Save a random tiny Nemotron-H (mamba, attention, moe, mlp) + char tokenizer at `path`."""
    from transformers import AutoModelForCausalLM, NemotronHConfig

    from stages.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    cfg = NemotronHConfig(
        vocab_size=len(tok), hidden_size=32, layers_block_type=["mamba", "attention", "moe", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=BLOCK,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_data(root: Path, tokenizer_dir: Path, n_train: int = 48, n_eval: int = 8) -> dict:
    """A prepare_data-shaped manifest: token files [N, SEQ_LEN], eval_examples.jsonl, tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from stages.data.tasks import generate

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root.mkdir(parents=True, exist_ok=True)

    def pack(rows):
        """One example per row, `<bos> prompt answer <eos>` then pads; loss_mask on answer + EOS."""
        out = torch.full((len(rows), SEQ_LEN), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), SEQ_LEN), dtype=torch.int8)
        for i, r in enumerate(rows):
            prompt = tok(r["prompt"])["input_ids"]
            ids = (prompt + tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:SEQ_LEN]
            out[i, : len(ids)] = torch.tensor(ids)
            mask[i, len(prompt): len(ids)] = 1
        return {"input_ids": out, "loss_mask": mask}

    train = generate(list(TASKS), n_train // len(TASKS), seed=1)
    held = generate(list(TASKS), n_eval, seed=2)
    save_file(pack(train), str(root / "train.safetensors"))
    save_file(pack(held), str(root / "eval.safetensors"))
    with open(root / "eval_examples.jsonl", "w") as f:
        for r in held:
            f.write(json.dumps(r) + "\n")
    return {"metrics": {}, "artifacts": {"tokenizer": str(tokenizer_dir),
                                          "train_tokens": str(root / "train.safetensors"),
                                          "eval_tokens": str(root / "eval.safetensors"),
                                          "eval_examples": str(root / "eval_examples.jsonl")},
            "seq_len": SEQ_LEN, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "tasks": list(TASKS)}


def test_fixtures_build_a_loadable_backbone_and_data(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = tiny_backbone(tmp_path / "bb")
    model = AutoModelForCausalLM.from_pretrained(d)
    data = tiny_data(tmp_path / "data", d)
    ids = load_file(data["artifacts"]["train_tokens"])["input_ids"]
    assert ids.shape[1] == SEQ_LEN and ids.shape[0] > 0
    assert model(ids[:2]).logits.shape == (2, SEQ_LEN, data["vocab_size"])
