"""A tiny export with a tokenizer for the serving tests: a random two-tower Llama on the character
tokenizer, with an `auto_modes` table that changes mode with the batch size."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from twotower_fixtures import llama_config

AUTO_MODES = {"1": "ar", "4": "verified"}
"""Batches of 1-3 rows decode `ar`, of 4 or more `verified` (both AR's output: checkable)."""


def tiny_export(path: Path, *, eos: bool = True, max_positions: int = 256) -> Path:
    """Write the export to `path` (with eos=False the backbone has no EOS: every row runs to its
    max_tokens, so a long request stays in flight)."""
    from stages.data.tokenizer import build_char_tokenizer
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    tok = build_char_tokenizer()
    cfg = llama_config().to_dict() | {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                      "bos_token_id": tok.bos_token_id, "max_position_embeddings": max_positions,
                                      "eos_token_id": tok.eos_token_id if eos else None}
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(llama_config().__class__(**cfg)).eval()
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=4)).eval()
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps(
        {"mode": "diffusion", "gamma": 0.9, "block_size": 4, "max_new_tokens": 12, "auto_modes": AUTO_MODES}))
    return path


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
