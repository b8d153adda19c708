"""Stage `fidelity` and the source-naming export, on a tiny llama that comes in as a GGUF file.

The chain is the real one (duplicate_backbone converts the GGUF, training runs a few steps), called
stage by stage without the engine; `recipes/smollm2_135m.yaml` runs the same stages on real weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf_fixtures import tiny_llama, write_llama_gguf
from test_stages_fixtures import BLOCK, make_ctx, tiny_data

from stages import attach_conditioning as A
from stages import calibrate_gamma as C
from stages import duplicate_backbone as D
from stages import evaluate as E
from stages import export as X
from stages import fidelity as FI
from stages import freeze_context as F
from stages import train_denoiser as T
from twotower.checksums import sha256_file

TRAIN = dict(max_steps=6, batch_size=8, lr=3e-3, val_every=0, checkpoint_every=100, progress_bar=False, num_threads=1)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fidelity")
    gguf = write_llama_gguf(tiny_llama(), root / "tiny.gguf")
    m: dict = {}
    m["duplicate_backbone"] = D.run(D.Config(gguf_file=str(gguf)), {}, make_ctx(root / "runs" / "run1", "dup"))
    converted = Path(m["duplicate_backbone"]["backbone"]["model"])
    m["prepare_data"] = tiny_data(root / "data", converted)
    m["freeze_context"] = F.run(F.Config(), {"duplicate_backbone": m["duplicate_backbone"]}, make_ctx(root, "freeze"))
    m["attach_conditioning"] = A.run(A.Config(block_size=BLOCK), {"freeze_context": m["freeze_context"]},
                                     make_ctx(root, "attach"))
    m["train_denoiser"] = T.run(T.Config(**TRAIN), m, make_ctx(root, "train"))
    m["fidelity"] = FI.run(FI.Config(n_prompts=4, max_new_tokens=10, parity_rows=2, accuracy_rows=8), m,
                           make_ctx(root, "fidelity"))
    return {"root": root, "gguf": gguf, "m": m}


def test_fidelity_reports_parity_greedy_agreement_and_accuracy(chain):
    fm = chain["m"]["fidelity"]["metrics"]
    assert fm["parity_max_abs_logit_diff"] < 1e-4
    assert fm["n_prompts"] == 4 and fm["ar_equals_hf_prompts"] == 4 and fm["ar_equals_hf"] == 1.0
    assert fm["mock_ar_equals_ar_prompts"] == 4 and fm["mock_ar_equals_ar"] == 1.0
    assert 0.0 <= fm["masked_accuracy_before"] <= 1.0 and 0.0 <= fm["masked_accuracy_after"] <= 1.0
    # six steps at a high learning rate: the held-out loss of the trained denoiser is lower
    assert fm["masked_loss_after"] < fm["masked_loss_before"]
    detail = json.loads(Path(chain["m"]["fidelity"]["artifacts"]["fidelity"]).read_text())
    assert len(detail["prompts"]) == 4 and all(p["ar_equals_hf"] for p in detail["prompts"])


def test_masked_accuracy_is_the_same_draw_for_the_same_model(chain):
    from stages.backbones.loading import load_trained
    from stages.data.rows import build_rows
    from stages.training.optimisation import load_tokens

    m = chain["m"]
    model, _ = load_trained(m["train_denoiser"])
    ids, lm = load_tokens(m["prepare_data"]["artifacts"]["eval_tokens"], "eval")
    data = m["prepare_data"]
    rows = build_rows((ids[:8], lm[:8]), "auto", "answers", BLOCK, int(data.get("pad_token_id") or 0),
                      data.get("eos_token_id"))
    acc, loss = FI.masked_scores(model, *rows, batch_size=8, seed=0)
    assert (acc, loss) == FI.masked_scores(model, *rows, batch_size=8, seed=0)
    assert loss == pytest.approx(chain["m"]["fidelity"]["metrics"]["masked_loss_after"], rel=1e-5)
    assert FI.masked_scores(model, *rows, batch_size=8, seed=1)[1] != loss  # another draw, another loss


def test_parity_and_greedy_checks_catch_a_broken_walk(chain, monkeypatch):
    from stages.backbones.loading import load_trained
    from stages.training.optimisation import load_tokens

    m = chain["m"]
    model, tok = load_trained(m["train_denoiser"])
    ids, _ = load_tokens(m["prepare_data"]["artifacts"]["eval_tokens"], "eval")
    walk = model.context_walk
    shifted = walk.logits
    monkeypatch.setattr(walk, "logits", lambda h: shifted(h) + torch.linspace(0, 50, shifted(h).shape[-1]))
    assert FI.parity(model, ids[:1]) > 1.0
    out = FI.greedy_agreement(model, [tok("copy abc=")["input_ids"]], 6, eos=2, pad=2)
    assert out["ar_equals_hf"] == [False] and out["first_mismatch"] == [0]


def test_export_card_and_summary_name_the_source_and_the_checks(chain):
    root, m = chain["root"], dict(chain["m"])
    m["calibrate_gamma"] = C.run(C.Config(gammas=[0.9], prompts_per_task=1, repeats=1, max_new_tokens=8), m,
                                 make_ctx(root, "calibrate"))
    m["evaluate"] = E.run(E.Config(prompts_per_task=1, repeats=1, max_new_tokens=8), m, make_ctx(root, "evaluate"))
    out = X.run(X.Config(verify_prompts=1, max_new_tokens=8), m, make_ctx(root, "export"))
    sha = sha256_file(chain["gguf"])
    assert out["metrics"]["source_checkpoint"] == f"tiny.gguf sha256:{sha}"
    card = (Path(out["path"]) / "README.md").read_text()
    assert f"Source checkpoint: `tiny.gguf sha256:{sha}`" in card
    assert "`ar` == transformers' greedy `generate`, token for token | 4/4 prompts" in card
    assert "masked accuracy after training" in card
    assert str(root) not in (Path(out["path"]) / "config.json").read_text()
